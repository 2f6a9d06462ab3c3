//! Continuous-batching scenarios: requests that join a [`BatchEngine`] at
//! given steps, run to the end, and the same requests run alone.

use std::collections::HashMap;

use fusebox_core::Backend;
use fusebox_engine::{BatchEngine, BatchOptions, Request, SamplingParams, SeqId, StopReason};
use fusebox_models::Model;

use super::tokens;

/// One request of a scenario: joins before step `join`, prompt length,
/// tokens to generate, prompt seed.
pub type Plan = (usize, usize, usize, u64);

pub fn request(model: &Model, &(_, len, n, seed): &Plan) -> Request {
    Request {
        prompt: tokens(len, model.decoder.cfg.vocab_size, seed),
        max_new_tokens: n,
        stop_ids: vec![],
        sampling: SamplingParams::greedy(),
    }
}

/// The request's greedy output run alone (a `Session`'s low-level steps).
pub fn alone(model: &Model, be: &dyn Backend, req: &Request) -> Vec<u32> {
    let ctx = req.prompt.len() + req.max_new_tokens + 1;
    super::draws(&model.decoder, be, ctx, &req.prompt, &SamplingParams::greedy(), req.max_new_tokens)
}

/// Run the scenario to the end: each request's tokens, in plan order.
pub fn run(engine: &mut BatchEngine, model: &Model, plans: &[Plan]) -> Vec<Vec<u32>> {
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

/// Run `plans` through a [`BatchEngine`] of `opts` on `be` and check every
/// request's tokens against the request alone and every block free at the
/// end; returns the preemptions.
pub fn check(be: &dyn Backend, name: &str, opts: BatchOptions, plans: &[Plan]) -> u64 {
    let model = super::load(name, be);
    let mut engine = BatchEngine::new(&model.decoder, be, opts).unwrap();
    let got = run(&mut engine, &model, plans);
    for (i, (p, g)) in plans.iter().zip(&got).enumerate() {
        let want = alone(&model, be, &request(&model, p));
        assert_eq!(g, &want, "{name}: request {i} {p:?} differs from its output alone");
    }
    assert_eq!(engine.blocks_free(), engine.blocks_total(), "{name}: blocks left held");
    engine.preemptions()
}

/// Prompts longer than a step's budget (prefilled in chunks beside running
/// decodes), requests joining mid-way.
pub const MIXED: [Plan; 6] = [(0, 5, 12, 1), (0, 45, 6, 2), (2, 1, 9, 3), (5, 20, 15, 4), (7, 70, 4, 5), (7, 3, 3, 6)];

/// A step budget under the longer prompts of [`MIXED`].
pub const MIXED_OPTS: BatchOptions = BatchOptions { blocks: 64, max_batch_tokens: 24, max_seqs: 8, max_len: 256 };

/// Four sequences of 50 positions (4 blocks each) in a cache of 8 blocks.
pub const CROWDED: [Plan; 4] = [(0, 20, 30, 11), (0, 18, 30, 12), (1, 22, 28, 13), (1, 19, 31, 14)];

/// A cache too small for [`CROWDED`] at once: preemptions.
pub const CROWDED_OPTS: BatchOptions = BatchOptions { blocks: 8, max_batch_tokens: 64, max_seqs: 4, max_len: 128 };

/// Seeded sampling with every filter and the repetition penalty.
pub fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.02,
        repeat_penalty: 1.3,
        repeat_last_n: 16,
        seed,
    }
}

/// Requests one after another through an engine of one sequence (greedy and
/// seeded, so the lone decode pass is replayed across sequences with
/// another's parameters and history) give what a `Session`'s steps give,
/// token for token; the engine never runs a paged pass.
pub fn lone_equals_session(be: &dyn Backend, name: &str) {
    let model = super::load(name, be);
    let vocab = model.decoder.cfg.vocab_size;
    let opts = BatchOptions { blocks: 8, max_batch_tokens: 64, max_seqs: 1, max_len: 128 };
    let mut engine = BatchEngine::new(&model.decoder, be, opts).unwrap();
    for (i, sampling) in [seeded(5), SamplingParams::greedy(), seeded(6), seeded(5)].into_iter().enumerate() {
        let req = Request {
            prompt: tokens(5 + 9 * i, vocab, i as u64),
            max_new_tokens: 30,
            stop_ids: vec![],
            sampling: sampling.clone(),
        };
        let want = super::draws(&model.decoder, be, 128, &req.prompt, &sampling, 30);
        let id = engine.add(req).unwrap();
        let mut got = vec![];
        while !engine.is_idle() {
            got.extend(engine.step().unwrap().iter().filter(|e| e.id == id).filter_map(|e| e.token));
        }
        assert_eq!(got, want, "{name}: request {i} through the engine differs from a Session's");
    }
    assert_eq!(engine.passes().0, 0, "{name}: a lone sequence ran a paged pass");
}

/// `BatchEngine::generate` alone (what the CLI runs) against a `Session`'s
/// steps, plain and speculative (prompt lookup): the same tokens, greedy
/// and seeded (speculation seeded: reproducible, and drafts accepted).
pub fn generate_equals_session(be: &dyn Backend, name: &str) {
    let model = super::load(name, be);
    let vocab = model.decoder.cfg.vocab_size;
    let p = tokens(12, vocab, 7);
    let prompt = [&p[..], &p[..], &p[..6]].concat();
    let mut engine = BatchEngine::lone(&model.decoder, be, 256).unwrap();
    for sampling in [SamplingParams::greedy(), SamplingParams { temperature: 0.3, ..seeded(2) }] {
        let want = super::draws(&model.decoder, be, 256, &prompt, &sampling, 60);
        let greedy = sampling.is_greedy();
        let o = fusebox_engine::GenerateOptions { max_new_tokens: 60, stop_ids: vec![], sampling };
        let (got, _) = engine.generate(&prompt, &o, &mut None, |_| Ok(true)).unwrap();
        assert_eq!((&got.tokens, got.stop), (&want, StopReason::MaxTokens), "{name}: plain");
        let so = fusebox_engine::SpecOptions { k: 4, trace: true };
        let mut runs = vec![];
        for _ in 0..2 {
            let proposer = Box::new(fusebox_engine::PromptLookup::new(3).unwrap());
            let mut spec = Some(fusebox_engine::Speculation { options: so, proposer });
            let (got, stats) = engine.generate(&prompt, &o, &mut spec, |_| Ok(true)).unwrap();
            assert_eq!(got.tokens.len(), 60, "{name}: speculative");
            runs.push((got.tokens, stats.unwrap().trace));
        }
        assert_eq!(runs[0], runs[1], "{name}: speculation with a seed reproduces");
        if greedy {
            assert_eq!(runs[0].0, want, "{name}: greedy speculation is plain greedy");
            assert!(runs[0].1.as_ref().unwrap().iter().any(|r| r.accepted > 0), "{name}: no draft accepted");
        }
    }
}
