//! The host sampler (`fusebox_core::sample`): the semantics every backend's
//! `sample` op follows, checked against a plain sort-based reference.

use fusebox_core::cpu::CpuBackend;
use fusebox_core::sample::{
    self, argmax, canon, decode_params, draw_target, encode_params, exp_neg, key, mass, penalize, sample_into,
    top_p_need, uniform24, SamplingParams, Scratch, SAMPLE_PARAMS,
};
use fusebox_core::{Backend, DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(rand::rng().random())
}

/// Params with everything off but the temperature.
fn plain(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, repeat_penalty: 1.0, repeat_last_n: 0, seed, ..SamplingParams::greedy() }
}

/// One draw with counter `counter` and the given history.
fn draw(logits: &[f32], p: &SamplingParams, hist: &[i32], counter: u32) -> i32 {
    let mut h = hist.to_vec();
    h.push(-1);
    let mut state = [hist.len() as i32, counter as i32];
    let t = sample_into(logits, &p.encode(), &mut h, &mut state, &mut Scratch::default());
    assert_eq!(state, [hist.len() as i32 + 1, counter as i32 + 1]);
    assert_eq!(h[hist.len()], t);
    t
}

/// The specification, written the slow and obvious way: sorts instead of
/// radix selection.
fn reference(logits: &[f32], p: &SamplingParams, hist: &[i32], counter: u32) -> i32 {
    let v = logits.len();
    let greedy = p.temperature.is_nan() || p.temperature <= 0.0 || p.top_k == 1;
    let mut pen = logits.to_vec();
    if p.repeat_penalty != 1.0 {
        let start = if p.repeat_last_n == 0 { 0 } else { hist.len().saturating_sub(p.repeat_last_n) };
        let mut seen: Vec<i32> = hist[start..].to_vec();
        seen.sort();
        seen.dedup();
        for t in seen {
            if t >= 0 && (t as usize) < v {
                pen[t as usize] = penalize(logits[t as usize], p.repeat_penalty);
            }
        }
    }
    if greedy {
        return argmax(&pen) as i32;
    }
    let z: Vec<f32> = pen.iter().map(|&l| canon(l / p.temperature)).collect();
    let zmax = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !zmax.is_finite() {
        return argmax(&z) as i32;
    }
    let mut keys: Vec<u32> = z.iter().map(|&x| key(x)).collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    let thr_k = if p.top_k > 0 && p.top_k < v { keys[p.top_k - 1] } else { 0 };
    let min_p = if p.min_p > 0.0 { p.min_p.min(1.0) } else { 0.0 };
    let kept: Vec<(usize, u32, u64)> = (0..v)
        .filter_map(|i| {
            let e = exp_neg(z[i] - zmax);
            (key(z[i]) >= thr_k && e >= min_p).then(|| (i, key(z[i]), mass(e)))
        })
        .collect();
    let mut thr_p = 0;
    if p.top_p < 1.0 {
        let total: u64 = kept.iter().map(|t| t.2).sum();
        let need = top_p_need(p.top_p, total);
        let mut by_key: Vec<(u32, u64)> = kept.iter().map(|t| (t.1, t.2)).collect();
        by_key.sort_by_key(|t| std::cmp::Reverse(t.0));
        let mut cum = 0;
        for (j, &(k, m)) in by_key.iter().enumerate() {
            cum += m;
            let group_end = j + 1 == by_key.len() || by_key[j + 1].0 != k;
            if group_end && cum >= need {
                thr_p = k;
                break;
            }
        }
    }
    let fin: Vec<(usize, u64)> = kept.iter().filter(|t| t.1 >= thr_p).map(|t| (t.0, t.2)).collect();
    let total: u64 = fin.iter().map(|t| t.1).sum();
    let r = draw_target(uniform24(p.seed, counter), total);
    let mut cum = 0;
    for (i, m) in fin {
        cum += m;
        if cum > r {
            return i as i32;
        }
    }
    unreachable!()
}

#[test]
fn params_round_trip() {
    let b = encode_params(0.7, 40, 0.9, 0.05, 1.1, 64, 0x1234_5678_9abc_def0);
    assert_eq!(b.len(), SAMPLE_PARAMS);
    let p = decode_params(&b);
    assert_eq!((p.temperature, p.top_k, p.top_p, p.min_p), (0.7, 40, 0.9, 0.05));
    assert_eq!((p.repeat_penalty, p.repeat_last_n, p.seed), (1.1, 64, 0x1234_5678_9abc_def0));
    // through an F32 tensor and back (the bits survive the copy)
    let be = CpuBackend::new(1).unwrap();
    let mut t = be.zeros(&[SAMPLE_PARAMS], DType::F32).unwrap();
    be.write_f32(&mut t, &b).unwrap();
    let back: Vec<u32> = t.as_f32().unwrap().iter().map(|f| f.to_bits()).collect();
    assert_eq!(back, b.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
    let huge = decode_params(&encode_params(1.0, usize::MAX, 1.0, 0.0, 1.0, usize::MAX, u64::MAX));
    assert_eq!((huge.top_k, huge.repeat_last_n, huge.seed), (u32::MAX, u32::MAX, u64::MAX));
}

#[test]
fn exp_neg_is_accurate() {
    assert_eq!(exp_neg(0.0), 1.0);
    assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_neg(f32::NAN), 0.0);
    assert_eq!(exp_neg(-100.0), 0.0);
    let mut r = rng();
    let mut worst = 0f64;
    for i in 0..200_000 {
        let x = if i % 2 == 0 { -r.random::<f32>() * 80.0 } else { -r.random::<f32>() * 2.0 };
        let want = (x as f64).exp();
        let got = exp_neg(x) as f64;
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 5e-7, "relative error {worst}");
}

#[test]
fn keys_follow_the_float_order() {
    let mut xs = vec![f32::NEG_INFINITY, -1e30, -2.5, -1.0, -1e-40, 0.0, 1e-40, 1.0, 3.5, 1e30, f32::INFINITY];
    let mut r = rng();
    xs.extend((0..1000).map(|_| (r.random::<f32>() - 0.5) * 100.0));
    for &a in &xs {
        for &b in &xs[..11] {
            assert_eq!(a < b, key(a) < key(b), "{a} {b}");
            assert_eq!(a == b, key(a) == key(b), "{a} {b}");
        }
    }
    assert_eq!(canon(-0.0).to_bits(), 0);
    assert_eq!(canon(f32::NAN), f32::NEG_INFINITY);
}

#[test]
fn greedy_settings_are_argmax() {
    let mut r = rng();
    for _ in 0..50 {
        let l: Vec<f32> = (0..1000).map(|_| r.random::<f32>() * 10.0 - 5.0).collect();
        let want = argmax(&l) as i32;
        let warm = SamplingParams { temperature: 0.9, top_k: 1, repeat_penalty: 1.0, ..SamplingParams::greedy() };
        assert_eq!(draw(&l, &warm, &[], 3), want);
        assert_eq!(draw(&l, &SamplingParams { temperature: 0.0, top_k: 40, ..warm.clone() }, &[], 3), want);
        assert_eq!(draw(&l, &SamplingParams { temperature: f32::NAN, top_k: 0, ..warm.clone() }, &[], 3), want);
        assert_eq!(draw(&l, &SamplingParams::greedy(), &[], 0), want);
    }
    // ties: the first; NaN never wins
    assert_eq!(draw(&[1.0, 3.0, 3.0], &SamplingParams::greedy(), &[], 0), 1);
    assert_eq!(draw(&[f32::NAN, -1.0, f32::NAN, 2.0], &SamplingParams::greedy(), &[], 0), 3);
    assert_eq!(draw(&[f32::NAN, f32::NAN], &SamplingParams::greedy(), &[], 0), 0);
}

#[test]
fn repetition_penalty_follows_transformers() {
    let p =
        |pen: f32, last: usize| SamplingParams { repeat_penalty: pen, repeat_last_n: last, ..SamplingParams::greedy() };
    // positive logits are divided
    assert_eq!(draw(&[2.0, 1.5], &p(2.0, 0), &[0], 0), 1);
    assert_eq!(draw(&[2.0, 1.5], &p(1.0, 0), &[0], 0), 0);
    // negative ones multiplied
    assert_eq!(draw(&[-1.0, -1.5], &p(2.0, 0), &[0], 0), 1);
    // a token repeated in the window is penalised once (2 / 2 = 1 > 0.9; twice would be 0.5)
    assert_eq!(draw(&[2.0, 0.9], &p(2.0, 0), &[0, 0, 0], 0), 0);
    // [2, -2, 1] with [0, 0, 1] penalised by 2 is [1, -4, 1]: the first of the tie
    assert_eq!(draw(&[2.0, -2.0, 1.0], &p(2.0, 0), &[0, 0, 1], 0), 0);
    assert_eq!(draw(&[2.0, -2.0, 1.01], &p(2.0, 0), &[0, 0, 1], 0), 2);
    // only the last n count; out-of-range ids are ignored
    assert_eq!(draw(&[2.0, 1.5, 0.0], &p(2.0, 2), &[0, 2, 2], 0), 0);
    assert_eq!(draw(&[2.0, 1.5, 0.0], &p(2.0, 3), &[0, 2, 2], 0), 1);
    assert_eq!(draw(&[2.0, 1.5], &p(2.0, 0), &[-1, 7, 1_000_000], 0), 0);
}

#[test]
fn state_and_history_advance() {
    let p = plain(1.0, 5).encode();
    let l = [0.0f32, 1.0, 2.0, 3.0];
    let mut h = vec![3, 1, 0, 0];
    let mut state = [2, 7];
    let mut s = Scratch::default();
    let a = sample_into(&l, &p, &mut h, &mut state, &mut s);
    assert_eq!(state, [3, 8]);
    assert_eq!(h[2], a);
    let b = sample_into(&l, &p, &mut h, &mut state, &mut s);
    assert_eq!((state, h[3]), ([4, 9], b));
    // a full history is left alone, the state still advances
    let before = h.clone();
    sample_into(&l, &p, &mut h, &mut state, &mut s);
    assert_eq!((state, &h), ([5, 10], &before));
    // the same counter draws the same token; the draw uses random_bits(seed, counter)
    assert_eq!(draw(&l, &plain(1.0, 5), &[3, 1], 7), a);
}

#[test]
fn filters_never_draw_an_excluded_token() {
    let mut r = rng();
    for case in 0..40 {
        let v = [7usize, 100, 1000, 5003][case % 4];
        let l: Vec<f32> = (0..v).map(|_| r.random::<f32>() * 6.0 - 3.0).collect();
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        let top_k = r.random_range(1..=v.min(50));
        let p = SamplingParams { top_k, ..plain(0.8, r.random()) };
        let allowed: Vec<usize> = order[..top_k].to_vec();
        for c in 0..50 {
            assert!(allowed.contains(&(draw(&l, &p, &[], c) as usize)));
        }
        // min-p: exp((l_i - l_max) / T) >= min_p
        let min_p = r.random_range(0.05..0.9f32);
        let p = SamplingParams { min_p, ..plain(0.8, r.random()) };
        let lmax = l[order[0]];
        for c in 0..50 {
            let t = draw(&l, &p, &[], c) as usize;
            assert!(((l[t] - lmax) / 0.8).exp() >= min_p * 0.9999, "min_p {min_p}: {} vs {lmax}", l[t]);
        }
        // top-p: the drawn token's rank lies within the nucleus (in f64)
        let top_p = r.random_range(0.05..0.95f32);
        let p = SamplingParams { top_p, ..plain(0.8, r.random()) };
        let e: Vec<f64> = order.iter().map(|&i| ((l[i] - lmax) as f64 / 0.8).exp()).collect();
        let s: f64 = e.iter().sum();
        let mut cum = 0.0;
        let nucleus = e.iter().take_while(|&&x| {
            let before = cum;
            cum += x / s;
            before < top_p as f64 - 1e-5
        });
        let n = nucleus.count();
        for c in 0..50 {
            let t = draw(&l, &p, &[], c) as usize;
            let rank = order.iter().position(|&i| i == t).unwrap();
            assert!(rank < n + 1, "top_p {top_p}: rank {rank} outside a nucleus of {n}");
        }
    }
}

#[test]
fn matches_the_sort_based_reference() {
    let mut r = rng();
    for case in 0..300 {
        let v = [1usize, 2, 5, 33, 1000, 4099][case % 6];
        // coarse values make many ties; some -inf and NaN
        let coarse = case % 3 == 0;
        let l: Vec<f32> = (0..v)
            .map(|_| {
                let x = r.random::<f32>() * 8.0 - 4.0;
                match r.random_range(0..100) {
                    0 => f32::NEG_INFINITY,
                    1 if case % 5 == 0 => f32::NAN,
                    _ if coarse => (x * 2.0).round() / 2.0,
                    _ => x,
                }
            })
            .collect();
        let hist: Vec<i32> = (0..r.random_range(0..20)).map(|_| r.random_range(-2..v as i32 + 2)).collect();
        let p = SamplingParams {
            temperature: [0.0, 0.3, 0.7, 1.0, 1.5][r.random_range(0..5)],
            top_k: [0, 1, 2, 5, 40, 5000][r.random_range(0..6)],
            top_p: [1.0, 0.95, 0.8, 0.5, 0.1, 0.0][r.random_range(0..6)],
            min_p: [0.0, 0.0, 0.05, 0.2, 1.0][r.random_range(0..5)],
            repeat_penalty: [1.0, 1.1, 1.5][r.random_range(0..3)],
            repeat_last_n: [0, 3, 64][r.random_range(0..3)],
            seed: r.random(),
        };
        for counter in [0u32, 1, 77, u32::MAX] {
            assert_eq!(draw(&l, &p, &hist, counter), reference(&l, &p, &hist, counter), "case {case} {p:?}");
        }
    }
}

#[test]
fn draws_follow_the_distribution() {
    let probs = [0.1f64, 0.2, 0.3, 0.4];
    let l: Vec<f32> = probs.iter().map(|&p| p.ln() as f32).collect();
    let n = 20_000;
    let p = plain(1.0, 42);
    let mut counts = [0usize; 4];
    let mut h = vec![0i32; 4];
    let mut state = [0, 0];
    let mut s = Scratch::default();
    for _ in 0..n {
        state[0] = 0;
        counts[sample_into(&l, &p.encode(), &mut h, &mut state, &mut s) as usize] += 1;
    }
    for (c, &q) in counts.iter().zip(&probs) {
        let sigma = (q * (1.0 - q) / n as f64).sqrt();
        let f = *c as f64 / n as f64;
        assert!((f - q).abs() < 5.0 * sigma, "frequency {f} for probability {q} ({counts:?})");
    }
    // temperature 2 flattens: p_i ∝ sqrt(q_i)
    let p2 = plain(2.0, 43);
    let mut counts = [0usize; 4];
    state = [0, 0];
    for _ in 0..n {
        state[0] = 0;
        counts[sample_into(&l, &p2.encode(), &mut h, &mut state, &mut s) as usize] += 1;
    }
    let norm: f64 = probs.iter().map(|q| q.sqrt()).sum();
    for (c, &q) in counts.iter().zip(&probs) {
        let q = q.sqrt() / norm;
        let sigma = (q * (1.0 - q) / n as f64).sqrt();
        let f = *c as f64 / n as f64;
        assert!((f - q).abs() < 5.0 * sigma, "T=2: frequency {f} for probability {q} ({counts:?})");
    }
}

#[test]
fn top_p_and_min_p_cut_where_specified() {
    // probabilities 0.5, 0.3, 0.2 (masses exact enough that the cuts are clear)
    let l: Vec<f32> = [0.5f64, 0.3, 0.2].iter().map(|p| p.ln() as f32).collect();
    let seen = |p: SamplingParams| {
        let mut s = [false; 3];
        for c in 0..2000 {
            s[draw(&l, &p, &[], c) as usize] = true;
        }
        s
    };
    assert_eq!(seen(SamplingParams { top_p: 0.45, ..plain(1.0, 1) }), [true, false, false]);
    assert_eq!(seen(SamplingParams { top_p: 0.7, ..plain(1.0, 1) }), [true, true, false]);
    assert_eq!(seen(SamplingParams { top_p: 0.9, ..plain(1.0, 1) }), [true, true, true]);
    assert_eq!(seen(SamplingParams { top_p: 0.0, ..plain(1.0, 1) }), [true, false, false]);
    assert_eq!(seen(SamplingParams { min_p: 0.5, ..plain(1.0, 1) }), [true, true, false]);
    assert_eq!(seen(SamplingParams { min_p: 0.7, ..plain(1.0, 1) }), [true, false, false]);
    assert_eq!(seen(SamplingParams { min_p: 5.0, ..plain(1.0, 1) }), [true, false, false]);
    assert_eq!(seen(SamplingParams { top_k: 2, ..plain(1.0, 1) }), [true, true, false]);
    // ties at a threshold are kept
    let tie = [1.0f32, 2.0, 2.0, 2.0, 0.5];
    let mut s = [false; 5];
    for c in 0..3000 {
        s[draw(&tie, &SamplingParams { top_k: 1 + 1, ..plain(1.0, 9) }, &[], c) as usize] = true;
    }
    assert_eq!(s, [false, true, true, true, false]);
    // min-p is applied before top-p: with min_p 0.5 only {0, 1} remain (mass 0.5 : 0.3),
    // and top_p 0.6 of that is token 0 alone (0.625)
    assert_eq!(seen(SamplingParams { min_p: 0.5, top_p: 0.6, ..plain(1.0, 1) }), [true, false, false]);
    assert_eq!(seen(SamplingParams { top_p: 0.6, ..plain(1.0, 1) }), [true, true, false]);
}

#[test]
fn degenerate_logits() {
    let p = SamplingParams { top_p: 0.9, top_k: 3, ..plain(1.0, 1) };
    // a +inf logit: the first of them
    assert_eq!(draw(&[0.0, f32::INFINITY, 1.0, f32::INFINITY], &p, &[], 0), 1);
    // all -inf or NaN: token 0
    assert_eq!(draw(&[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY], &p, &[], 0), 0);
    // NaN never drawn next to numbers
    for c in 0..200 {
        assert_ne!(draw(&[f32::NAN, 0.0, 0.1, f32::NAN], &plain(1.0, 3), &[], c) % 3, 0);
    }
    // a single token
    assert_eq!(draw(&[0.3], &p, &[], 5), 0);
}

#[test]
fn cpu_backend_op_uses_the_host_sampler() {
    let be = CpuBackend::new(1).unwrap();
    let mut r = rng();
    let (rows, v) = (3, 1001);
    let data: Vec<f32> = (0..rows * v).map(|_| r.random::<f32>() * 6.0 - 3.0).collect();
    let logits = Tensor::from_f32(&[rows, v], &data).unwrap();
    let p = SamplingParams { temperature: 0.8, top_k: 50, top_p: 0.9, repeat_penalty: 1.2, ..plain(0.8, 11) };
    let mut params = be.zeros(&[SAMPLE_PARAMS], DType::F32).unwrap();
    be.write_f32(&mut params, &p.encode()).unwrap();
    let mut history = be.zeros(&[8], DType::I32).unwrap();
    be.write_i32(&mut history, &[5, 6, 7, 0, 0, 0, 0, 0]).unwrap();
    let mut state = be.zeros(&[2], DType::I32).unwrap();
    be.write_i32(&mut state, &[3, 0]).unwrap();
    let mut out = be.zeros(&[1], DType::I32).unwrap();
    let last = &data[(rows - 1) * v..];
    let mut want_hist = vec![5, 6, 7];
    for step in 0..7u32 {
        be.sample(&logits, &params, &mut history, &mut state, &mut out).unwrap();
        // the history buffer holds its first 8 tokens; later ones are counted, not stored
        let want = reference(last, &p, &want_hist[..want_hist.len().min(8)], step);
        assert_eq!(out.as_i32().unwrap()[0], want);
        want_hist.push(want);
        let n = want_hist.len().min(8);
        assert_eq!(&history.as_i32().unwrap()[..n], &want_hist[..n]);
        assert_eq!(state.as_i32().unwrap(), &[3 + step as i32 + 1, step as i32 + 1]);
    }
    // shapes are checked
    let mut bad = be.zeros(&[3], DType::I32).unwrap();
    assert!(be.sample(&logits, &params, &mut history, &mut bad, &mut out).is_err());
    let _ = sample::SAMPLE_PARAMS;
}
