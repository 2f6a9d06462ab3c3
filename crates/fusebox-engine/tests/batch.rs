//! Continuous batching on the CPU (f32, the tiny fixtures): every request's
//! greedy output under a running batch of mixed lengths (some joining
//! mid-way, prompts prefilled in chunks beside running decodes, sequences
//! preempted and recomputed) equals the request run alone, token for token,
//! and every KV block is free again at the end.

mod common;

use std::collections::HashMap;

use common::{cpu, greedy, load, tokens};
use fusebox_core::Backend;
use fusebox_engine::{BatchEngine, BatchOptions, Request, SamplingParams, SeqId, Session, StopReason};
use fusebox_models::Model;

/// One request of a scenario: joins before step `join`, prompt length,
/// tokens to generate, prompt seed.
type Plan = (usize, usize, usize, u64);

fn request(model: &Model, &(_, len, n, seed): &Plan) -> Request {
    Request {
        prompt: tokens(len, model.decoder.cfg.vocab_size, seed),
        max_new_tokens: n,
        stop_ids: vec![],
        sampling: SamplingParams::greedy(),
    }
}

/// The request's greedy output run alone.
fn alone(model: &Model, be: &dyn Backend, req: &Request) -> Vec<u32> {
    let mut s = Session::new(&model.decoder, be, req.prompt.len() + req.max_new_tokens + 1).unwrap();
    s.generate(&req.prompt, &greedy(req.max_new_tokens), |_| Ok(true)).unwrap().tokens
}

/// Run the scenario to the end: each request's tokens, in plan order.
fn run(engine: &mut BatchEngine, model: &Model, plans: &[Plan]) -> Vec<Vec<u32>> {
    let mut ids: Vec<Option<SeqId>> = vec![None; plans.len()];
    let mut out: HashMap<SeqId, (Vec<u32>, bool)> = HashMap::new();
    for step in 0..10_000 {
        for (p, id) in plans.iter().zip(ids.iter_mut()) {
            if p.0 == step {
                *id = Some(engine.add(request(model, p)).unwrap());
            }
        }
        if engine.is_idle() && ids.iter().all(Option::is_some) {
            break;
        }
        for e in engine.step().unwrap() {
            let (toks, done) = out.entry(e.id).or_default();
            assert!(!*done, "sequence {} has an event after it finished", e.id);
            toks.extend(e.token);
            if let Some(why) = e.finished {
                assert_eq!(why, StopReason::MaxTokens, "sequence {} ended early", e.id);
                *done = true;
            }
        }
    }
    assert!(engine.is_idle(), "the scenario did not finish");
    ids.iter().map(|id| out.remove(&id.unwrap()).map(|(t, _)| t).unwrap_or_default()).collect()
}

fn check(name: &str, opts: BatchOptions, plans: &[Plan]) -> u64 {
    let be = cpu();
    let model = load(name, &be);
    let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
    let got = run(&mut engine, &model, plans);
    for (i, (p, g)) in plans.iter().zip(&got).enumerate() {
        let want = alone(&model, &be, &request(&model, p));
        assert_eq!(g, &want, "{name}: request {i} {p:?} differs from its output alone");
    }
    assert_eq!(engine.blocks_free(), engine.blocks_total(), "{name}: blocks left held");
    engine.preemptions()
}

#[test]
fn batched_greedy_equals_each_request_alone() {
    // prompts longer than a step's budget prefill in chunks beside running decodes
    let plans = [(0, 5, 12, 1), (0, 45, 6, 2), (2, 1, 9, 3), (5, 20, 15, 4), (7, 70, 4, 5), (7, 3, 3, 6)];
    let opts = BatchOptions { blocks: 64, max_batch_tokens: 24, max_seqs: 8, max_len: 256 };
    for name in ["tiny-qwen3", "tiny-llama", "tiny-qwen3-moe", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-4bit-g64"] {
        check(name, opts, &plans);
    }
}

#[test]
fn preempted_sequences_are_recomputed_to_the_same_output() {
    // four sequences of 50 positions (4 blocks each) in a cache of 8 blocks
    let plans = [(0, 20, 30, 11), (0, 18, 30, 12), (1, 22, 28, 13), (1, 19, 31, 14)];
    let opts = BatchOptions { blocks: 8, max_batch_tokens: 64, max_seqs: 4, max_len: 128 };
    let preempted = check("tiny-qwen3", opts, &plans);
    assert!(preempted > 0, "the scenario was meant to preempt");
}

#[test]
fn cancelled_and_rejected_requests_hold_no_blocks() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let opts = BatchOptions { blocks: 4, max_batch_tokens: 16, max_seqs: 4, max_len: 48 };
    let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
    let vocab = model.decoder.cfg.vocab_size;
    let req = |len: usize, n: usize| Request {
        prompt: tokens(len, vocab, 7),
        max_new_tokens: n,
        stop_ids: vec![],
        sampling: SamplingParams::greedy(),
    };
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
    // a sequence that fills its context ends there, as a Session of that context does
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
    let mut s = Session::new(&model.decoder, &be, 48).unwrap();
    let want = s.generate(&req(40, 100).prompt, &greedy(100), |_| Ok(true)).unwrap();
    assert_eq!((got, StopReason::ContextFull), (want.tokens, want.stop));
    assert_eq!(engine.blocks_free(), engine.blocks_total());
}
