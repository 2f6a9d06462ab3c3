//! Speculative decoding against plain decoding: greedy output is the same
//! token for token with every proposer and k, the stop reason and the
//! context left behind are the same, and at temperature 1 the first
//! speculative token is distributed as the target's softmax.

mod common;

use common::{cpu, load, tokens, ALL_MODELS};
use fusebox_core::Backend;
use fusebox_engine::spec::{Draft, ProposeCtx, Round};
use fusebox_engine::{
    DraftModel, GenerateOptions, GenerateOutput, PromptLookup, Proposer, SamplingParams, Session, SpecOptions,
    SpecStats,
};
use fusebox_models::Model;

const N: usize = 256;

/// A prompt that repeats itself, so prompt lookup finds matches.
fn prompt(vocab: usize) -> Vec<u32> {
    let p = tokens(12, vocab, 7);
    [&p[..], &p[..], &p[..6]].concat()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, stop_ids: vec![], sampling: SamplingParams::greedy() }
}

fn plain(
    model: &Model,
    be: &dyn Backend,
    prompt: &[u32],
    opts: &GenerateOptions,
    ctx: usize,
) -> (GenerateOutput, Vec<u32>) {
    let mut s = Session::new(&model.decoder, be, ctx).unwrap();
    let out = s.generate(prompt, opts, |_| Ok(true)).unwrap();
    (out, s.tokens.clone())
}

fn spec(
    model: &Model,
    be: &dyn Backend,
    prompt: &[u32],
    opts: &GenerateOptions,
    ctx: usize,
    k: usize,
    p: &mut dyn Proposer,
) -> (GenerateOutput, SpecStats, Vec<u32>) {
    let mut s = Session::new(&model.decoder, be, ctx).unwrap();
    let so = SpecOptions { k, trace: true };
    let (out, stats) = s.generate_speculative(prompt, opts, &so, p, |_| Ok(true)).unwrap();
    (out, stats, s.tokens.clone())
}

/// The bookkeeping every run must satisfy.
fn check_stats(stats: &SpecStats, out: &GenerateOutput, k: usize, what: &str) {
    let trace = stats.trace.as_ref().unwrap();
    assert_eq!(trace.len(), stats.rounds, "{what}");
    assert_eq!(trace.iter().map(|r| r.proposed.len()).sum::<usize>(), stats.drafted, "{what}");
    assert_eq!(trace.iter().map(|r| r.accepted).sum::<usize>(), stats.accepted, "{what}");
    assert!(trace.iter().all(|r| r.proposed.len() <= k && r.accepted <= r.proposed.len()), "{what}");
    // every round emits its accepted drafts and a bonus (the last may stop early)
    assert!(stats.accepted + stats.rounds + 1 >= out.tokens.len(), "{what}");
}

#[test]
fn prompt_lookup_greedy_equals_plain_greedy() {
    let be = cpu();
    for name in ALL_MODELS {
        let model = load(name, &be);
        let prompt = prompt(model.config().vocab_size);
        let (want, want_ctx) = plain(&model, &be, &prompt, &greedy(N), 512);
        for k in [1, 4, 8, 16] {
            let mut p = PromptLookup::new(3).unwrap();
            let (got, stats, ctx) = spec(&model, &be, &prompt, &greedy(N), 512, k, &mut p);
            let what = format!("{name} ngram k={k}");
            assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
            assert_eq!(got.stop, want.stop, "{what}");
            assert_eq!(ctx, want_ctx, "{what}: context left behind");
            check_stats(&stats, &got, k, &what);
            assert!(stats.drafted > 0, "{what}: prompt lookup never drafted");
            eprintln!("{what}: {}", stats.summary());
        }
    }
}

#[test]
fn draft_model_greedy_equals_plain_greedy() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let prompt = prompt(target.config().vocab_size);
    let (want, want_ctx) = plain(&target, &be, &prompt, &greedy(N), 512);
    for draft_name in ["tiny-qwen3", "tiny-llama", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-moe-4bit-g64"] {
        let draft = load(draft_name, &be);
        for k in [1, 4, 8, 16] {
            let mut p = DraftModel::new(&target, &draft, &be, 512).unwrap();
            let (got, stats, ctx) = spec(&target, &be, &prompt, &greedy(N), 512, k, &mut p);
            let what = format!("tiny-qwen3 drafted by {draft_name} k={k}");
            assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
            assert_eq!(ctx, want_ctx, "{what}: context left behind");
            check_stats(&stats, &got, k, &what);
            if draft_name == "tiny-qwen3" {
                // the model drafting for itself: everything is accepted
                assert_eq!(stats.accepted, stats.drafted, "{what}: {}", stats.summary());
                assert!(stats.mean_accepted() > k as f64 * 0.9, "{what}: {}", stats.summary());
            }
            eprintln!("{what}: {}", stats.summary());
        }
    }
}

#[test]
fn a_draft_that_always_disagrees_still_gives_plain_greedy() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let draft = load("tiny-qwen3", &be);
    let prompt = prompt(target.config().vocab_size);
    let (want, want_ctx) = plain(&target, &be, &prompt, &greedy(N), 512);
    for k in [1, 4, 8, 16] {
        let mut p = Disagree {
            inner: DraftModel::new(&target, &draft, &be, 512).unwrap(),
            full: [&prompt[..], &want.tokens[..]].concat(),
            vocab: target.config().vocab_size as u32,
        };
        let (got, stats, ctx) = spec(&target, &be, &prompt, &greedy(N), 512, k, &mut p);
        let what = format!("always-disagreeing draft k={k}");
        assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
        assert_eq!(ctx, want_ctx, "{what}");
        assert_eq!(stats.accepted, 0, "{what}: {}", stats.summary());
        // every round drafts (but the last, which has room for the bonus only)
        let trace = stats.trace.as_ref().unwrap();
        assert!(trace[..trace.len() - 1].iter().all(|r: &Round| !r.proposed.is_empty()), "{what}");
    }
}

/// A draft model whose every first draft is wrong: it proposes one more
/// than the token the target will choose (known from plain greedy output),
/// so each round rejects at once and both caches roll back every round.
struct Disagree<'m> {
    inner: DraftModel<'m>,
    full: Vec<u32>,
    vocab: u32,
}

impl Proposer for Disagree<'_> {
    fn name(&self) -> &'static str {
        "disagree"
    }
    fn propose(&mut self, ctx: &ProposeCtx<'_>, k: usize, draft: &mut Draft) -> anyhow::Result<()> {
        self.inner.propose(ctx, k, draft)?;
        let next = self.full[ctx.tokens.len()];
        if let Some(t) = draft.tokens.first_mut() {
            *t = (next + 1) % self.vocab;
        }
        Ok(())
    }
}

#[test]
fn stops_and_context_end_as_plain_decoding_does() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let prompt = prompt(model.config().vocab_size);
    let (free, _) = plain(&model, &be, &prompt, &greedy(64), 512);
    // an EOS that appears mid-output, a tight context, max_tokens inside a round
    let eos = free.tokens[20];
    let cases = [
        (GenerateOptions { stop_ids: vec![eos], ..greedy(64) }, 512),
        (greedy(64), prompt.len() + 13),
        (greedy(7), 512),
        (greedy(1), 512),
    ];
    for (opts, ctx) in cases {
        let (want, want_ctx) = plain(&model, &be, &prompt, &opts, ctx);
        for k in [1, 4, 16] {
            for draft_self in [false, true] {
                let draft = load("tiny-qwen3", &be);
                let mut ng = PromptLookup::new(3).unwrap();
                let mut dm = DraftModel::new(&model, &draft, &be, ctx).unwrap();
                let p: &mut dyn Proposer = if draft_self { &mut dm } else { &mut ng };
                let (got, _, got_ctx) = spec(&model, &be, &prompt, &opts, ctx, k, p);
                let what = format!("{:?} ctx {ctx} k={k} self-draft {draft_self}", opts.stop_ids);
                assert_eq!(got.tokens, want.tokens, "{what}");
                assert_eq!(got.stop, want.stop, "{what}");
                assert_eq!(got_ctx, want_ctx, "{what}: context left behind");
            }
        }
    }
}

#[test]
fn speculation_errors_are_clear() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let mut s = Session::new(&model.decoder, &be, 64).unwrap();
    let mut p = PromptLookup::new(2).unwrap();
    for k in [0, 32] {
        let e = s
            .generate_speculative(&[1, 2], &greedy(4), &SpecOptions { k, trace: false }, &mut p, |_| Ok(true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--spec-k must be between 1 and 31"), "{e}");
    }
    assert!(PromptLookup::new(0).is_err());
}
