//! Speculative decoding against plain decoding, through the engine as
//! `generate` runs it: greedy output is the same token for token with every
//! proposer and k, the stop reason is the same, and at temperature 1 the
//! first speculative token is distributed as the target's softmax.

mod common;

use common::{cpu, greedy, load, tokens, ALL_MODELS};
use fusebox_core::Backend;
use fusebox_engine::spec::{Draft, ProposeCtx, Round};
use fusebox_engine::{
    BatchEngine, DraftModel, GenerateOptions, GenerateOutput, PromptLookup, Proposer, Request, SamplingParams,
    SpecOptions, SpecStats, Speculation,
};
use fusebox_models::Model;

const N: usize = 256;

/// A prompt that repeats itself, so prompt lookup finds matches.
fn prompt(vocab: usize) -> Vec<u32> {
    let p = tokens(12, vocab, 7);
    [&p[..], &p[..], &p[..6]].concat()
}

fn plain(model: &Model, be: &dyn Backend, prompt: &[u32], opts: &GenerateOptions, ctx: usize) -> GenerateOutput {
    common::generate(&model.decoder, be, ctx, prompt, opts)
}

fn spec(
    model: &Model,
    be: &dyn Backend,
    prompt: &[u32],
    opts: &GenerateOptions,
    ctx: usize,
    k: usize,
    p: &mut dyn Proposer,
) -> (GenerateOutput, SpecStats) {
    common::speculate(&model.decoder, be, ctx, prompt, opts, SpecOptions { k, trace: true }, p)
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
        let want = plain(&model, &be, &prompt, &greedy(N), 512);
        for k in [1, 4, 8, 16] {
            let mut p = PromptLookup::new(3).unwrap();
            let (got, stats) = spec(&model, &be, &prompt, &greedy(N), 512, k, &mut p);
            let what = format!("{name} ngram k={k}");
            assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
            assert_eq!(got.stop, want.stop, "{what}");
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
    let want = plain(&target, &be, &prompt, &greedy(N), 512);
    for draft_name in ["tiny-qwen3", "tiny-llama", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-moe-4bit-g64"] {
        let draft = load(draft_name, &be);
        for k in [1, 4, 8, 16] {
            let mut p = DraftModel::new(&target, &draft, &be, 512).unwrap();
            let (got, stats) = spec(&target, &be, &prompt, &greedy(N), 512, k, &mut p);
            let what = format!("tiny-qwen3 drafted by {draft_name} k={k}");
            assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
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
    let want = plain(&target, &be, &prompt, &greedy(N), 512);
    for k in [1, 4, 8, 16] {
        let mut p = Disagree {
            inner: DraftModel::new(&target, &draft, &be, 512).unwrap(),
            full: [&prompt[..], &want.tokens[..]].concat(),
            vocab: target.config().vocab_size as u32,
        };
        let (got, stats) = spec(&target, &be, &prompt, &greedy(N), 512, k, &mut p);
        let what = format!("always-disagreeing draft k={k}");
        assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
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
    let free = plain(&model, &be, &prompt, &greedy(64), 512);
    // an EOS that appears mid-output, a tight context, max_tokens inside a round
    let eos = free.tokens[20];
    let cases = [
        (GenerateOptions { stop_ids: vec![eos], ..greedy(64) }, 512),
        (greedy(64), prompt.len() + 13),
        (greedy(7), 512),
        (greedy(1), 512),
    ];
    for (opts, ctx) in cases {
        let want = plain(&model, &be, &prompt, &opts, ctx);
        for k in [1, 4, 16] {
            for draft_self in [false, true] {
                let draft = load("tiny-qwen3", &be);
                let mut ng = PromptLookup::new(3).unwrap();
                let mut dm = DraftModel::new(&model, &draft, &be, ctx).unwrap();
                let p: &mut dyn Proposer = if draft_self { &mut dm } else { &mut ng };
                let (got, _) = spec(&model, &be, &prompt, &opts, ctx, k, p);
                let what = format!("{:?} ctx {ctx} k={k} self-draft {draft_self}", opts.stop_ids);
                assert_eq!(got.tokens, want.tokens, "{what}");
                assert_eq!(got.stop, want.stop, "{what}");
            }
        }
    }
}

#[test]
fn speculation_errors_are_clear() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let mut p = PromptLookup::new(2).unwrap();
    for k in [0, 32] {
        let so = SpecOptions { k, trace: false };
        let e =
            common::try_speculate(&model.decoder, &be, 64, &[1, 2], &greedy(4), so, &mut p).unwrap_err().to_string();
        assert!(e.contains("--spec-k must be between 1 and 31"), "{e}");
    }
    assert!(PromptLookup::new(0).is_err());
}

/// The target drafting for itself at a higher temperature: its `q` is
/// close to the target's `p` but not equal, so the rejection rule both
/// accepts and resamples.
struct Hotter<'m>(DraftModel<'m>);

impl Proposer for Hotter<'_> {
    fn name(&self) -> &'static str {
        "hot"
    }
    fn propose(&mut self, ctx: &ProposeCtx<'_>, k: usize, draft: &mut Draft) -> anyhow::Result<()> {
        let sampling = SamplingParams { temperature: ctx.sampling.temperature * 1.6, ..ctx.sampling.clone() };
        self.0.propose(&ProposeCtx { sampling: &sampling, ..*ctx }, k, draft)
    }
}

/// Pearson's chi-square of `counts` against `probs` (buckets expected below
/// 5 draws lumped into one), and its critical value at p = 0.001
/// (Wilson-Hilferty).
fn chi_square(counts: &[u64], probs: &[f64]) -> (f64, f64, usize) {
    let n: u64 = counts.iter().sum();
    let (mut chi, mut buckets, mut rest_o, mut rest_e) = (0f64, 0usize, 0f64, 0f64);
    for (&c, &p) in counts.iter().zip(probs) {
        let e = p * n as f64;
        if e >= 5.0 {
            chi += (c as f64 - e).powi(2) / e;
            buckets += 1;
        } else {
            rest_o += c as f64;
            rest_e += e;
        }
    }
    if rest_e > 0.0 {
        chi += (rest_o - rest_e).powi(2) / rest_e.max(1e-9);
        buckets += 1;
    }
    let df = (buckets - 1) as f64;
    let z = 3.09; // one-sided 0.001
    let crit = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
    (chi, crit, buckets)
}

#[test]
fn sampled_first_token_follows_the_target_distribution() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let other = load("tiny-llama", &be);
    let vocab = target.config().vocab_size;
    let prompt = prompt(vocab);
    // the target's distribution after the whole prompt, from a full forward pass
    let logits = fusebox_engine::generate::full_logits(&target.decoder, &be, &prompt).unwrap();
    let last = &logits[(prompt.len() - 1) * vocab..];
    let settings = [
        SamplingParams { temperature: 1.0, ..SamplingParams::greedy() },
        SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.9, repeat_penalty: 1.3, ..SamplingParams::greedy() },
    ];
    const DRAWS: u64 = 3000;
    for params in settings {
        let mut want = Vec::new();
        let hist: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
        fusebox_core::sample::probabilities(
            last,
            &params.encode(),
            &hist,
            &mut fusebox_core::sample::Scratch::default(),
            &mut want,
        );
        let want: Vec<f64> = want.iter().map(|&p| p as f64).collect();
        for method in ["ngram", "self", "hot", "foreign"] {
            let mut ng = PromptLookup::new(3).unwrap();
            let mut own = DraftModel::new(&target, &target, &be, 128).unwrap();
            let mut foreign = DraftModel::new(&target, &other, &be, 128).unwrap();
            let mut hot = Hotter(DraftModel::new(&target, &target, &be, 128).unwrap());
            let p: &mut dyn Proposer = match method {
                "ngram" => &mut ng,
                "self" => &mut own,
                "hot" => &mut hot,
                _ => &mut foreign,
            };
            // one engine keeps the context (prefix reuse): each draw runs one round after the
            // prompt's last token, drawn already
            let mut engine = BatchEngine::lone(&target.decoder, &be, 128).unwrap();
            engine.set_prefix_reuse(true);
            let mut spec = Some(Speculation { options: SpecOptions { k: 4, trace: false }, proposer: Box::new(p) });
            let mut counts = vec![0u64; vocab];
            let mut events = vec![];
            for seed in 0..DRAWS {
                let sampling = SamplingParams { seed, ..params.clone() };
                let req = Request { prompt: prompt.clone(), max_new_tokens: 8, stop_ids: vec![], sampling };
                let id = engine.add_drawn(req, None, spec.take()).unwrap();
                // the context runs (once: then it is reused), then the round after `pending`
                let first = loop {
                    engine.step_into(&mut events).unwrap();
                    if let Some(t) = events.first().and_then(|e| e.token) {
                        break t;
                    }
                };
                assert!(engine.finish(id));
                spec = engine.take_spec(id).map(|(s, _)| s);
                counts[first as usize] += 1;
            }
            let accepted = engine.spec_totals().2;
            let (chi, crit, buckets) = chi_square(&counts, &want);
            eprintln!(
                "{method} T={} top_k={}: chi-square {chi:.1} over {buckets} buckets (critical {crit:.1}), {:.2} accepted per round",
                params.temperature,
                params.top_k,
                accepted as f64 / DRAWS as f64
            );
            assert!(buckets >= 3, "{method}: too few buckets to test");
            assert!(
                chi < crit,
                "{method}: chi-square {chi:.1} >= {crit:.1}: the first token is not distributed as the target's"
            );
            if method == "hot" {
                // q overlaps p without equalling it: some drafts pass, some are resampled
                let rate = accepted as f64 / DRAWS as f64;
                assert!(rate > 0.3 && rate < 3.5, "{method}: {rate:.2} accepted per round");
            }
            if method == "self" {
                assert!(
                    accepted as f64 / DRAWS as f64 > 3.0,
                    "{method}: a model drafting for itself should be accepted"
                );
            }
        }
    }
}

#[test]
fn sampled_speculation_is_reproducible_with_a_seed() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let draft = load("tiny-llama", &be);
    let prompt = prompt(target.config().vocab_size);
    let sampling = SamplingParams { temperature: 0.8, top_p: 0.95, seed: 42, ..SamplingParams::greedy() };
    let opts = GenerateOptions { max_new_tokens: 64, stop_ids: vec![], sampling };
    for draft_model in [false, true] {
        let run = || {
            let mut dm = DraftModel::new(&target, &draft, &be, 256).unwrap();
            let mut ng = PromptLookup::new(3).unwrap();
            let p: &mut dyn Proposer = if draft_model { &mut dm } else { &mut ng };
            spec(&target, &be, &prompt, &opts, 256, 4, p).0.tokens
        };
        let (a, b) = (run(), run());
        assert_eq!(a.len(), 64);
        assert_eq!(a, b, "draft model {draft_model}: the same seed gave different tokens");
    }
}

#[test]
fn smollm2_prompt_lookup_on_an_edit_request_equals_plain_greedy() {
    let Some(path) = common::smollm2("smollm2_prompt_lookup_on_an_edit_request_equals_plain_greedy") else { return };
    let be = cpu();
    let model = Model::load(&path, &be).unwrap();
    let prompt = common::chat_prompt(&model, common::EDIT_PROMPT);
    let want = plain(&model, &be, &prompt, &greedy(N), 1024);
    for k in [1, 4, 8, 16] {
        let mut p = PromptLookup::new(3).unwrap();
        let (got, stats) = spec(&model, &be, &prompt, &greedy(N), 1024, k, &mut p);
        let what = format!("SmolLM2 ngram k={k}");
        assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
        eprintln!("{what}: {}", stats.summary());
        // the answer copies a ~60-token paragraph from the prompt (then, past
        // its end-of-sequence token, rambles)
        if k >= 4 {
            assert!(stats.accepted >= 40, "{what}: the paragraph should be found in the prompt: {}", stats.summary());
        }
    }
}

#[test]
fn smollm2_q4_1_drafting_for_its_f32_dequantization_equals_plain_greedy() {
    let Some(path) = common::smollm2("smollm2_q4_1_drafting_for_its_f32_dequantization_equals_plain_greedy") else {
        return;
    };
    let be = cpu();
    let target = Model::load_with(&path, &be, true).unwrap();
    let draft = Model::load(&path, &be).unwrap();
    let prompt = common::chat_prompt(&target, "Write a short story about a lighthouse keeper and a storm.");
    let want = plain(&target, &be, &prompt, &greedy(N), 1024);
    for k in [1, 4, 8, 16] {
        let mut p = DraftModel::new(&target, &draft, &be, 1024).unwrap();
        let (got, stats) = spec(&target, &be, &prompt, &greedy(N), 1024, k, &mut p);
        let what = format!("SmolLM2 f32 drafted by Q4_1 k={k}");
        assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
        eprintln!("{what}: {}", stats.summary());
        assert!(stats.acceptance_rate() > 0.5, "{what}: {}", stats.summary());
    }
}
