//! Speculative verify on the GPU: every row of a verify pass of up to
//! `ROW_EXACT_MAX` rows is bitwise the logits of a one-token decode step at
//! that position (fixtures in every weight format, and a real-shaped
//! synthetic model in bf16 and 4-bit), eager and through CUDA graphs; and
//! greedy speculative decoding gives plain greedy decoding's tokens. Skips
//! without a GPU; fails when `FUSEBOX_REQUIRE_CUDA=1` and no GPU is usable.

mod common;

use common::{assert_verify_rows_equal_steps, load, repeating_prompt, tokens};
use fusebox_core::cuda::{backend_for_tests, backend_for_tests_with_graphs};
use fusebox_core::Backend;
use fusebox_engine::{GenerateOptions, PromptLookup, SamplingParams, SpecOptions};
use fusebox_models::synthetic::{self, Quant, SyntheticSource};
use fusebox_models::Decoder;

/// Verify sizes: decode (1), the GEMV's one launch (2..8), chunked launches
/// (9, 17) and the most a pass takes (32, which also takes 4 x 8 rows).
const ROWS: [usize; 7] = [1, 2, 5, 8, 9, 17, 32];

/// Dense (f32/bf16/f16), MoE, GGUF (re-laid out as affine) and MLX affine.
const FIXTURES: [&str; 6] = [
    "tiny-qwen3",
    "tiny-llama",
    "tiny-qwen3-moe",
    "gguf/tiny-qwen3.gguf",
    "mlx/tiny-qwen3-4bit-g64",
    "mlx/tiny-qwen3-moe-4bit-g64",
];

/// Qwen3-0.6B's shapes (hidden 1024, 16 heads over 8 kv heads of 128, a
/// 151936-token vocabulary) with random weights, cut to 4 layers.
fn synthetic_qwen3(be: &dyn Backend, quant: Quant) -> Decoder {
    let mut cfg = synthetic::config("qwen3-0.6b").unwrap();
    cfg.num_layers = 4;
    Decoder::load(cfg, &SyntheticSource::new(quant, be), be).unwrap()
}

fn synthetic_models(be: &dyn Backend) -> Vec<(&'static str, Decoder)> {
    vec![
        ("qwen3-0.6b bf16", synthetic_qwen3(be, Quant::Bf16)),
        ("qwen3-0.6b q4g64", synthetic_qwen3(be, Quant::Affine { bits: 4, group: 64 })),
    ]
}

/// Every verify size over every model, with the prompt short (GEMV prefill)
/// for the fixtures and long (cuBLAS prefill, a longer key range) for the
/// synthetic models.
fn verify_rows_equal_steps(be: &dyn Backend, label: &str) {
    let passes = 3; // eager, captured, replayed (with graphs on)
    for name in FIXTURES {
        let model = load(name, be);
        let vocab = model.config().vocab_size;
        let prompt = tokens(7, vocab, 11);
        for m in ROWS {
            let run = tokens(m, vocab, 100 + m as u64);
            assert_verify_rows_equal_steps(&model.decoder, be, &format!("[{label}] {name}"), &prompt, &run, 64, passes);
        }
        eprintln!("[{label}] {name}: verify rows == decode steps bitwise for m in {ROWS:?}");
    }
    for (name, model) in synthetic_models(be) {
        let vocab = model.cfg.vocab_size;
        let prompt = tokens(40, vocab, 12);
        for m in ROWS {
            let run = tokens(m, vocab, 200 + m as u64);
            assert_verify_rows_equal_steps(&model, be, &format!("[{label}] {name}"), &prompt, &run, 256, passes);
        }
        eprintln!("[{label}] {name}: verify rows == decode steps bitwise for m in {ROWS:?}");
    }
}

#[test]
fn cuda_verify_rows_equal_decode_steps_bitwise() {
    let Some(gpu) = backend_for_tests() else { return };
    let label = if gpu.graphs_enabled() { "graphs" } else { "eager" };
    verify_rows_equal_steps(&gpu, label);
}

#[test]
fn cuda_verify_rows_equal_decode_steps_bitwise_without_graphs() {
    let Some(gpu) = backend_for_tests_with_graphs(false) else { return };
    verify_rows_equal_steps(&gpu, "eager");
}

/// Greedy speculative decoding with prompt lookup (k = 1, 4, 8, 16) gives
/// plain greedy decoding's 128 tokens on the real-shaped bf16 model.
#[test]
fn cuda_greedy_speculative_equals_greedy() {
    let Some(gpu) = backend_for_tests() else { return };
    let model = synthetic_qwen3(&gpu, Quant::Bf16);
    let prompt = repeating_prompt(model.cfg.vocab_size, 7);
    let n = 128;
    let ctx = prompt.len() + n + 32;
    let opts = GenerateOptions { max_new_tokens: n, stop_ids: vec![], sampling: SamplingParams::greedy() };
    let want = common::generate(&model, &gpu, ctx, &prompt, &opts).tokens;
    assert_eq!(want.len(), n);
    for k in [1, 4, 8, 16] {
        let mut p = PromptLookup::new(3).unwrap();
        let so = SpecOptions { k, trace: false };
        let (out, stats) = common::speculate(&model, &gpu, ctx, &prompt, &opts, so, &mut p);
        if out.tokens != want {
            let i = out.tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
            panic!(
                "k={k}: speculative output differs from plain greedy at token {i} of {n} \
                 (speculative {:?}, plain {:?})",
                out.tokens.get(i),
                want.get(i)
            );
        }
        eprintln!(
            "k={k}: {n} tokens equal plain greedy ({} rounds, {} drafted, {} accepted)",
            stats.rounds, stats.drafted, stats.accepted
        );
    }
}

/// Every tiny fixture on the GPU: prompt lookup and draft models (the model
/// itself, so everything is accepted, and another one, so nearly nothing
/// is) give plain greedy decoding's 256 tokens for k = 1, 4, 8, 16.
#[test]
fn cuda_greedy_speculative_equals_greedy_on_every_fixture() {
    let Some(gpu) = backend_for_tests() else { return };
    let opts = GenerateOptions { max_new_tokens: 256, stop_ids: vec![], sampling: SamplingParams::greedy() };
    let other = load("tiny-llama", &gpu);
    for name in common::ALL_MODELS {
        let model = load(name, &gpu);
        let prompt = repeating_prompt(model.config().vocab_size, 7);
        let ctx = prompt.len() + 256 + 32;
        let want = common::generate(&model.decoder, &gpu, ctx, &prompt, &opts);
        for k in [1, 4, 8, 16] {
            let mut ngram = PromptLookup::new(3).unwrap();
            let mut own = fusebox_engine::DraftModel::new(&model, &model, &gpu, ctx).unwrap();
            let mut foreign = fusebox_engine::DraftModel::new(&model, &other, &gpu, ctx).unwrap();
            let proposers: [(&str, &mut dyn fusebox_engine::Proposer); 3] =
                [("ngram", &mut ngram), ("self", &mut own), ("tiny-llama", &mut foreign)];
            for (what, p) in proposers {
                let so = SpecOptions { k, trace: false };
                let (out, stats) = common::speculate(&model.decoder, &gpu, ctx, &prompt, &opts, so, p);
                assert_eq!(out.tokens, want.tokens, "{name} drafted by {what}, k={k}: differs from plain greedy");
                if what == "self" {
                    // (its first proposal comes from a prefill, whose rows may round differently)
                    assert!(
                        stats.accepted * 10 >= stats.drafted * 9,
                        "{name} drafting for itself, k={k}: {}",
                        stats.summary()
                    );
                }
            }
        }
        eprintln!("{name}: speculative == plain greedy for ngram, self and foreign drafts, k in 1/4/8/16");
    }
}

/// SmolLM2 (the asset, when fetched) on the GPU: prompt lookup on an edit
/// request and the model drafting for itself give plain greedy decoding's
/// 256 tokens.
#[test]
fn cuda_smollm2_speculative_equals_greedy() {
    let Some(gpu) = backend_for_tests() else { return };
    let Some(path) = common::smollm2("cuda_smollm2_speculative_equals_greedy") else { return };
    let model = fusebox_models::Model::load(&path, &gpu).unwrap();
    let prompt = common::chat_prompt(&model, common::EDIT_PROMPT);
    let opts = GenerateOptions { max_new_tokens: 256, stop_ids: vec![], sampling: SamplingParams::greedy() };
    let ctx = prompt.len() + 256 + 32;
    let want = common::generate(&model.decoder, &gpu, ctx, &prompt, &opts);
    for k in [1, 4, 8, 16] {
        let mut ngram = PromptLookup::new(3).unwrap();
        let mut own = fusebox_engine::DraftModel::new(&model, &model, &gpu, ctx).unwrap();
        let proposers: [(&str, &mut dyn fusebox_engine::Proposer); 2] = [("ngram", &mut ngram), ("self", &mut own)];
        for (what, p) in proposers {
            let so = SpecOptions { k, trace: false };
            let (out, stats) = common::speculate(&model.decoder, &gpu, ctx, &prompt, &opts, so, p);
            assert_eq!(out.tokens, want.tokens, "SmolLM2 {what} k={k}: differs from plain greedy");
            eprintln!("SmolLM2 {what} k={k}: {}", stats.summary());
        }
    }
}
