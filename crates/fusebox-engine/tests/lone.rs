//! One request at a time through the engine (`BatchEngine::lone` and
//! `generate`, what the CLI runs): a `Session`'s draws cut by the stop
//! rules (the same tokens, stop and step counts, greedy and seeded, with
//! stop tokens, a callback that stops and a full context), speculation
//! equal to plain greedy; and a chat's next turn reuses the cache of the
//! last (prefix reuse), prefilling only what it adds, with the same output
//! as a fresh start.

mod common;

use common::batch::seeded;
use common::{cpu, greedy, load, tokens};
use fusebox_core::fixtures::fixture;
use fusebox_engine::{
    BatchEngine, DFlash, GenerateOptions, GenerateOutput, PromptLookup, SamplingParams, SpecOptions, Speculation,
    StopReason,
};
use fusebox_models::dflash::DFlashDraft;
use fusebox_models::Model;

fn opts(n: usize, sampling: SamplingParams, stop_ids: Vec<u32>) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, stop_ids, sampling }
}

/// What generation must give: a `Session`'s draws after `prompt`
/// ([`common::draws`]) cut by the stop rules, checked in this order: a stop
/// token ends it unseen, the callback's `false` after `stop_after` tokens,
/// `max_new_tokens`, a full context (the last token drawn needs no room).
/// Decode steps are the draws after the first, a stop token's included.
fn expected(
    model: &Model,
    be: &dyn fusebox_core::Backend,
    ctx: usize,
    prompt: &[u32],
    o: &GenerateOptions,
    stop_after: usize,
) -> GenerateOutput {
    let room = ctx - prompt.len() + 1;
    let drawn = common::draws(&model.decoder, be, ctx, prompt, &o.sampling, o.max_new_tokens.min(room));
    let mut out = GenerateOutput {
        prompt_tokens: prompt.len(),
        tokens: vec![],
        stop: StopReason::MaxTokens,
        prefill_secs: 0.0,
        decode_secs: 0.0,
        decode_steps: 0,
    };
    for (i, &t) in drawn.iter().enumerate() {
        out.decode_steps = i;
        if o.stop_ids.contains(&t) {
            out.stop = StopReason::Eos;
            return out;
        }
        out.tokens.push(t);
        let stop = if out.tokens.len() >= stop_after {
            Some(StopReason::Callback)
        } else if out.tokens.len() >= o.max_new_tokens {
            Some(StopReason::MaxTokens)
        } else if out.tokens.len() >= room {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        if let Some(why) = stop {
            out.stop = why;
            return out;
        }
    }
    unreachable!("the draws end on a stop")
}

fn same(got: &GenerateOutput, want: &GenerateOutput, what: &str) {
    assert_eq!(got.tokens, want.tokens, "{what}: tokens");
    assert_eq!(got.stop, want.stop, "{what}: stop");
    assert_eq!(got.decode_steps, want.decode_steps, "{what}: decode steps");
    assert_eq!(got.prompt_tokens, want.prompt_tokens, "{what}: prompt tokens");
}

#[test]
fn the_engine_alone_generates_as_a_session() {
    let be = cpu();
    for name in ["tiny-qwen3", "tiny-llama", "tiny-qwen3-moe", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-4bit-g64"] {
        let model = load(name, &be);
        let vocab = model.decoder.cfg.vocab_size;
        let prompt = tokens(11, vocab, 3);
        let plain = expected(&model, &be, 256, &prompt, &greedy(40), usize::MAX);
        // a stop token the greedy output meets
        let stop = plain.tokens[12];
        let cases = [
            ("greedy", 256, opts(40, SamplingParams::greedy(), vec![]), usize::MAX, StopReason::MaxTokens),
            ("seeded", 256, opts(40, seeded(4), vec![]), usize::MAX, StopReason::MaxTokens),
            ("stop token", 256, opts(40, SamplingParams::greedy(), vec![stop]), usize::MAX, StopReason::Eos),
            ("callback", 256, opts(40, seeded(5), vec![]), 7, StopReason::Callback),
            ("full context", 30, opts(40, SamplingParams::greedy(), vec![]), usize::MAX, StopReason::ContextFull),
        ];
        let mut engine = BatchEngine::lone(&model.decoder, &be, 256).unwrap();
        for (what, ctx, o, stop_after, why) in cases {
            let want = expected(&model, &be, ctx, &prompt, &o, stop_after);
            assert_eq!(want.stop, why, "{name} {what}: the case was meant to end so");
            let mut e = if ctx == 256 { None } else { Some(BatchEngine::lone(&model.decoder, &be, ctx).unwrap()) };
            let engine = e.as_mut().unwrap_or(&mut engine);
            let mut n = 0;
            let (got, stats) = engine
                .generate(&prompt, &o, &mut None, |_| {
                    n += 1;
                    Ok(n < stop_after)
                })
                .unwrap();
            same(&got, &want, &format!("{name} {what}"));
            assert!(stats.is_none());
            assert!(engine.is_idle() && engine.blocks_free() == engine.blocks_total(), "{name} {what}: left held");
        }
        assert_eq!(engine.passes().0, 0, "{name}: a lone request ran a paged pass");
    }
}

/// Speculation alone: greedy output is plain greedy's (prompt lookup,
/// DFlash), a seed reproduces a sampled run, the proposer comes back.
#[test]
fn speculation_alone_in_the_engine_is_plain_greedy_and_reproducible() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let vocab = model.decoder.cfg.vocab_size;
    let p = tokens(12, vocab, 7);
    let prompt = [&p[..], &p[..], &p[..6]].concat();
    let dflash = || {
        let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
        Box::new(DFlash::new(draft, &model.decoder, &be, 256).unwrap()) as Box<dyn fusebox_engine::Proposer>
    };
    let ngram = || Box::new(PromptLookup::new(3).unwrap()) as Box<dyn fusebox_engine::Proposer>;
    for (what, make, sampling) in [
        ("ngram greedy", &ngram as &dyn Fn() -> _, SamplingParams::greedy()),
        ("ngram seeded", &ngram, SamplingParams { temperature: 0.3, ..seeded(2) }),
        ("dflash greedy", &dflash, SamplingParams::greedy()),
    ] {
        let greedy = sampling.is_greedy();
        let o = opts(60, sampling, vec![]);
        let so = SpecOptions { k: 3, trace: true };
        let mut engine = BatchEngine::lone(&model.decoder, &be, 256).unwrap();
        let mut runs = vec![];
        for _ in 0..2 {
            let mut spec = Some(Speculation { options: so, proposer: make() });
            let (got, stats) = engine.generate(&prompt, &o, &mut spec, |_| Ok(true)).unwrap();
            assert!(spec.is_some(), "{what}: the proposer comes back");
            assert!(stats.as_ref().unwrap().drafted > 0, "{what}: nothing drafted");
            runs.push(got);
        }
        assert_eq!(runs[0].tokens, runs[1].tokens, "{what}: not reproducible");
        if greedy {
            same(&runs[0], &expected(&model, &be, 256, &prompt, &o, usize::MAX), what);
        }
    }
}

/// A chat: each turn's prompt is the last context plus new text. With
/// prefix reuse the engine prefills only the new part, and answers as a
/// fresh start on the whole prompt does (plain and with a DFlash draft that
/// follows the reused context).
#[test]
fn a_next_turn_reuses_the_last_context() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let vocab = model.decoder.cfg.vocab_size;
    for with_dflash in [false, true] {
        let mut engine = BatchEngine::lone(&model.decoder, &be, 256).unwrap();
        engine.set_prefix_reuse(true);
        let mut spec = with_dflash.then(|| {
            let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
            let d = DFlash::new(draft, &model.decoder, &be, 256).unwrap();
            Speculation { options: SpecOptions { k: 3, trace: false }, proposer: Box::new(d) as Box<_> }
        });
        let mut context = tokens(20, vocab, 11);
        for turn in 0..3 {
            let (got, _) = engine.generate(&context, &greedy(25), &mut spec, |_| Ok(true)).unwrap();
            let want = expected(&model, &be, 256, &context, &greedy(25), usize::MAX);
            assert_eq!(got.tokens, want.tokens, "turn {turn} (dflash: {with_dflash})");
            let reused = if turn == 0 { 0 } else { context.len() - 7 - 1 };
            assert!(
                got.prompt_tokens <= context.len() - reused,
                "turn {turn}: {} prompt tokens ran",
                got.prompt_tokens
            );
            context.extend_from_slice(&got.tokens);
            context.extend_from_slice(&tokens(7, vocab, 20 + turn));
        }
        // a prompt that shares nothing starts over
        let other = tokens(15, vocab, 99);
        let (got, _) = engine.generate(&other, &greedy(10), &mut spec, |_| Ok(true)).unwrap();
        assert_eq!(got.prompt_tokens, 15);
        assert_eq!(got.tokens, expected(&model, &be, 256, &other, &greedy(10), usize::MAX).tokens);
    }
}

#[test]
fn nothing_to_generate_runs_nothing() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let mut engine = BatchEngine::lone(&model.decoder, &be, 64).unwrap();
    let (out, _) = engine.generate(&[1, 2, 3], &greedy(0), &mut None, |_| Ok(true)).unwrap();
    assert!(out.tokens.is_empty() && engine.is_idle());
    assert!(engine.generate(&[], &greedy(4), &mut None, |_| Ok(true)).is_err());
    assert!(engine.is_idle(), "a refused request leaves nothing behind");
}

#[test]
fn generate_alone_equals_the_session_loop_across_formats() {
    let be = cpu();
    for name in ["tiny-qwen3", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-4bit-g64"] {
        common::batch::generate_equals_session(&be, name);
    }
}
