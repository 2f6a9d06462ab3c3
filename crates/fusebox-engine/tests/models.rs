//! Model math against transformers: the tiny fixtures' logits at every
//! position, their greedy continuations, and KV-cache decode vs a full
//! re-forward.

mod common;

use std::path::PathBuf;

use fusebox_core::{cpu::CpuBackend, fixtures::fixture};
use fusebox_engine::generate::full_logits;
use fusebox_engine::{BatchEngine, GenerateOptions, SamplingParams, Session, StopReason};
use fusebox_models::safetensors::Checkpoint;
use fusebox_models::Model;
use serde_json::Value;

const MODELS: [&str; 3] = ["tiny-qwen3", "tiny-llama", "tiny-llama-linear"];

fn backend() -> CpuBackend {
    CpuBackend::new(0).unwrap()
}

fn expected(name: &str) -> (Value, Checkpoint) {
    let dir = fixture(name);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ck = Checkpoint::open_files(&[dir.join("expected_logits.safetensors")]).unwrap();
    (v, ck)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// max |a - b| / max |b| over one row.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    num / den
}

fn load(name: &str, be: &CpuBackend) -> Model {
    let path: PathBuf = fixture(name);
    Model::load(&path, be).unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

#[test]
fn logits_match_transformers_at_every_position() {
    let be = backend();
    for name in MODELS {
        let model = load(name, &be);
        let vocab = model.config().vocab_size;
        let (exp, ck) = expected(name);
        for case in exp["cases"].as_array().unwrap() {
            let input = ids(&case["input_ids"]);
            let want = ck.get(case["logits_tensor"].as_str().unwrap()).unwrap().to_f32_vec().unwrap();
            let got = full_logits(&model.decoder, &be, &input).unwrap();
            assert_eq!(got.len(), want.len());
            let mut worst = 0f32;
            for (pos, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
                let e = rel_err(g, w);
                worst = worst.max(e);
                assert!(e < 1e-4, "{name} {}: position {pos}: relative error {e:e}", case["name"]);
            }
            eprintln!("{name} {}: {} positions, worst relative error {worst:.2e}", case["name"], input.len());
        }
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    let be = backend();
    for name in MODELS {
        let model = load(name, &be);
        let (exp, _) = expected(name);
        let prompt = ids(&exp["greedy"]["prompt_ids"]);
        let want = ids(&exp["greedy"]["new_tokens"]);
        let opts = GenerateOptions { max_new_tokens: want.len(), stop_ids: vec![], sampling: SamplingParams::greedy() };
        let out = common::generate(&model.decoder, &be, 128, &prompt, &opts);
        assert_eq!(out.tokens, want, "{name}: greedy continuation differs");
        assert_eq!(out.stop, StopReason::MaxTokens);
    }
}

#[test]
fn kv_cache_decode_equals_full_reforward() {
    let be = backend();
    for name in MODELS {
        let model = load(name, &be);
        let vocab = model.config().vocab_size;
        let (exp, _) = expected(name);
        let mut seq = ids(&exp["greedy"]["prompt_ids"]);
        seq.extend(ids(&exp["greedy"]["new_tokens"]));
        let full = full_logits(&model.decoder, &be, &seq).unwrap();
        let split = 5;
        let mut s = Session::new(&model.decoder, &be, seq.len()).unwrap();
        let first = s.prefill(&seq[..split]).unwrap().to_vec();
        assert!(rel_err(&first, &full[(split - 1) * vocab..split * vocab]) < 1e-5, "{name}: prefill logits");
        for (i, &t) in seq.iter().enumerate().skip(split) {
            let got = s.step(t).unwrap();
            let e = rel_err(got, &full[i * vocab..(i + 1) * vocab]);
            assert!(e < 1e-5, "{name}: decode step at position {i}: relative error {e:e}");
        }
        // the context is now full
        assert!(s.step(0).is_err());
    }
}

#[test]
fn context_limit_stops_generation() {
    let be = backend();
    let model = load("tiny-qwen3", &be);
    let opts = GenerateOptions { max_new_tokens: 100, stop_ids: vec![], sampling: SamplingParams::greedy() };
    let out = common::generate(&model.decoder, &be, 12, &[1, 2, 3, 4, 5], &opts);
    assert_eq!(out.stop, StopReason::ContextFull);
    // 12 positions: 5 prompt tokens, 7 decoded, and the last sampled token is emitted too
    assert_eq!(out.tokens.len(), 8);
    let mut engine = BatchEngine::lone(&model.decoder, &be, 4).unwrap();
    let err = engine.generate(&[1, 2, 3, 4, 5], &opts, &mut None, |_| Ok(true)).unwrap_err();
    assert!(format!("{err}").contains("does not fit the context of 4 tokens"), "{err}");
}

#[test]
fn eos_stops_generation() {
    let be = backend();
    let model = load("tiny-qwen3", &be);
    let (exp, _) = expected("tiny-qwen3");
    let prompt = ids(&exp["greedy"]["prompt_ids"]);
    let want = ids(&exp["greedy"]["new_tokens"]);
    // make the 4th greedy token a stop token
    let opts = GenerateOptions { max_new_tokens: 32, stop_ids: vec![want[3]], sampling: SamplingParams::greedy() };
    let out = common::generate(&model.decoder, &be, 128, &prompt, &opts);
    assert_eq!(out.stop, StopReason::Eos);
    assert_eq!(out.tokens, want[..want.iter().position(|&t| t == want[3]).unwrap()]);
}

/// A token id past the vocabulary is an error on the host, before any
/// backend runs (a GPU kernel could only skip it), for prefill and decode.
#[test]
fn token_ids_outside_the_vocabulary_are_errors() {
    let be = backend();
    let model = load("tiny-qwen3", &be);
    let v = model.config().vocab_size as u32;
    let mut s = Session::new(&model.decoder, &be, 16).unwrap();
    let e = s.prefill(&[1, 2, v]).unwrap_err();
    assert!(format!("{e:#}").contains(&format!("token id {v} is outside the model's vocabulary")), "{e:#}");
    s.prefill(&[1, 2]).unwrap();
    let e = s.step(v + 5).unwrap_err();
    assert!(format!("{e:#}").contains("outside the model's vocabulary"), "{e:#}");
    // the session is still usable
    assert!(s.step(3).is_ok());
}
