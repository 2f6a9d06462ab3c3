//! Sampling: reproducible with a seed, and the degenerate settings equal greedy.

use fusebox_core::{cpu::CpuBackend, fixtures::fixture};
use fusebox_engine::sampling::argmax;
use fusebox_engine::{GenerateOptions, Sampler, SamplingParams, Session};
use fusebox_models::Model;

fn logits(seed: u64, n: usize) -> Vec<f32> {
    // a small deterministic generator, enough for test inputs
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

fn sampled(p: &SamplingParams, steps: usize) -> Vec<u32> {
    let mut s = Sampler::new(p.clone());
    let mut hist = vec![];
    for i in 0..steps {
        let mut l = logits(i as u64, 1000);
        let t = s.sample(&mut l, &hist);
        hist.push(t);
    }
    hist
}

fn warm() -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        min_p: 0.02,
        repeat_penalty: 1.1,
        repeat_last_n: 64,
        seed: 7,
    }
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let p = warm();
    assert_eq!(sampled(&p, 200), sampled(&p, 200));
    let q = SamplingParams { seed: 8, ..p.clone() };
    assert_ne!(sampled(&p, 200), sampled(&q, 200));
}

#[test]
fn top_k_one_and_temperature_zero_equal_greedy() {
    let greedy: Vec<u32> = (0..50).map(|i| argmax(&logits(i, 1000))).collect();
    let k1 = SamplingParams { top_k: 1, ..warm() };
    let t0 = SamplingParams { temperature: 0.0, ..warm() };
    let plain = SamplingParams { repeat_penalty: 1.0, ..SamplingParams::greedy() };
    assert_eq!(sampled(&SamplingParams { repeat_penalty: 1.0, ..k1 }, 50), greedy);
    assert_eq!(sampled(&SamplingParams { repeat_penalty: 1.0, ..t0 }, 50), greedy);
    assert_eq!(sampled(&plain, 50), greedy);
}

#[test]
fn filters_keep_only_allowed_tokens() {
    // top-k 3: only the three largest logits can come out
    let mut l = vec![0.0f32; 10];
    l[2] = 5.0;
    l[7] = 4.9;
    l[4] = 4.8;
    let p = SamplingParams {
        temperature: 1.0,
        top_k: 3,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 0,
        seed: 1,
    };
    let mut s = Sampler::new(p);
    for _ in 0..300 {
        let t = s.sample(&mut l.clone(), &[]);
        assert!([2, 7, 4].contains(&t), "{t}");
    }
    // top-p: a dominant token alone reaches p
    let mut l = vec![0.0f32; 10];
    l[3] = 20.0;
    let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, ..SamplingParams::greedy() });
    assert!((0..100).all(|_| s.sample(&mut l.clone(), &[]) == 3));
    // min-p: tokens far below the best are dropped
    let mut l = vec![-10.0f32; 10];
    l[1] = 3.0;
    l[8] = 2.5;
    let mut s = Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.1, ..SamplingParams::greedy() });
    assert!((0..300).all(|_| [1, 8].contains(&s.sample(&mut l.clone(), &[]))));
}

#[test]
fn repetition_penalty_matches_transformers_rule() {
    let mut l = vec![2.0f32, -2.0, 1.0];
    let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, repeat_last_n: 0, ..SamplingParams::greedy() });
    // token 0 appears twice but is penalised once
    let t = s.sample(&mut l, &[0, 0, 1]);
    assert_eq!(l, vec![1.0, -4.0, 1.0]);
    assert_eq!(t, 0);
}

#[test]
fn seeded_generation_is_reproducible_on_a_model() {
    let be = CpuBackend::new(0).unwrap();
    let model = Model::load(&fixture("tiny-qwen3"), &be).unwrap();
    let run = |seed| {
        let mut s = Session::new(&model.decoder, &be, 128).unwrap();
        let opts =
            GenerateOptions { max_new_tokens: 24, stop_ids: vec![], sampling: SamplingParams { seed, ..warm() } };
        s.generate(&[429, 344, 198], &opts, |_| Ok(true)).unwrap().tokens
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}
