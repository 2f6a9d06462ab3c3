//! Model level on the GPU: every fixture's logits against the CPU f32 path,
//! SmolLM2's greedy continuation against the CPU's, determinism run to run,
//! and CUDA-graph decode against eager decode. Skips without a GPU; fails
//! when `FUSEBOX_REQUIRE_CUDA=1` and no GPU is usable.

use std::path::Path;

use fusebox_core::cpu::CpuBackend;
use fusebox_core::cuda::{backend_for_tests, backend_for_tests_with_graphs};
use fusebox_core::fixtures::{asset_or_skip, fixture};
use fusebox_core::Backend;
use fusebox_engine::generate::full_logits;
use fusebox_engine::{BatchEngine, GenerateOptions, SamplingParams, Session};
use fusebox_models::Model;

/// Fixtures checked against the CPU: dense f32/bf16/f16, MoE, MLX affine
/// (4/8-bit, mixed 2-8 bit, MoE) and GGUF.
const FIXTURES: [&str; 11] = [
    "tiny-qwen3",
    "tiny-llama",
    "tiny-llama-linear",
    "tiny-qwen3-moe",
    "mlx/tiny-qwen3-4bit-g64",
    "mlx/tiny-qwen3-8bit-g32",
    "mlx/tiny-qwen3-mixed",
    "mlx/tiny-qwen3-moe-4bit-g64",
    "gguf/tiny-qwen3.gguf",
    "gguf/tiny-llama.gguf",
    "gguf/tiny-qwen3-moe.gguf",
];

fn load(path: &Path, be: &dyn Backend) -> Model {
    Model::load(path, be).unwrap_or_else(|e| panic!("loading {} on {}: {e:#}", path.display(), be.name()))
}

/// ||a - b|| / ||b||
fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn prompt(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    fusebox_core::dtype::random_tokens(n, vocab, seed)
}

/// Relative RMS of the GPU's logits against the CPU's for every fixture:
/// a prefill of 5 tokens (the GEMV path), of 40 tokens (cuBLAS), and 24
/// teacher-forced decode steps after an 8-token prefill. Returns the worst
/// value per fixture, printing every one.
fn fixture_errors(gpu: &dyn Backend, label: &str) -> Vec<(&'static str, f64)> {
    let cpu = CpuBackend::new(0).unwrap();
    let mut out = vec![];
    for name in FIXTURES {
        let path = fixture(name);
        let (mc, mg) = (load(&path, &cpu), load(&path, gpu));
        let vocab = mc.config().vocab_size;
        let mut worst = 0f64;
        let mut parts = vec![];
        for n in [5, 40] {
            let ids = prompt(vocab, n, 7 + n as u64);
            let c = full_logits(&mc.decoder, &cpu, &ids).unwrap();
            let g = full_logits(&mg.decoder, gpu, &ids).unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{name}: non-finite GPU logits");
            let e = rel_rms(&g, &c);
            parts.push(format!("prefill {n}: {e:.2e}"));
            worst = worst.max(e);
        }
        // decode: teacher-forced tokens so both sides see the same context
        let ids = prompt(vocab, 32, 99);
        let (mut sc, mut sg) =
            (Session::new(&mc.decoder, &cpu, 64).unwrap(), Session::new(&mg.decoder, gpu, 64).unwrap());
        let (lc, lg) = (sc.prefill(&ids[..8]).unwrap().to_vec(), sg.prefill(&ids[..8]).unwrap().to_vec());
        let mut dec = rel_rms(&lg, &lc);
        for &t in &ids[8..] {
            let lc = sc.step(t).unwrap().to_vec();
            let lg = sg.step(t).unwrap().to_vec();
            dec = dec.max(rel_rms(&lg, &lc));
        }
        parts.push(format!("decode: {dec:.2e}"));
        worst = worst.max(dec);
        eprintln!("[{label}] {name}: {}", parts.join(", "));
        out.push((name, worst));
    }
    out
}

/// With an f32 KV cache and f32 prefill GEMMs, the GPU computes what the
/// CPU's f32 path computes, up to summation order: within RMS 2e-3 (in
/// practice about 1e-6), for every fixture.
#[test]
fn fixtures_match_the_cpu_f32_path_within_2e3() {
    let Some(gpu) = fusebox_core::cuda::backend_for_tests() else { return };
    drop(gpu);
    let gpu = fusebox_core::cuda::CudaBackend::with_options(0, fusebox_core::cuda::CudaOptions::exact()).unwrap();
    let errs = fixture_errors(&gpu, "f32 KV, f32 prefill");
    let bad: Vec<_> = errs.iter().filter(|(_, e)| *e >= 2e-3).collect();
    assert!(bad.is_empty(), "relative RMS >= 2e-3 vs the CPU: {bad:?}");
}

/// The default configuration (bf16 KV cache, bf16 tensor-core prefill):
/// the bf16 rounding of cached keys and values (and of prefill activations
/// for more than 8 rows) costs 2e-3 to 1e-2 on these tiny random models
/// (H200, 2026-11-22: 2.1e-3 to 1.01e-2, worst in MoE decode); the bound
/// here is 2e-2, and the values are printed for the record. The exact test
/// above shows the kernels themselves agree with the CPU.
#[test]
fn fixtures_stay_close_to_the_cpu_with_bf16_kv() {
    let Some(gpu) = backend_for_tests() else { return };
    let errs = fixture_errors(&gpu, "bf16 KV (default)");
    let bad: Vec<_> = errs.iter().filter(|(_, e)| *e >= 2e-2).collect();
    assert!(bad.is_empty(), "relative RMS >= 2e-2 vs the CPU: {bad:?}");
}

/// `n` greedy tokens through the engine, as `generate` runs them.
fn greedy(be: &dyn Backend, model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut engine = BatchEngine::lone(&model.decoder, be, prompt.len() + n + 1).unwrap();
    let opts = GenerateOptions { max_new_tokens: n, stop_ids: vec![], sampling: SamplingParams::greedy() };
    engine.generate(prompt, &opts, &mut None, |_| Ok(true)).unwrap().0.tokens
}

/// SmolLM2 (real Q4_1/Q8_0 weights): 64 greedy tokens, GPU == CPU. If they
/// ever differ, the message shows the top two logits at the first divergence.
#[test]
fn smollm2_greedy_64_tokens_match_the_cpu() {
    let Some(path) = asset_or_skip(
        "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2_greedy_64_tokens_match_the_cpu",
    ) else {
        return;
    };
    let Some(gpu) = backend_for_tests() else { return };
    let cpu = CpuBackend::new(0).unwrap();
    let (mc, mg) = (load(&path, &cpu), load(&path, &gpu));
    let tok = &mc.tokenizer;
    let t = mc.chat_template.as_ref().expect("SmolLM2 GGUF carries a chat template");
    let msgs: Vec<fusebox_models::Message> =
        serde_json::from_str(r#"[{"role": "user", "content": "What is the capital of France?"}]"#).unwrap();
    let ids = tok.encode(&t.render(&msgs, true, None).unwrap(), false).unwrap();
    let c = greedy(&cpu, &mc, &ids, 64);
    let g = greedy(&gpu, &mg, &ids, 64);
    if c != g {
        let i = c.iter().zip(&g).take_while(|(a, b)| a == b).count();
        let mut ctx = ids.clone();
        ctx.extend_from_slice(&c[..i]);
        let lc = full_logits(&mc.decoder, &cpu, &ctx).unwrap();
        let v = mc.config().vocab_size;
        let last = &lc[(ctx.len() - 1) * v..];
        let mut top: Vec<(f32, usize)> = last.iter().copied().zip(0..).collect();
        top.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        panic!(
            "first divergence at generated token {i}: cpu {} gpu {}; CPU top two logits {:?} {:?} (gap {:.4})",
            c[i],
            g[i],
            top[0],
            top[1],
            top[0].0 - top[1].0
        );
    }
    eprintln!("smollm2: 64 greedy tokens identical: {:?}", tok.decode(&g, true).unwrap_or_default());
}

/// Logits after a prefill and 20 decode steps, bit for bit, three runs, with
/// CUDA graphs and without; graph and eager decode agree bit for bit too.
#[test]
fn gpu_decode_is_deterministic_with_and_without_graphs() {
    let Some(graphs) = backend_for_tests_with_graphs(true) else { return };
    let eager = backend_for_tests_with_graphs(false).unwrap();
    for name in ["tiny-qwen3", "mlx/tiny-qwen3-moe-4bit-g64", "gguf/tiny-llama.gguf"] {
        let path = fixture(name);
        let mut runs: Vec<Vec<Vec<f32>>> = vec![];
        for be in [&graphs as &dyn Backend, &eager] {
            let m = load(&path, be);
            let ids = prompt(m.config().vocab_size, 30, 5);
            for _ in 0..3 {
                let mut s = Session::new(&m.decoder, be, 64).unwrap();
                let mut steps = vec![s.prefill(&ids[..10]).unwrap().to_vec()];
                for &t in &ids[10..] {
                    steps.push(s.step(t).unwrap().to_vec());
                }
                runs.push(steps);
            }
        }
        for (i, r) in runs.iter().enumerate().skip(1) {
            for (j, (a, b)) in r.iter().zip(&runs[0]).enumerate() {
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{name}: run {i} ({}) step {j} differs from run 0 (graphs)",
                    if i < 3 { "graphs" } else { "eager" }
                );
            }
        }
        eprintln!("{name}: 6 runs (3 with graphs, 3 eager), 21 logit rows each: bitwise identical");
    }
}
