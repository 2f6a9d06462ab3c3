//! Continuous batching on the CPU (f32, the tiny fixtures): every request's
//! greedy output under a running batch of mixed lengths (some joining
//! mid-way, prompts prefilled in chunks beside running decodes, sequences
//! preempted and recomputed) equals the request run alone, token for token,
//! and every KV block is free again at the end.

mod common;

use common::batch::{check, request, CROWDED, CROWDED_OPTS, MIXED, MIXED_OPTS};
use common::{cpu, load};
use std::sync::{Arc, Mutex};

use fusebox_engine::{BatchEngine, BatchOptions, Observer, Request, SamplingParams, StopReason};

#[test]
fn batched_greedy_equals_each_request_alone() {
    let be = cpu();
    for name in ["tiny-qwen3", "tiny-llama", "tiny-qwen3-moe", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-4bit-g64"] {
        check(&be, name, MIXED_OPTS, &MIXED);
    }
}

#[test]
fn preempted_sequences_are_recomputed_to_the_same_output() {
    let preempted = check(&cpu(), "tiny-qwen3", CROWDED_OPTS, &CROWDED);
    assert!(preempted > 0, "the scenario was meant to preempt");
}

/// A decoding sequence draws a token at every step while a long prompt
/// prefills beside it in chunks of what the budget leaves.
#[test]
fn a_long_prompt_does_not_hold_up_running_decodes() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let opts = BatchOptions { blocks: 64, max_batch_tokens: 8, max_seqs: 4, max_len: 256 };
    let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
    let req = |len: usize, n: usize, seed: u64| request(&model, &(0, len, n, seed));
    let a = engine.add(req(4, 20, 1)).unwrap();
    assert_eq!(engine.step().unwrap().len(), 1, "the short prompt's first token");
    let b = engine.add(req(100, 2, 2)).unwrap();
    for step in 0..12 {
        let ev = engine.step().unwrap();
        assert!(ev.iter().any(|e| e.id == a && e.token.is_some()), "step {step}: no token for the decoding sequence");
        assert!(ev.iter().all(|e| e.id != b), "step {step}: the long prompt cannot be done yet");
    }
    while !engine.is_idle() {
        engine.step().unwrap();
    }
    assert_eq!(engine.blocks_free(), engine.blocks_total());
}

/// The raw logits of every draw of one sequence.
struct Logits(Arc<Mutex<Vec<Vec<f32>>>>);

impl Observer for Logits {
    fn drawn(&mut self, raw: &[f32], _token: u32, _finished: Option<StopReason>) -> bool {
        self.0.lock().unwrap().push(raw.to_vec());
        true
    }
}

/// A decoding sequence's logits are bitwise the same alone and beside a
/// 150-token prompt prefilled in chunks that make its steps 64 rows long
/// (past the 32 rows a pass keeps one-row exact: the decode rows run in
/// their own pass).
#[test]
fn decode_rows_beside_a_long_prompt_are_bitwise_their_one_row_values() {
    let be = cpu();
    for name in ["tiny-qwen3", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-4bit-g64"] {
        let model = load(name, &be);
        let req = |len: usize, n: usize, seed: u64| request(&model, &(0, len, n, seed));
        let run = |beside: bool| {
            let opts = BatchOptions { blocks: 64, max_batch_tokens: 64, max_seqs: 4, max_len: 256 };
            let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
            let log = Arc::new(Mutex::new(vec![]));
            engine.add_observed(req(6, 12, 1), Box::new(Logits(log.clone()))).unwrap();
            engine.step().unwrap();
            if beside {
                engine.add(req(150, 2, 2)).unwrap();
            }
            while !engine.is_idle() {
                engine.step().unwrap();
            }
            let v = std::mem::take(&mut *log.lock().unwrap());
            v
        };
        let (alone, beside) = (run(false), run(true));
        assert_eq!(alone.len(), 12);
        for (i, (a, b)) in alone.iter().zip(&beside).enumerate() {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: draw {i} differs beside the prompt"
            );
        }
    }
}

#[test]
fn cancelled_and_rejected_requests_hold_no_blocks() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let opts = BatchOptions { blocks: 4, max_batch_tokens: 16, max_seqs: 4, max_len: 48 };
    let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
    let vocab = model.decoder.cfg.vocab_size;
    let req = |len: usize, n: usize| request(&model, &(0, len, n, 7));
    let a = engine.add(req(20, 10)).unwrap();
    let b = engine.add(req(5, 10)).unwrap();
    engine.step().unwrap();
    engine.step().unwrap();
    assert!(engine.blocks_free() < engine.blocks_total());
    assert!(engine.cancel(a) && engine.cancel(b) && !engine.cancel(a));
    assert!(engine.is_idle());
    assert_eq!(engine.blocks_free(), engine.blocks_total());
    let mut msg = |r: Request| engine.add(r).unwrap_err().to_string();
    assert!(msg(req(0, 4)).contains("empty"));
    assert!(msg(req(49, 4)).contains("does not fit"));
    assert!(msg(req(4, 0)).contains("max_new_tokens"));
    let mut bad = req(4, 4);
    bad.prompt[2] = vocab as u32;
    assert!(msg(bad).contains("vocabulary"));
    // a sequence that fills its context ends there: 48 positions, 40 prompt tokens, 8 decoded, and
    // the last token drawn is emitted too
    let c = engine.add(req(40, 100)).unwrap();
    let (mut last, mut got) = (None, vec![]);
    while !engine.is_idle() {
        for e in engine.step().unwrap() {
            assert_eq!(e.id, c);
            got.extend(e.token);
            last = e.finished.or(last);
        }
    }
    assert_eq!(last, Some(StopReason::ContextFull));
    let want = common::draws(&model.decoder, &be, 48, &req(40, 100).prompt, &SamplingParams::greedy(), 9);
    assert_eq!(got, want);
    assert_eq!(engine.blocks_free(), engine.blocks_total());
}

/// A lone sequence (its blocks the cache's first, in order) runs the
/// contiguous cache's kernels, as a `Session` does; two at once run paged.
#[test]
fn a_lone_sequence_runs_the_contiguous_path() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let opts = BatchOptions { blocks: 16, max_batch_tokens: 8, max_seqs: 2, max_len: 64 };
    let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
    let run = |engine: &mut BatchEngine, reqs: &[Request]| {
        for r in reqs {
            engine.add(r.clone()).unwrap();
        }
        while !engine.is_idle() {
            engine.step().unwrap();
        }
    };
    let req = |len: usize, n: usize| request(&model, &(0, len, n, 7));
    // one after another: every pass contiguous (a released table's blocks come back in order)
    run(&mut engine, &[req(20, 6)]);
    run(&mut engine, &[req(37, 4)]);
    let (paged, all) = engine.passes();
    assert_eq!(paged, 0, "{paged} of {all} passes of lone sequences ran paged");
    assert!(all >= 10);
    run(&mut engine, &[req(5, 6), req(9, 6)]);
    assert!(engine.passes().0 > 0, "two sequences at once run paged");
}

/// A lone decoding sequence draws on the device (the forward and the draw
/// one repeating pass), the others on the host: the same stream either way.
/// A seeded request alone, and the same request while another joins and
/// leaves mid-way (its draws moving from the device to the host and back),
/// give the tokens a `Session`'s steps give.
#[test]
fn seeded_draws_are_the_same_on_the_device_and_the_host() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let vocab = model.decoder.cfg.vocab_size;
    let req = |len: usize, n: usize, seed: u64| Request {
        prompt: common::tokens(len, vocab, seed),
        max_new_tokens: n,
        stop_ids: vec![],
        sampling: common::batch::seeded(seed),
    };
    let a = req(7, 40, 5);
    let want = common::draws(&model.decoder, &be, 64, &a.prompt, &common::batch::seeded(5), 40);
    for beside in [None, Some(3usize)] {
        let opts = BatchOptions { blocks: 32, max_batch_tokens: 16, max_seqs: 2, max_len: 128 };
        let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
        let id = engine.add(a.clone()).unwrap();
        let mut got = vec![];
        for step in 0.. {
            if Some(step) == beside {
                engine.add(req(12, 6, 9)).unwrap();
            }
            got.extend(engine.step().unwrap().iter().filter(|e| e.id == id).filter_map(|e| e.token));
            if engine.is_idle() {
                break;
            }
        }
        assert_eq!(got, want, "beside: {beside:?}");
    }
}

#[test]
fn a_lone_sequence_in_the_engine_decodes_as_a_session() {
    let be = cpu();
    for name in ["tiny-qwen3", "tiny-qwen3-moe", "gguf/tiny-qwen3.gguf"] {
        common::batch::lone_equals_session(&be, name);
    }
}
