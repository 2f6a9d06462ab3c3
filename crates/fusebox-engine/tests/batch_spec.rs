//! Speculative decoding inside the batched engine (the CPU, f32, the tiny
//! fixtures): sequences with a proposer run their drafts as rows of the
//! shared step, beside plain sequences and prompts being prefilled, and each
//! request's output is what it gives alone: plain greedy's, token for token,
//! and with a seed the same tokens as `Session`'s speculative loop.

mod common;

use std::collections::HashMap;

use common::batch::seeded;
use common::{cpu, greedy, load, tokens};
use fusebox_core::fixtures::fixture;
use fusebox_core::Tensor;
use fusebox_engine::spec::{Draft, ProposeCtx};
use fusebox_engine::DFlash;
use fusebox_engine::{
    BatchEngine, BatchOptions, DraftModel, GenerateOptions, Observer, PromptLookup, Proposer, Request, SamplingParams,
    SeqId, SpecOptions, Speculation, StopReason,
};
use fusebox_models::dflash::DFlashDraft;

/// A prompt that repeats itself, so prompt lookup finds matches.
fn looping(vocab: usize, seed: u64, len: usize) -> Vec<u32> {
    let p = tokens(len, vocab, seed);
    [&p[..], &p[..], &p[..len / 2]].concat()
}

fn request(prompt: Vec<u32>, n: usize, sampling: SamplingParams) -> Request {
    Request { prompt, max_new_tokens: n, stop_ids: vec![], sampling }
}

fn ngram<'m>(k: usize) -> Speculation<'m> {
    Speculation { options: SpecOptions { k, trace: false }, proposer: Box::new(PromptLookup::new(3).unwrap()) }
}

/// Run `reqs` (joining before step `join`, with speculation or without)
/// to the end: each one's tokens.
fn run<'m>(engine: &mut BatchEngine<'m>, reqs: Vec<(usize, Request, Option<Speculation<'m>>)>) -> Vec<Vec<u32>> {
    run_ids(engine, reqs).1
}

/// [`run`], with the sequences' ids.
fn run_ids<'m>(
    engine: &mut BatchEngine<'m>,
    reqs: Vec<(usize, Request, Option<Speculation<'m>>)>,
) -> (Vec<SeqId>, Vec<Vec<u32>>) {
    let mut ids: Vec<Option<SeqId>> = vec![None; reqs.len()];
    let mut reqs: Vec<_> = reqs.into_iter().map(Some).collect();
    let mut out: HashMap<SeqId, Vec<u32>> = HashMap::new();
    for step in 0..10_000 {
        for (r, id) in reqs.iter_mut().zip(ids.iter_mut()) {
            if r.as_ref().is_some_and(|r| r.0 <= step) {
                let (_, req, spec) = r.take().unwrap();
                *id = Some(engine.add_with(req, None, spec).unwrap());
            }
        }
        if engine.is_idle() && reqs.iter().all(Option::is_none) {
            break;
        }
        for e in engine.step().unwrap() {
            out.entry(e.id).or_default().extend(e.token);
            if let Some(why) = e.finished {
                assert_eq!(why, StopReason::MaxTokens, "sequence {} ended early", e.id);
            }
        }
    }
    assert!(engine.is_idle(), "the scenario did not finish");
    let ids: Vec<SeqId> = ids.into_iter().map(Option::unwrap).collect();
    let out = ids.iter().map(|id| out.remove(id).unwrap_or_default()).collect();
    (ids, out)
}

/// The request's plain greedy output alone (a `Session`'s steps).
fn alone(model: &fusebox_models::Model, be: &dyn fusebox_core::Backend, req: &Request) -> Vec<u32> {
    let ctx = req.prompt.len() + req.max_new_tokens + 1;
    common::draws(&model.decoder, be, ctx, &req.prompt, &SamplingParams::greedy(), req.max_new_tokens)
}

#[test]
fn speculative_sequences_in_a_batch_give_plain_greedy_output() {
    let be = cpu();
    for name in ["tiny-qwen3", "tiny-llama", "tiny-qwen3-moe", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-4bit-g64"] {
        let model = load(name, &be);
        let draft = load("tiny-qwen3", &be);
        let vocab = model.decoder.cfg.vocab_size;
        let g = SamplingParams::greedy;
        let plan = || {
            let r = |seed, len, n| request(looping(vocab, seed, len), n, g());
            let self_draft = (name == "tiny-qwen3").then(|| Speculation {
                options: SpecOptions { k: 4, trace: false },
                proposer: Box::new(DraftModel::new(&model, &draft, &be, 256).unwrap()) as Box<dyn Proposer>,
            });
            vec![
                (0, r(1, 12, 40), Some(ngram(8))),
                (0, r(2, 6, 30), None),
                (2, r(3, 20, 50), Some(ngram(16))),
                (3, request(tokens(70, vocab, 4), 12, g()), None),
                (5, r(5, 9, 35), self_draft.or_else(|| Some(ngram(31)))),
            ]
        };
        let opts = BatchOptions { blocks: 64, max_batch_tokens: 24, max_seqs: 8, max_len: 256 };
        let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
        let want: Vec<Vec<u32>> = plan().iter().map(|(_, r, _)| alone(&model, &be, r)).collect();
        let got = run(&mut engine, plan());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{name}: request {i} differs from its plain greedy output alone");
        }
        let (rounds, drafted, accepted) = engine.spec_totals();
        assert!(accepted > 0, "{name}: no draft accepted ({rounds} rounds, {drafted} drafted)");
        assert_eq!(engine.blocks_free(), engine.blocks_total(), "{name}: blocks left held");
        eprintln!("{name}: {rounds} rounds, {drafted} drafted, {accepted} accepted");
    }
}

/// A speculative sequence with a seed draws the same in a batch as alone
/// (`generate` on an engine of one: its rounds there are one repeating pass
/// with the argmax on the backend): the same rows, the same acceptance
/// stream, with a plain sequence beside it for a while or not.
#[test]
fn seeded_speculation_in_a_batch_draws_as_alone() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let vocab = model.decoder.cfg.vocab_size;
    let prompt = looping(vocab, 8, 10);
    // cool enough that the tiny random model's choices follow the loop sometimes
    let sampling = SamplingParams { temperature: 0.3, repeat_penalty: 1.05, ..seeded(3) };
    let opts = GenerateOptions { max_new_tokens: 60, stop_ids: vec![], sampling: sampling.clone() };
    let mut p = PromptLookup::new(3).unwrap();
    let so = SpecOptions { k: 6, trace: false };
    let (out, stats) = common::speculate(&model.decoder, &be, 128, &prompt, &opts, so, &mut p);
    assert!(stats.accepted > 0, "the scenario was meant to accept drafts: {}", stats.summary());
    for beside in [false, true] {
        let opts = BatchOptions { blocks: 16, max_batch_tokens: 32, max_seqs: 2, max_len: 128 };
        let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
        let mut reqs = vec![(0, request(prompt.clone(), 60, sampling.clone()), Some(ngram(6)))];
        if beside {
            reqs.push((4, request(tokens(9, vocab, 1), 10, seeded(9)), None));
        }
        let got = run(&mut engine, reqs);
        assert_eq!(got[0], out.tokens, "beside: {beside}");
    }
}

/// Reads target layers, as DFlash does.
struct Tapping(Vec<usize>);

impl Proposer for Tapping {
    fn name(&self) -> &'static str {
        "tapping"
    }
    fn propose(&mut self, _ctx: &ProposeCtx<'_>, _k: usize, _draft: &mut Draft) -> anyhow::Result<()> {
        Ok(())
    }
    fn target_layers(&self) -> &[usize] {
        &self.0
    }
    fn observe(&mut self, _taps: &Tensor, _row0: usize, _first: usize, _rows: usize) -> anyhow::Result<()> {
        Ok(())
    }
}

struct Penalty;

impl Observer for Penalty {
    fn adjusts(&self) -> bool {
        true
    }
    fn drawn(&mut self, _raw: &[f32], _token: u32, _finished: Option<StopReason>) -> bool {
        true
    }
}

#[test]
fn speculation_the_engine_cannot_run_is_a_clear_error() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let opts = BatchOptions { blocks: 16, max_batch_tokens: 32, max_seqs: 2, max_len: 128 };
    let mut engine = BatchEngine::new(&model.decoder, &be, opts).unwrap();
    let req = || request(vec![1, 2, 3], 4, SamplingParams::greedy());
    let err = |r: anyhow::Result<SeqId>| format!("{:#}", r.unwrap_err());
    let tapping = |l: &[usize]| Speculation {
        options: SpecOptions { k: 4, trace: false },
        proposer: Box::new(Tapping(l.to_vec())),
    };
    assert!(err(engine.add_with(req(), None, Some(tapping(&[0, 99])))).contains("cannot capture layer 99"));
    let id = engine.add_with(req(), None, Some(tapping(&[0, 1]))).unwrap();
    assert!(err(engine.add_with(req(), None, Some(tapping(&[1])))).contains("captures [0, 1]"));
    assert!(engine.cancel(id));
    assert!(err(engine.add_with(req(), Some(Box::new(Penalty)), Some(ngram(4)))).contains("penalties"));
    assert!(err(engine.add_with(req(), None, Some(ngram(0)))).contains("--spec-k"));
    assert!(err(engine.add_with(req(), None, Some(ngram(32)))).contains("--spec-k"));
    assert!(engine.is_idle(), "a rejected request is not queued");
}

/// DFlash reads the target's layers at its own rows of each batched pass
/// (prompt chunks and verify rounds): beside plain sequences and another
/// DFlash sequence it drafts exactly what it drafts alone (`generate` on an
/// engine of one), round for round, and its output is plain greedy's.
#[test]
fn dflash_in_a_batch_drafts_as_it_does_alone() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let vocab = target.decoder.cfg.vocab_size;
    let dflash = |k| {
        let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
        let d = DFlash::new(draft, &target.decoder, &be, 256).unwrap();
        Speculation { options: SpecOptions { k, trace: true }, proposer: Box::new(d) as Box<dyn Proposer> }
    };
    let prompt = looping(vocab, 7, 12);
    let mut lone = BatchEngine::lone(&target.decoder, &be, 256).unwrap();
    let (want, stats) = lone.generate(&prompt, &greedy(80), &mut Some(dflash(3)), |_| Ok(true)).unwrap();
    let stats = stats.unwrap();
    assert!(stats.drafted > 0);
    assert_eq!(want.tokens, alone_greedy(&target, &be, &prompt, 80), "DFlash output is plain greedy's");
    let opts = BatchOptions { blocks: 64, max_batch_tokens: 24, max_seqs: 8, max_len: 256 };
    let mut engine = BatchEngine::new(&target.decoder, &be, opts).unwrap();
    let g = SamplingParams::greedy;
    let reqs = vec![
        (0, request(tokens(9, vocab, 1), 30, g()), None),
        (1, request(prompt.clone(), 80, g()), Some(dflash(3))),
        (2, request(looping(vocab, 3, 20), 40, g()), Some(dflash(2))),
        (4, request(tokens(70, vocab, 4), 12, g()), None),
    ];
    let (ids, got) = run_ids(&mut engine, reqs);
    assert_eq!(got[1], want.tokens, "the DFlash sequence's tokens differ from its output alone");
    let batched = engine.take_spec(ids[1]).expect("its speculation").1;
    assert_eq!(batched.trace, stats.trace, "the DFlash sequence drafted otherwise in the batch");
    assert!(engine.take_spec(ids[1]).is_none(), "taken once");
    let want2 = alone_greedy(&target, &be, &looping(vocab, 3, 20), 40);
    assert_eq!(got[2], want2);
}

fn alone_greedy(model: &fusebox_models::Model, be: &dyn fusebox_core::Backend, prompt: &[u32], n: usize) -> Vec<u32> {
    alone(model, be, &request(prompt.to_vec(), n, SamplingParams::greedy()))
}
