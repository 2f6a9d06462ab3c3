//! DFlash drafting (tests/fixtures/tiny-dflash for tiny-qwen3): greedy
//! speculative output equals plain greedy decoding, with the draft's
//! context fed from the target's captured layers through prompt chunks and
//! verify passes (through the engine, as `generate` runs it); sampled
//! output reproduces with a seed.

mod common;

use common::{cpu, greedy, load, tokens};
use fusebox_core::fixtures::fixture;
use fusebox_engine::{BatchEngine, DFlash, GenerateOptions, SamplingParams, SpecOptions, Speculation};
use fusebox_models::dflash::DFlashDraft;

#[test]
fn dflash_greedy_equals_plain_greedy() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let vocab = target.config().vocab_size;
    // a repeating prompt, and one longer than a context chunk of the draft
    let p = tokens(12, vocab, 7);
    let prompts = [[&p[..], &p[..], &p[..6]].concat(), tokens(70, vocab, 3)];
    for prompt in &prompts {
        let want = common::generate(&target.decoder, &be, 512, prompt, &greedy(256));
        for k in [1, 2, 3] {
            let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
            let mut d = DFlash::new(draft, &target.decoder, &be, 512).unwrap();
            let so = SpecOptions { k, trace: true };
            let (got, stats) = common::speculate(&target.decoder, &be, 512, prompt, &greedy(256), so, &mut d);
            let what = format!("{}-token prompt, k={k}", prompt.len());
            assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
            assert!(stats.drafted > 0 && stats.trace.as_ref().unwrap().iter().all(|r| r.proposed.len() <= k), "{what}");
            eprintln!("{what}: {}", stats.summary());
        }
    }
}

/// One proposer over two generations of one engine with prefix reuse: the
/// second prompt shares a prefix with the first context, which the engine
/// keeps, and the draft's context follows.
#[test]
fn dflash_follows_an_engine_that_reuses_its_prefix() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let vocab = target.config().vocab_size;
    let first = tokens(20, vocab, 11);
    let second = [&first[..15], &tokens(9, vocab, 12)[..]].concat();
    let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
    let d = DFlash::new(draft, &target.decoder, &be, 256).unwrap();
    let mut engine = BatchEngine::lone(&target.decoder, &be, 256).unwrap();
    engine.set_prefix_reuse(true);
    let mut spec = Some(Speculation { options: SpecOptions { k: 3, trace: false }, proposer: Box::new(d) as Box<_> });
    engine.generate(&first, &greedy(40), &mut spec, |_| Ok(true)).unwrap();
    assert_eq!(engine.reusable_prefix(&second), 15);
    let (got, _) = engine.generate(&second, &greedy(40), &mut spec, |_| Ok(true)).unwrap();
    assert_eq!(got.prompt_tokens, 9, "only the new part of the prompt ran");
    let want = common::generate(&target.decoder, &be, 256, &second, &greedy(40));
    assert_eq!(got.tokens, want.tokens);
}

#[test]
fn sampled_dflash_is_reproducible_and_drafts() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let prompt = tokens(24, target.config().vocab_size, 5);
    let sampling = SamplingParams { temperature: 0.8, top_p: 0.95, seed: 42, ..SamplingParams::greedy() };
    let opts = GenerateOptions { max_new_tokens: 64, stop_ids: vec![], sampling };
    let run = || {
        let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
        let mut d = DFlash::new(draft, &target.decoder, &be, 256).unwrap();
        common::speculate(&target.decoder, &be, 256, &prompt, &opts, SpecOptions { k: 3, trace: false }, &mut d)
    };
    let ((a, sa), (b, _)) = (run(), run());
    assert_eq!(a.tokens.len(), 64);
    assert_eq!(a.tokens, b.tokens, "the same seed gave different tokens");
    assert!(sa.drafted > 0, "{}", sa.summary());
}

#[test]
fn a_draft_for_another_target_is_refused() {
    let be = cpu();
    let target = load("tiny-llama-linear", &be);
    let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
    let e = DFlash::new(draft, &target.decoder, &be, 64).err().expect("hidden sizes differ");
    assert!(format!("{e:#}").contains("hidden size"), "{e:#}");
}

#[test]
fn dflash_context_stays_in_step_when_drafts_are_accepted() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let prompt = tokens(40, target.config().vocab_size, 9);
    let want = common::generate(&target.decoder, &be, 512, &prompt, &greedy(200));
    let truth = [&prompt[..], &want.tokens[..]].concat();
    let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
    let mut o = common::Oracle { inner: DFlash::new(draft, &target.decoder, &be, 512).unwrap(), truth };
    let so = SpecOptions { k: 3, trace: false };
    let (got, stats) = common::speculate(&target.decoder, &be, 512, &prompt, &greedy(200), so, &mut o);
    assert_eq!(got.tokens, want.tokens);
    assert!(stats.mean_accepted() > 1.5, "{}", stats.summary());
}

/// The MLX-quantized form of a draft (`fusebox quantize` of the z-lab
/// layout, 4-bit groups of 32) loads, fits and keeps greedy output exact.
#[test]
fn an_mlx_quantized_dflash_draft_drafts_exactly() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q4");
    let opts = fusebox_models::mlx_quant::QuantizeOptions { bits: 4, group_size: 32, ..Default::default() };
    fusebox_models::mlx_quant::quantize_dir(&fixture("tiny-dflash"), &q, &opts, &mut |_| {}).unwrap();
    let draft = DFlashDraft::load(&q, &be).unwrap();
    assert!(draft.layers[0].wq.format().contains("4"), "{}", draft.layers[0].wq.format());
    let prompt = tokens(30, target.config().vocab_size, 21);
    let want = common::generate(&target.decoder, &be, 256, &prompt, &greedy(64));
    let mut d = DFlash::new(draft, &target.decoder, &be, 256).unwrap();
    let so = SpecOptions { k: 3, trace: false };
    let (got, stats) = common::speculate(&target.decoder, &be, 256, &prompt, &greedy(64), so, &mut d);
    assert_eq!(got.tokens, want.tokens);
    assert!(stats.drafted > 0);
}
