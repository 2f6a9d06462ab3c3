//! DFlash drafting (tests/fixtures/tiny-dflash for tiny-qwen3): greedy
//! speculative output equals plain greedy decoding, with the draft's
//! context fed from the target's captured layers through prompt chunks and
//! verify passes; sampled output reproduces with a seed.

mod common;

use common::{cpu, greedy, load, tokens};
use fusebox_core::fixtures::fixture;
use fusebox_engine::{DFlash, GenerateOptions, SamplingParams, Session, SpecOptions};
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
        let mut plain = Session::new(&target.decoder, &be, 512).unwrap();
        let want = plain.generate(prompt, &greedy(256), |_| Ok(true)).unwrap();
        for k in [1, 2, 3] {
            let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
            let mut d = DFlash::new(draft, &target.decoder, &be, 512).unwrap();
            let mut s = Session::new(&target.decoder, &be, 512).unwrap();
            let so = SpecOptions { k, trace: true };
            let (got, stats) = s.generate_speculative(prompt, &greedy(256), &so, &mut d, |_| Ok(true)).unwrap();
            let what = format!("{}-token prompt, k={k}", prompt.len());
            assert_eq!(got.tokens, want.tokens, "{what}: tokens differ");
            assert_eq!(s.tokens, plain.tokens, "{what}: context left behind");
            assert!(stats.drafted > 0 && stats.trace.as_ref().unwrap().iter().all(|r| r.proposed.len() <= k), "{what}");
            eprintln!("{what}: {}", stats.summary());
        }
    }
}

/// One proposer over two generations of one session: the second prompt
/// shares a prefix with the first context, which the session keeps.
#[test]
fn dflash_follows_a_session_that_reuses_its_prefix() {
    let be = cpu();
    let target = load("tiny-qwen3", &be);
    let vocab = target.config().vocab_size;
    let first = tokens(20, vocab, 11);
    let second = [&first[..15], &tokens(9, vocab, 12)[..]].concat();
    let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
    let mut d = DFlash::new(draft, &target.decoder, &be, 256).unwrap();
    let mut s = Session::new(&target.decoder, &be, 256).unwrap();
    let so = SpecOptions { k: 3, trace: false };
    s.generate_speculative(&first, &greedy(40), &so, &mut d, |_| Ok(true)).unwrap();
    let keep = s.common_prefix(&second);
    assert_eq!(keep, 15);
    s.truncate(keep);
    let (got, _) = s.generate_speculative(&second[keep..], &greedy(40), &so, &mut d, |_| Ok(true)).unwrap();
    let mut plain = Session::new(&target.decoder, &be, 256).unwrap();
    let want = plain.generate(&second, &greedy(40), |_| Ok(true)).unwrap();
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
        let mut s = Session::new(&target.decoder, &be, 256).unwrap();
        let so = SpecOptions { k: 3, trace: false };
        s.generate_speculative(&prompt, &opts, &so, &mut d, |_| Ok(true)).unwrap()
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
    let mut plain = Session::new(&target.decoder, &be, 512).unwrap();
    let want = plain.generate(&prompt, &greedy(200), |_| Ok(true)).unwrap();
    let truth = [&prompt[..], &want.tokens[..]].concat();
    let draft = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
    let mut o = common::Oracle { inner: DFlash::new(draft, &target.decoder, &be, 512).unwrap(), truth };
    let mut s = Session::new(&target.decoder, &be, 512).unwrap();
    let so = SpecOptions { k: 3, trace: false };
    let (got, stats) = s.generate_speculative(&prompt, &greedy(200), &so, &mut o, |_| Ok(true)).unwrap();
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
    let mut plain = Session::new(&target.decoder, &be, 256).unwrap();
    let want = plain.generate(&prompt, &greedy(64), |_| Ok(true)).unwrap();
    let mut d = DFlash::new(draft, &target.decoder, &be, 256).unwrap();
    let mut s = Session::new(&target.decoder, &be, 256).unwrap();
    let so = SpecOptions { k: 3, trace: false };
    let (got, stats) = s.generate_speculative(&prompt, &greedy(64), &so, &mut d, |_| Ok(true)).unwrap();
    assert_eq!(got.tokens, want.tokens);
    assert!(stats.drafted > 0);
}
