//! CUDA routing, combining, softmax, argmax and sampling against the CPU
//! backend (and the host sampler, which the GPU must match draw for draw).
//! Skipped without a GPU (`FUSEBOX_REQUIRE_CUDA=1` makes that a failure).

use fusebox_core::cpu::CpuBackend;
use fusebox_core::cuda::{backend_for_tests, CudaBackend};
use fusebox_core::sample::{argmax, sample_into, SamplingParams, Scratch, SAMPLE_PARAMS};
use fusebox_core::{Backend, DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng() -> ChaCha8Rng {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

fn rand_vec(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * r.random::<f32>()).collect()
}

fn up(g: &CudaBackend, shape: &[usize], data: &[f32]) -> Tensor {
    g.upload(Tensor::from_f32(shape, data).unwrap()).unwrap()
}

fn up_i32(g: &CudaBackend, shape: &[usize], data: &[i32]) -> Tensor {
    g.upload(Tensor::from_i32(shape, data).unwrap()).unwrap()
}

fn f32s(g: &CudaBackend, t: &Tensor) -> Vec<f32> {
    let mut v = vec![];
    g.read_f32(t, &mut v).unwrap();
    v
}

fn i32s(g: &CudaBackend, t: &Tensor) -> Vec<i32> {
    let mut v = vec![];
    g.read_i32(t, &mut v).unwrap();
    v
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn topk_router_matches_cpu() {
    let Some(g) = backend_for_tests() else { return };
    let cpu = CpuBackend::new(0).unwrap();
    let mut r = rng();
    for &(m, e, k) in
        &[(1, 128, 8), (7, 128, 8), (3, 60, 4), (5, 512, 10), (2, 33, 33), (1, 8, 2), (300, 64, 6), (4, 3000, 7)]
    {
        for renorm in [true, false] {
            for ties in [false, true] {
                let mut x = rand_vec(&mut r, m * e, -4.0, 4.0);
                if ties {
                    x.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
                }
                let xc = Tensor::from_f32(&[m, e], &x).unwrap();
                let (mut ic, mut wc) = (Tensor::zeros(&[m, k], DType::I32), Tensor::zeros(&[m, k], DType::F32));
                cpu.topk_router(&xc, renorm, &mut ic, &mut wc).unwrap();
                let xg = up(&g, &[m, e], &x);
                let mut ig = up_i32(&g, &[m, k], &vec![-7; m * k]);
                let mut wg = up(&g, &[m, k], &vec![f32::NAN; m * k]);
                g.topk_router(&xg, renorm, &mut ig, &mut wg).unwrap();
                assert_eq!(i32s(&g, &ig), ic.as_i32().unwrap(), "ids m={m} e={e} k={k} renorm={renorm} ties={ties}");
                let err = rel(&f32s(&g, &wg), wc.as_f32().unwrap());
                assert!(err < 1e-5, "weights m={m} e={e} k={k}: {err}");
            }
        }
    }
}

#[test]
fn moe_combine_matches_cpu() {
    let Some(g) = backend_for_tests() else { return };
    let cpu = CpuBackend::new(0).unwrap();
    let mut r = rng();
    for &(m, k, d) in &[(1, 8, 2048), (3, 4, 1001), (5, 1, 7), (2, 3, 4), (64, 8, 768), (1, 6, 130)] {
        let y = rand_vec(&mut r, m * k * d, -1.0, 1.0);
        let w = rand_vec(&mut r, m * k, 0.0, 1.0);
        let mut oc = Tensor::zeros(&[m, d], DType::F32);
        cpu.moe_combine(&Tensor::from_f32(&[m, k, d], &y).unwrap(), &Tensor::from_f32(&[m, k], &w).unwrap(), &mut oc)
            .unwrap();
        let mut og = up(&g, &[m, d], &vec![f32::NAN; m * d]);
        g.moe_combine(&up(&g, &[m, k, d], &y), &up(&g, &[m, k], &w), &mut og).unwrap();
        let err = rel(&f32s(&g, &og), oc.as_f32().unwrap());
        assert!(err < 1e-5, "m={m} k={k} d={d}: {err}");
    }
}

#[test]
fn softmax_and_argmax_match_cpu() {
    let Some(g) = backend_for_tests() else { return };
    let cpu = CpuBackend::new(0).unwrap();
    let mut r = rng();
    for &(rows, n) in &[(1, 7), (3, 1000), (2, 1025), (1, 151_936), (5, 33), (9, 1024), (2, 8191), (1, 1)] {
        let mut x = rand_vec(&mut r, rows * n, -8.0, 8.0);
        let xc = Tensor::from_f32(&[rows, n], &x).unwrap();
        let mut sc = Tensor::zeros(&[rows, n], DType::F32);
        cpu.softmax(&xc, &mut sc).unwrap();
        let mut sg = up(&g, &[rows, n], &vec![f32::NAN; rows * n]);
        g.softmax(&up(&g, &[rows, n], &x), &mut sg).unwrap();
        // against f64 (the CPU's sequential f32 sum drifts by ~1e-4 over 150k terms)
        let mut exact = vec![0f32; rows * n];
        for (xr, er) in x.chunks(n).zip(exact.chunks_mut(n)) {
            let mx = xr.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let s: f64 = xr.iter().map(|&v| (v as f64 - mx).exp()).sum();
            er.iter_mut().zip(xr).for_each(|(e, &v)| *e = ((v as f64 - mx).exp() / s) as f32);
        }
        let got = f32s(&g, &sg);
        let err = rel(&got, &exact);
        assert!(err < 1e-5, "softmax {rows}x{n}: {err} from f64");
        let err = rel(&got, sc.as_f32().unwrap());
        assert!(err < 1e-3, "softmax {rows}x{n}: {err} from the CPU");
        // argmax: random, then with ties, NaNs and -inf planted
        for variant in 0..3 {
            if variant == 1 {
                x.iter_mut().for_each(|v| *v = v.round());
            }
            if variant == 2 {
                for _ in 0..(n / 3).max(1) {
                    let i = r.random_range(0..rows * n);
                    x[i] = if r.random() { f32::NAN } else { f32::NEG_INFINITY };
                }
            }
            let xc = Tensor::from_f32(&[rows, n], &x).unwrap();
            let mut ac = Tensor::zeros(&[rows], DType::I32);
            cpu.argmax(&xc, &mut ac).unwrap();
            let mut ag = up_i32(&g, &[rows], &vec![-3; rows]);
            g.argmax(&up(&g, &[rows, n], &x), &mut ag).unwrap();
            assert_eq!(i32s(&g, &ag), ac.as_i32().unwrap(), "argmax {rows}x{n} variant {variant}");
        }
    }
    // all NaN: 0, as on the CPU
    let mut ag = up_i32(&g, &[2], &[-3, -3]);
    g.argmax(&up(&g, &[2, 2000], &vec![f32::NAN; 4000]), &mut ag).unwrap();
    assert_eq!(i32s(&g, &ag), [0, 0]);
}

/// The device side of one sampling stream.
struct Dev {
    params: Tensor,
    history: Tensor,
    state: Tensor,
    out: Tensor,
}

impl Dev {
    fn new(g: &CudaBackend, p: &SamplingParams, hist: &[i32], cap: usize, counter: i32) -> Dev {
        let mut h = hist.to_vec();
        h.resize(cap, -9);
        Dev {
            params: up(g, &[SAMPLE_PARAMS], &p.encode()),
            history: up_i32(g, &[cap], &h),
            state: up_i32(g, &[2], &[hist.len() as i32, counter]),
            out: up_i32(g, &[1], &[-5]),
        }
    }
    fn sample(&mut self, g: &CudaBackend, logits: &Tensor) -> i32 {
        g.write_i32(&mut self.out, &[-5]).unwrap();
        g.sample(logits, &self.params, &mut self.history, &mut self.state, &mut self.out).unwrap();
        i32s(g, &self.out)[0]
    }
}

/// Host draws: (tokens, final history, final state).
fn host(
    logits: &[f32],
    p: &SamplingParams,
    hist: &[i32],
    cap: usize,
    counter: i32,
    steps: usize,
) -> (Vec<i32>, Vec<i32>, [i32; 2]) {
    let mut h = hist.to_vec();
    h.resize(cap, -9);
    let mut state = [hist.len() as i32, counter];
    let mut s = Scratch::default();
    let toks = (0..steps).map(|_| sample_into(logits, &p.encode(), &mut h, &mut state, &mut s)).collect();
    (toks, h, state)
}

fn random_params(r: &mut ChaCha8Rng) -> SamplingParams {
    SamplingParams {
        temperature: [0.0, 0.3, 0.7, 1.0, 1.5][r.random_range(0..5)],
        top_k: [0, 1, 2, 5, 40, 5000][r.random_range(0..6)],
        top_p: [1.0, 0.95, 0.8, 0.5, 0.1, 0.0][r.random_range(0..6)],
        min_p: [0.0, 0.0, 0.05, 0.2, 1.0][r.random_range(0..5)],
        repeat_penalty: [1.0, 1.1, 1.5][r.random_range(0..3)],
        repeat_last_n: [0, 3, 64][r.random_range(0..3)],
        seed: r.random(),
    }
}

#[test]
fn sample_matches_the_host_draw_for_draw() {
    let Some(g) = backend_for_tests() else { return };
    let mut r = rng();
    for case in 0..120 {
        let v = [1usize, 7, 1000, 4099, 32_000, 151_936][case % 6];
        let coarse = case % 4 == 0;
        let l: Vec<f32> = (0..v)
            .map(|_| {
                let x = r.random::<f32>() * 12.0 - 6.0;
                match r.random_range(0..1000) {
                    0 => f32::NEG_INFINITY,
                    1 if case % 5 == 0 => f32::NAN,
                    _ if coarse => (x * 2.0).round() / 2.0,
                    _ => x,
                }
            })
            .collect();
        let rows = 1 + case % 3;
        let mut all = rand_vec(&mut r, (rows - 1) * v, -1.0, 1.0);
        all.extend_from_slice(&l);
        let logits = up(&g, &[rows, v], &all);
        let hist: Vec<i32> = (0..r.random_range(0..100)).map(|_| r.random_range(-2..v as i32 + 2)).collect();
        let cap = hist.len() + [0usize, 2, 10][case % 3];
        let p = random_params(&mut r);
        let counter = [0, 1, 77, -1][case % 4];
        let steps = 6;
        let (want, want_h, want_s) = host(&l, &p, &hist, cap, counter, steps);
        let mut d = Dev::new(&g, &p, &hist, cap, counter);
        let got: Vec<i32> = (0..steps).map(|_| d.sample(&g, &logits)).collect();
        assert_eq!(got, want, "case {case}: vocab {v}, {p:?}");
        assert_eq!(i32s(&g, &d.history), want_h, "case {case}: history");
        assert_eq!(i32s(&g, &d.state), want_s, "case {case}: state");
    }
}

#[test]
fn sample_greedy_equals_argmax() {
    let Some(g) = backend_for_tests() else { return };
    let mut r = rng();
    for &v in &[5usize, 1000, 32_001, 151_936, 262_144] {
        let l = rand_vec(&mut r, v, -10.0, 10.0);
        let logits = up(&g, &[1, v], &l);
        for p in [
            SamplingParams { repeat_penalty: 1.0, ..SamplingParams::greedy() },
            SamplingParams { temperature: 0.7, top_k: 1, repeat_penalty: 1.0, ..SamplingParams::greedy() },
        ] {
            let mut d = Dev::new(&g, &p, &[], 4, 0);
            assert_eq!(d.sample(&g, &logits), argmax(&l) as i32, "vocab {v}");
        }
        // with a penalty on the winner, the runner-up (as on the host)
        let best = argmax(&l) as i32;
        let p = SamplingParams { repeat_penalty: 1e6, repeat_last_n: 0, ..SamplingParams::greedy() };
        let mut d = Dev::new(&g, &p, &[best, best], 4, 0);
        let (want, _, _) = host(&l, &p, &[best, best], 4, 0, 1);
        assert_eq!(d.sample(&g, &logits), want[0]);
        // a penalty divides a positive logit and multiplies a negative one, so the
        // winner keeps its place when it is the only positive logit (seen with vocab 5)
        if l.iter().filter(|&&x| x > 0.0).count() > 1 {
            assert_ne!(want[0], best, "vocab {v}");
        }
    }
}

#[test]
fn sample_filters_never_draw_excluded_tokens() {
    let Some(g) = backend_for_tests() else { return };
    let mut r = rng();
    let v = 50_000;
    let l = rand_vec(&mut r, v, -5.0, 5.0);
    let logits = up(&g, &[1, v], &l);
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
    let lmax = l[order[0]];
    let t = 0.9f32;
    let e: Vec<f64> = order.iter().map(|&i| ((l[i] - lmax) as f64 / t as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    for &(top_k, top_p, min_p) in &[(20usize, 1.0f32, 0.0f32), (0, 0.3, 0.0), (0, 1.0, 0.4), (100, 0.8, 0.1)] {
        let p = SamplingParams {
            temperature: t,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            seed: r.random(),
            ..SamplingParams::greedy()
        };
        // the largest rank any of the filters allows (f64, with slack at the edges)
        let mut limit = if top_k > 0 { top_k } else { v };
        if min_p > 0.0 {
            limit = limit.min(e.iter().take_while(|&&x| x >= min_p as f64 * (1.0 - 1e-5)).count());
        }
        let mut d = Dev::new(&g, &p, &[], 1, 0);
        let mut ranks = vec![];
        for _ in 0..300 {
            let tok = d.sample(&g, &logits);
            ranks.push(order.iter().position(|&i| i as i32 == tok).unwrap());
        }
        let max_rank = *ranks.iter().max().unwrap();
        assert!(max_rank < limit, "top_k {top_k} min_p {min_p}: rank {max_rank} >= {limit}");
        if top_p < 1.0 {
            let mass: f64 = e[..max_rank].iter().sum::<f64>() / s;
            assert!(mass < top_p as f64 + 1e-4, "top_p {top_p}: rank {max_rank} lies past the nucleus ({mass})");
        }
    }
}

#[test]
fn sample_is_deterministic_and_replays_in_a_graph() {
    let Some(g) = backend_for_tests() else { return };
    let mut r = rng();
    let v = 151_936;
    let l = rand_vec(&mut r, v, -6.0, 6.0);
    let logits = up(&g, &[1, v], &l);
    let p = SamplingParams {
        temperature: 1.2,
        top_k: 0,
        top_p: 0.97,
        min_p: 0.0,
        repeat_penalty: 1.1,
        repeat_last_n: 64,
        seed: 99,
    };
    let hist: Vec<i32> = (0..50).map(|_| r.random_range(0..v as i32)).collect();
    let first: Vec<i32> = (0..3).map(|_| Dev::new(&g, &p, &hist, 200, 5).sample(&g, &logits)).collect();
    assert!(first.iter().all(|&t| t == first[0]), "{first:?}");
    // eager, captured, replayed: the counter and history live on the device
    let steps = 40;
    let (want, want_h, want_s) = host(&l, &p, &hist, 200, 5, steps);
    let mut d = Dev::new(&g, &p, &hist, 200, 5);
    let mut got = vec![];
    let key = 0x5a3b_1e00_u64 ^ r.random::<u64>();
    for _ in 0..steps {
        let Dev { params, history, state, out } = &mut d;
        g.run_graph(key, &mut || g.sample(&logits, params, history, state, out)).unwrap();
        got.push(i32s(&g, &d.out)[0]);
    }
    assert_eq!(got, want);
    assert_eq!(i32s(&g, &d.history), want_h);
    assert_eq!(i32s(&g, &d.state), want_s);
    assert!(got.iter().collect::<std::collections::HashSet<_>>().len() > 1, "the draws never changed: {got:?}");
}

/// Time of one `sample` call (graph replays), for a few settings:
/// `cargo test --release --test cuda_moe_sample sample_timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn sample_timing() {
    let Some(g) = backend_for_tests() else { return };
    let mut r = rng();
    for &v in &[32_000usize, 151_936, 262_144] {
        let l = rand_vec(&mut r, v, -8.0, 8.0);
        let logits = up(&g, &[1, v], &l);
        let hist: Vec<i32> = (0..64).map(|_| r.random_range(0..v as i32)).collect();
        for (name, p) in [
            ("greedy", SamplingParams::greedy()),
            ("T=0.7", SamplingParams { temperature: 0.7, repeat_penalty: 1.0, ..SamplingParams::greedy() }),
            (
                "T=0.7 k=20 p=0.8 pen",
                SamplingParams {
                    temperature: 0.7,
                    top_k: 20,
                    top_p: 0.8,
                    repeat_penalty: 1.1,
                    ..SamplingParams::greedy()
                },
            ),
            (
                "T=0.6 p=0.9",
                SamplingParams { temperature: 0.6, top_p: 0.9, repeat_penalty: 1.0, ..SamplingParams::greedy() },
            ),
            (
                "T=0.8 k=40",
                SamplingParams { temperature: 0.8, top_k: 40, repeat_penalty: 1.0, ..SamplingParams::greedy() },
            ),
            (
                "T=1 p=0.95 min_p=0.05",
                SamplingParams {
                    temperature: 1.0,
                    top_p: 0.95,
                    min_p: 0.05,
                    repeat_penalty: 1.0,
                    ..SamplingParams::greedy()
                },
            ),
        ] {
            let mut d = Dev::new(&g, &p, &hist, 100_000, 0);
            let key = r.random::<u64>();
            let n = 200;
            let mut t0 = std::time::Instant::now();
            for i in 0..n + 3 {
                if i == 3 {
                    g.synchronize().unwrap();
                    t0 = std::time::Instant::now();
                }
                let Dev { params, history, state, out } = &mut d;
                g.run_graph(key, &mut || g.sample(&logits, params, history, state, out)).unwrap();
            }
            g.synchronize().unwrap();
            let us = t0.elapsed().as_secs_f64() / n as f64 * 1e6;
            println!("sample vocab {v:>6} {name:<24} {us:8.1} us");
        }
    }
}
