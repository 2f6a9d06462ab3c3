//! The CUDA backend's `kv_write` and `attention` against the CPU backend.
//!
//! The GPU cache is bf16; the CPU reference runs on an f32 cache holding the
//! same bf16-rounded values, so both compute the same function in f32. Every
//! test skips (passes) without a GPU; `FUSEBOX_REQUIRE_CUDA=1` makes that a
//! failure. `cuda_attention_speed` is an ignored microbenchmark:
//! `cargo test --release -p fusebox-core --test cuda_attention -- --ignored --nocapture`.

use fusebox_core::cpu::CpuBackend;
use fusebox_core::cuda::{backend_for_tests, CudaBackend};
use fusebox_core::{Backend, DType, LayerKv, Tensor};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// f32 vs f32 with a different summation order.
const TOL: f64 = 2e-5;
const BF16_NAN: u16 = 0x7fc0;

fn gpu() -> Option<CudaBackend> {
    backend_for_tests()
}

fn cpu() -> CpuBackend {
    CpuBackend::new(0).expect("cpu backend")
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn uniform(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

fn dev_f32(be: &CudaBackend, shape: &[usize], data: &[f32]) -> Tensor {
    be.upload(Tensor::from_f32(shape, data).unwrap()).unwrap()
}

fn dev_i32(be: &CudaBackend, data: &[i32]) -> Tensor {
    be.upload(Tensor::from_i32(&[data.len()], data).unwrap()).unwrap()
}

fn dev_bf16(be: &CudaBackend, shape: &[usize], bits: &[u16]) -> Tensor {
    be.upload(Tensor::from_bytes(shape, DType::BF16, bytemuck::cast_slice(bits)).unwrap()).unwrap()
}

/// An f32 output tensor on the GPU filled with NaN, so unwritten elements show.
fn poisoned(be: &CudaBackend, shape: &[usize]) -> Tensor {
    let mut t = be.zeros(shape, DType::F32).unwrap();
    let n = t.numel();
    be.write_f32(&mut t, &vec![f32::NAN; n]).unwrap();
    t
}

fn read(be: &dyn Backend, t: &Tensor) -> Vec<f32> {
    let mut v = vec![];
    be.read_f32(t, &mut v).unwrap();
    v
}

/// `||got - want|| / ||want||`, infinite when anything is not finite.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// One attention problem: random q and cache rows `0..=max(positions)` (bf16-rounded); on the GPU the rows
/// past that are NaN, so reading any of them shows up in the output.
struct Problem {
    m: usize,
    heads: usize,
    kvh: usize,
    d: usize,
    cap: usize,
    positions: Vec<i32>,
    scale: f32,
}

impl Problem {
    /// Run on both backends; returns (gpu output, cpu output).
    fn run(&self, g: &CudaBackend, c: &CpuBackend, r: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>) {
        let (m, heads, kvh, d, cap) = (self.m, self.heads, self.kvh, self.d, self.cap);
        let used = self.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(0);
        assert!(used <= cap);
        let row = kvh * d;
        let mut kf = vec![0f32; cap * row];
        let mut vf = vec![0f32; cap * row];
        for x in kf[..used * row].iter_mut().chain(vf[..used * row].iter_mut()) {
            *x = round_bf16(r.random_range(-1.0..1.0));
        }
        let mut kb = bf16_bits(&kf);
        let mut vb = bf16_bits(&vf);
        kb[used * row..].fill(BF16_NAN);
        vb[used * row..].fill(BF16_NAN);
        let q = uniform(r, m * heads * d, 1.0);
        let shape = [cap, kvh, d];

        let gcache = LayerKv { k: dev_bf16(g, &shape, &kb), v: dev_bf16(g, &shape, &vb) };
        let gq = dev_f32(g, &[m, heads, d], &q);
        let gpos = dev_i32(g, &self.positions);
        let mut gout = poisoned(g, &[m, heads, d]);
        g.attention(&gq, &gcache, &gpos, self.scale, &mut gout).unwrap();
        let got = read(g, &gout);

        let ccache = LayerKv { k: Tensor::from_f32(&shape, &kf).unwrap(), v: Tensor::from_f32(&shape, &vf).unwrap() };
        let cq = Tensor::from_f32(&[m, heads, d], &q).unwrap();
        let cpos = Tensor::from_i32(&[m], &self.positions).unwrap();
        let mut cout = Tensor::zeros(&[m, heads, d], DType::F32);
        c.attention(&cq, &ccache, &cpos, self.scale, &mut cout).unwrap();
        (got, read(c, &cout))
    }

    fn label(&self) -> String {
        let p = &self.positions;
        let span = if p.len() > 3 { format!("[{}, {}, .., {}]", p[0], p[1], p[p.len() - 1]) } else { format!("{p:?}") };
        format!(
            "d {} heads {}/{} m {} cap {} positions {span} scale {}",
            self.d, self.heads, self.kvh, self.m, self.cap, self.scale
        )
    }
}

/// Runs problems, asserts each is within `TOL`, prints the worst.
fn check_all(g: &CudaBackend, problems: &[Problem], seed: u64) {
    let c = cpu();
    let mut r = rng(seed);
    let mut worst = (0f64, String::new());
    let mut failures = vec![];
    for p in problems {
        let (got, want) = p.run(g, &c, &mut r);
        let e = rel_err(&got, &want);
        if e > worst.0 {
            worst = (e, p.label());
        }
        if e.is_nan() || e >= TOL {
            failures.push(format!("{}: rel err {e:.3e}", p.label()));
        }
    }
    println!("{} problems, worst rel err {:.3e} ({})", problems.len(), worst.0, worst.1);
    assert!(failures.is_empty(), "{} of {} failed:\n{}", failures.len(), problems.len(), failures.join("\n"));
}

/// `check_all` with the scalar prefill blocks, then with the tensor-core ones (`set_attn_tc`); decode-sized
/// problems take the same kernels both times.
fn check_both(g: &CudaBackend, problems: &[Problem], seed: u64) {
    let before = g.attn_tc();
    for tc in [false, true] {
        g.set_attn_tc(tc);
        print!("tensor-core prefill {}: ", if tc { "on " } else { "off" });
        check_all(g, problems, seed);
    }
    g.set_attn_tc(before);
}

const HEAD_DIMS: [usize; 5] = [8, 16, 32, 64, 128];
const HEADS: [(usize, usize); 5] = [(4, 1), (4, 2), (6, 2), (32, 8), (16, 16)];
const ROWS: [usize; 5] = [1, 2, 7, 64, 200];

fn scale_for(d: usize, r: &mut ChaCha8Rng) -> f32 {
    // mostly the usual 1/sqrt(d); sometimes sharper, so the running max matters
    let s = 1.0 / (d as f32).sqrt();
    if r.random_range(0..3) == 0 {
        4.0 * s
    } else {
        s
    }
}

#[test]
fn cuda_kv_write_stores_bf16_rows_and_skips_out_of_range() {
    let Some(g) = gpu() else { return };
    let mut r = rng(1);
    // (cap, kv_heads, head_dim, positions): a vectorised row, an odd row (scalar path), every row shuffled
    let mut all: Vec<i32> = (0..64).collect();
    all.reverse();
    all.swap(3, 40);
    let cases: Vec<(usize, usize, usize, Vec<i32>)> = vec![
        (37, 3, 16, vec![3, 36, -1, 37, 0, 1000]),
        (20, 1, 6, vec![19, 0, 7, -5, 20]),
        (64, 2, 128, all),
        (4096, 8, 128, vec![4095, 3000]),
    ];
    for (cap, kvh, d, pos) in cases {
        let (m, row) = (pos.len(), kvh * d);
        let init_k = uniform(&mut r, cap * row, 2.0);
        let init_v = uniform(&mut r, cap * row, 2.0);
        let k = uniform(&mut r, m * row, 3.0);
        let v = uniform(&mut r, m * row, 3.0);
        let shape = [cap, kvh, d];
        let mut cache =
            LayerKv { k: dev_bf16(&g, &shape, &bf16_bits(&init_k)), v: dev_bf16(&g, &shape, &bf16_bits(&init_v)) };
        let (gk, gv) = (dev_f32(&g, &[m, kvh, d], &k), dev_f32(&g, &[m, kvh, d], &v));
        g.kv_write(&gk, &gv, &dev_i32(&g, &pos), &mut cache).unwrap();
        for (got, init, src, what) in [(read(&g, &cache.k), &init_k, &k, "k"), (read(&g, &cache.v), &init_v, &v, "v")] {
            let mut want: Vec<f32> = init.iter().map(|&x| round_bf16(x)).collect();
            for (i, &p) in pos.iter().enumerate() {
                if p >= 0 && (p as usize) < cap {
                    for j in 0..row {
                        want[p as usize * row + j] = round_bf16(src[i * row + j]);
                    }
                }
            }
            for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "cache {what} [{cap}, {kvh}, {d}] positions {pos:?}: element {idx} (row {}) is {a}, want {b}",
                    idx / row
                );
            }
        }
    }
    println!("kv_write: exact");
}

/// Every head dim x head layout x row count, contiguous positions from 0 and from 3000 (capacity 4096).
#[test]
fn cuda_attention_matches_cpu_prefill_and_chunks() {
    let Some(g) = gpu() else { return };
    let mut r = rng(2);
    let mut problems = vec![];
    for d in HEAD_DIMS {
        for (heads, kvh) in HEADS {
            for m in ROWS {
                for start in [0usize, 3000] {
                    let cap = if start == 0 { m + 45 } else { 4096 };
                    let positions = (start..start + m).map(|p| p as i32).collect();
                    problems.push(Problem { m, heads, kvh, d, cap, positions, scale: scale_for(d, &mut r) });
                }
            }
        }
    }
    check_both(&g, &problems, 3);
}

/// Single-token decode at lengths around tile and split boundaries.
#[test]
fn cuda_attention_matches_cpu_decode_lengths() {
    let Some(g) = gpu() else { return };
    let mut r = rng(4);
    let mut problems = vec![];
    for d in HEAD_DIMS {
        for (heads, kvh) in HEADS {
            for len in [1usize, 31, 32, 33, 63, 64, 65, 255, 256, 257, 1000, 4000, 4096] {
                let positions = vec![len as i32 - 1];
                problems.push(Problem { m: 1, heads, kvh, d, cap: 4096, positions, scale: scale_for(d, &mut r) });
            }
        }
    }
    check_all(&g, &problems, 5);
}

/// Non-contiguous and unordered positions, repeated positions, tiny and odd capacities (a single split),
/// big groups, and head dims that are not powers of two or are 256.
#[test]
fn cuda_attention_matches_cpu_odd_positions_and_shapes() {
    let Some(g) = gpu() else { return };
    let mut r = rng(6);
    let mut problems = vec![];
    let layouts = [(4, 1), (6, 2), (32, 8), (64, 4), (16, 16), (3, 3), (24, 1)];
    for d in [8usize, 24, 64, 80, 96, 128, 160, 256] {
        for (heads, kvh) in layouts {
            // scattered positions in a 3000-row cache, unsorted
            for m in [1usize, 3, 5, 40] {
                let positions: Vec<i32> = (0..m).map(|_| r.random_range(0..3000)).collect();
                problems.push(Problem { m, heads, kvh, d, cap: 3000, positions, scale: scale_for(d, &mut r) });
            }
            // the same position twice, and the whole of a small cache (one tile, one split)
            problems.push(Problem { m: 2, heads, kvh, d, cap: 50, positions: vec![17, 17], scale: 0.3 });
            let positions = (0..33).rev().collect();
            problems.push(Problem { m: 33, heads, kvh, d, cap: 33, positions, scale: scale_for(d, &mut r) });
            // a chunk after a cached prefix: positions 1000..1130 of 1500
            let positions = (1000..1130).collect();
            problems.push(Problem { m: 130, heads, kvh, d, cap: 1500, positions, scale: scale_for(d, &mut r) });
        }
    }
    check_both(&g, &problems, 7);
}

/// Positions outside [0, capacity) produce zero rows (the CPU backend would reject them); others are unaffected.
#[test]
fn cuda_attention_out_of_range_positions_give_zeros() {
    let Some(g) = gpu() else { return };
    let mut r = rng(8);
    // 6 rows (taken one at a time), then 48 (packed prefill blocks, scalar and tensor-core) with the bad ones
    // at the front, in the middle and last
    check_out_of_range(&g, &mut r, &[5, -1, 299, 300, 100000, 42]);
    let mut positions: Vec<i32> = (200..248).collect();
    for (i, bad) in [(0, -7), (17, 300), (30, -1), (47, 4000)] {
        positions[i] = bad;
    }
    for tc in [false, true] {
        g.set_attn_tc(tc);
        check_out_of_range(&g, &mut r, &positions);
    }
}

fn check_out_of_range(g: &CudaBackend, r: &mut ChaCha8Rng, positions: &[i32]) {
    let c = cpu();
    let (heads, kvh, d, cap) = (8, 2, 64, 300);
    let m = positions.len();
    let good: Vec<usize> = (0..m).filter(|&i| (0..cap as i32).contains(&positions[i])).collect();
    // run the GPU on all rows; the CPU on the valid ones only
    let row = kvh * d;
    let kf: Vec<f32> = (0..cap * row).map(|_| round_bf16(r.random_range(-1.0..1.0))).collect();
    let vf: Vec<f32> = (0..cap * row).map(|_| round_bf16(r.random_range(-1.0..1.0))).collect();
    let q = uniform(r, m * heads * d, 1.0);
    let shape = [cap, kvh, d];
    let scale = 0.125;
    let gcache = LayerKv { k: dev_bf16(g, &shape, &bf16_bits(&kf)), v: dev_bf16(g, &shape, &bf16_bits(&vf)) };
    let mut gout = poisoned(g, &[m, heads, d]);
    g.attention(&dev_f32(g, &[m, heads, d], &q), &gcache, &dev_i32(g, positions), scale, &mut gout).unwrap();
    let got = read(g, &gout);
    let hd = heads * d;
    let cq: Vec<f32> = good.iter().flat_map(|&i| q[i * hd..(i + 1) * hd].to_vec()).collect();
    let cpos: Vec<i32> = good.iter().map(|&i| positions[i]).collect();
    let ccache = LayerKv { k: Tensor::from_f32(&shape, &kf).unwrap(), v: Tensor::from_f32(&shape, &vf).unwrap() };
    let mut cout = Tensor::zeros(&[good.len(), heads, d], DType::F32);
    c.attention(
        &Tensor::from_f32(&[good.len(), heads, d], &cq).unwrap(),
        &ccache,
        &Tensor::from_i32(&[good.len()], &cpos).unwrap(),
        scale,
        &mut cout,
    )
    .unwrap();
    let want = read(&c, &cout);
    let got_good: Vec<f32> = good.iter().flat_map(|&i| got[i * hd..(i + 1) * hd].to_vec()).collect();
    let e = rel_err(&got_good, &want);
    assert!(e < TOL, "{m} rows (tensor cores {}): valid rows: rel err {e:.3e}", g.attn_tc());
    for i in (0..m).filter(|i| !good.contains(i)) {
        assert!(
            got[i * hd..(i + 1) * hd].iter().all(|&x| x == 0.0),
            "{m} rows (tensor cores {}): row {i} (position {}) not zero",
            g.attn_tc(),
            positions[i]
        );
    }
}

/// Packed (prefill) problems at the edges of the tensor-core blocks: a 512-row chunk at the end of a
/// 4096-row cache, very sharp scales (the hi/lo split's headroom), one-row-per-group layouts.
#[test]
fn cuda_attention_packed_edge_cases() {
    let Some(g) = gpu() else { return };
    let mut problems = vec![];
    for d in [64usize, 128] {
        let s = 1.0 / (d as f32).sqrt();
        for (heads, kvh) in [(32, 8), (32, 4), (16, 16)] {
            let positions = (3584..4096).collect();
            problems.push(Problem { m: 512, heads, kvh, d, cap: 4096, positions, scale: s });
            let positions = (0..100).collect();
            problems.push(Problem { m: 100, heads, kvh, d, cap: 100, positions, scale: 8.0 * s });
            let positions = (0..70).map(|i| 2 * i).collect();
            problems.push(Problem { m: 70, heads, kvh, d, cap: 200, positions, scale: 16.0 * s });
        }
    }
    check_both(&g, &problems, 13);
}

/// A prefill, decode steps and a second prefill chunk through kv_write on both backends (inputs pre-rounded
/// to bf16, so the caches hold the same values), attention after each.
#[test]
fn cuda_kv_write_then_attention_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut r = rng(9);
    let (heads, kvh, d, cap) = (12, 4, 64, 700);
    let shape = [cap, kvh, d];
    let mut gcache = LayerKv { k: g.zeros(&shape, DType::BF16).unwrap(), v: g.zeros(&shape, DType::BF16).unwrap() };
    let mut ccache = LayerKv { k: Tensor::zeros(&shape, DType::F32), v: Tensor::zeros(&shape, DType::F32) };
    let steps: Vec<Vec<i32>> = vec![
        (0..37).collect(),
        vec![37],
        vec![38],
        vec![39],
        (40..300).collect(),
        vec![300],
        (301..303).collect(),
        (303..699).collect(),
        vec![699],
    ];
    let mut worst = 0f64;
    for pos in steps {
        let m = pos.len();
        let k: Vec<f32> = uniform(&mut r, m * kvh * d, 1.0).into_iter().map(round_bf16).collect();
        let v: Vec<f32> = uniform(&mut r, m * kvh * d, 1.0).into_iter().map(round_bf16).collect();
        let q = uniform(&mut r, m * heads * d, 1.0);
        let gpos = dev_i32(&g, &pos);
        g.kv_write(&dev_f32(&g, &[m, kvh, d], &k), &dev_f32(&g, &[m, kvh, d], &v), &gpos, &mut gcache).unwrap();
        let mut gout = poisoned(&g, &[m, heads, d]);
        g.attention(&dev_f32(&g, &[m, heads, d], &q), &gcache, &gpos, 0.125, &mut gout).unwrap();
        let cpos = Tensor::from_i32(&[m], &pos).unwrap();
        c.kv_write(
            &Tensor::from_f32(&[m, kvh, d], &k).unwrap(),
            &Tensor::from_f32(&[m, kvh, d], &v).unwrap(),
            &cpos,
            &mut ccache,
        )
        .unwrap();
        let mut cout = Tensor::zeros(&[m, heads, d], DType::F32);
        c.attention(&Tensor::from_f32(&[m, heads, d], &q).unwrap(), &ccache, &cpos, 0.125, &mut cout).unwrap();
        let e = rel_err(&read(&g, &gout), &read(&c, &cout));
        assert!(e < TOL, "positions {}..={}: rel err {e:.3e}", pos[0], pos[m - 1]);
        worst = worst.max(e);
    }
    println!("kv_write + attention sequence: worst rel err {worst:.3e}");
}

/// A decode step captured as a CUDA graph reads the position from device memory: replaying it after
/// changing the position gives the attention at the new length.
#[test]
fn cuda_attention_graph_replay_follows_positions() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut r = rng(10);
    let (heads, kvh, d, cap) = (32, 8, 128, 4096);
    let row = kvh * d;
    let kf: Vec<f32> = (0..cap * row).map(|_| round_bf16(r.random_range(-1.0..1.0))).collect();
    let vf: Vec<f32> = (0..cap * row).map(|_| round_bf16(r.random_range(-1.0..1.0))).collect();
    let q = uniform(&mut r, heads * d, 1.0);
    let shape = [cap, kvh, d];
    let gcache = LayerKv { k: dev_bf16(&g, &shape, &bf16_bits(&kf)), v: dev_bf16(&g, &shape, &bf16_bits(&vf)) };
    let ccache = LayerKv { k: Tensor::from_f32(&shape, &kf).unwrap(), v: Tensor::from_f32(&shape, &vf).unwrap() };
    let gq = dev_f32(&g, &[1, heads, d], &q);
    let mut gpos = dev_i32(&g, &[0]);
    let mut gout = poisoned(&g, &[1, heads, d]);
    for (step, p) in [10i32, 700, 4095, 3, 2048, 257].into_iter().enumerate() {
        g.write_i32(&mut gpos, &[p]).unwrap();
        let mut f = || g.attention(&gq, &gcache, &gpos, 0.09, &mut gout);
        g.run_graph(0xa77e, &mut f).unwrap();
        let got = read(&g, &gout);
        let mut cout = Tensor::zeros(&[1, heads, d], DType::F32);
        let cq = Tensor::from_f32(&[1, heads, d], &q).unwrap();
        c.attention(&cq, &ccache, &Tensor::from_i32(&[1], &[p]).unwrap(), 0.09, &mut cout).unwrap();
        let e = rel_err(&got, &read(&c, &cout));
        assert!(e < TOL, "step {step} position {p}: rel err {e:.3e} (graphs enabled: {})", g.graphs_enabled());
    }
}

/// Decode (m = 1, 32 heads over 8 kv heads, head_dim 128) and a 512-row prefill: microseconds per call
/// and K/V bytes per second. Caches rotate over enough layers to keep the K/V out of L2.
#[test]
#[ignore]
fn cuda_attention_speed() {
    let Some(g) = gpu() else { return };
    println!("{}", g.name());
    let tc_default = g.attn_tc();
    let (heads, kvh, d) = (32usize, 8usize, 128usize);
    let mut r = rng(11);
    let scale = 1.0 / (d as f32).sqrt();
    let time = |f: &mut dyn FnMut(), n: usize| -> f64 {
        f();
        g.synchronize().unwrap();
        let t = std::time::Instant::now();
        for _ in 0..n {
            f();
        }
        g.synchronize().unwrap();
        t.elapsed().as_secs_f64() / n as f64
    };
    // FUSEBOX_ATTN_BENCH="m:len,..." picks cases (for a profiler); the default is the four below
    let cases: Vec<(usize, usize)> = match std::env::var("FUSEBOX_ATTN_BENCH") {
        Ok(v) => v
            .split(',')
            .map(|c| {
                let (a, b) = c.split_once(':').expect("m:len");
                (a.trim().parse().unwrap(), b.trim().parse().unwrap())
            })
            .collect(),
        Err(_) => vec![(1, 512), (1, 4096), (1, 32768), (512, 512)],
    };
    // let the clocks come up before the first number (not when profiling picked cases)
    if std::env::var("FUSEBOX_ATTN_BENCH").is_err() {
        let mut k = g.zeros(&[4096, kvh, d], DType::BF16).unwrap();
        g.fill_random(&mut k, 1, -1.0, 1.0).unwrap();
        let c = LayerKv { v: k.clone(), k };
        let q = dev_f32(&g, &[64, heads, d], &uniform(&mut r, 64 * heads * d, 1.0));
        let pos = dev_i32(&g, &(4000..4064).collect::<Vec<i32>>());
        let mut out = g.zeros(&[64, heads, d], DType::F32).unwrap();
        let t = std::time::Instant::now();
        while t.elapsed().as_secs_f64() < 0.5 {
            g.attention(&q, &c, &pos, scale, &mut out).unwrap();
            g.synchronize().unwrap();
        }
    }
    for (m, len) in cases {
        let cap = len;
        let layer_bytes = 2 * cap * kvh * d * 2;
        let layers = (512usize << 20).div_ceil(layer_bytes).clamp(2, 64);
        let caches: Vec<LayerKv> = (0..layers)
            .map(|i| {
                let mut k = g.zeros(&[cap, kvh, d], DType::BF16).unwrap();
                let mut v = g.zeros(&[cap, kvh, d], DType::BF16).unwrap();
                g.fill_random(&mut k, 100 + 2 * i as u64, -1.0, 1.0).unwrap();
                g.fill_random(&mut v, 101 + 2 * i as u64, -1.0, 1.0).unwrap();
                LayerKv { k, v }
            })
            .collect();
        let q = dev_f32(&g, &[m, heads, d], &uniform(&mut r, m * heads * d, 1.0));
        let pos: Vec<i32> = (len - m..len).map(|p| p as i32).collect();
        let gpos = dev_i32(&g, &pos);
        let mut out = g.zeros(&[m, heads, d], DType::F32).unwrap();
        // K/V bytes the kernels must read: every row up to the last position, once per kv head
        let kv_bytes = (2 * len * kvh * d * 2) as f64;
        let flops = 4.0 * (heads * d) as f64 * pos.iter().map(|&p| p as f64 + 1.0).sum::<f64>();
        let mut eager_of = |tc: bool| {
            g.set_attn_tc(tc);
            time(
                &mut || {
                    for c in &caches {
                        g.attention(&q, c, &gpos, scale, &mut out).unwrap();
                    }
                },
                20,
            ) / layers as f64
        };
        if m > 32 {
            // prefill: the scalar and the tensor-core blocks, interleaved, medians of 5
            let (mut off, mut on): (Vec<f64>, Vec<f64>) = (0..5).map(|_| (eager_of(false), eager_of(true))).unzip();
            off.sort_by(f64::total_cmp);
            on.sort_by(f64::total_cmp);
            println!(
                "m {m:4} len {len:6}: scalar {:8.2} us ({:6.2} TFLOP/s), tensor cores {:8.2} us ({:6.2} TFLOP/s), {:.2}x",
                off[2] * 1e6,
                flops / off[2] / 1e12,
                on[2] * 1e6,
                flops / on[2] / 1e12,
                off[2] / on[2]
            );
        }
        let eager = eager_of(tc_default);
        let mut graph_us = f64::NAN;
        if g.graphs_enabled() {
            let key = 0x5eed_0000 + (m * 1_000_000 + len) as u64;
            let mut body = || -> anyhow::Result<()> {
                for c in &caches {
                    g.attention(&q, c, &gpos, scale, &mut out)?;
                }
                Ok(())
            };
            g.run_graph(key, &mut body).unwrap();
            let mut runs: Vec<f64> =
                (0..5).map(|_| time(&mut || g.run_graph(key, &mut body).unwrap(), 10) / layers as f64).collect();
            runs.sort_by(f64::total_cmp);
            graph_us = runs[2] * 1e6;
        }
        let best = if graph_us.is_nan() { eager } else { graph_us.min(eager * 1e6) / 1e6 };
        println!(
            "m {m:4} len {len:6} ({layers:2} layers): eager {:8.2} us, graph {:8.2} us, K/V {:7.1} GB/s, {:7.2} TFLOP/s",
            eager * 1e6,
            graph_us,
            kv_bytes / best / 1e9,
            flops / best / 1e12
        );
    }
}

/// Sequences laid out each in a contiguous bf16 cache and, the same rows,
/// in one paged cache of shuffled blocks of 16 (the same capacity, so the
/// key splits agree): one `paged_attention` call over all of them gives,
/// for every sequence of up to 32 rows (decode and verify rows, taken one
/// at a time both ways), bitwise the contiguous call for that sequence
/// alone; for longer runs (prefill chunks, which the contiguous call packs)
/// the same values within f32 rounding.
#[test]
fn paged_attention_is_bitwise_contiguous_attention_per_row() {
    let Some(g) = gpu() else { return };
    let mut r = rng(29);
    let bs = 16;
    // per sequence: (positions cached before the call, rows in the call)
    let seqs = [(0usize, 40usize), (70, 1), (5, 3), (200, 1), (33, 34), (16, 1), (511, 1)];
    let width = seqs.iter().map(|&(p, m)| (p + m).div_ceil(bs)).max().unwrap();
    let blocks = seqs.iter().map(|&(p, m)| (p + m).div_ceil(bs)).sum::<usize>() + 5;
    let cap = blocks * bs;
    // the contiguous calls of prefill-sized sequences on the scalar blocks (f32 arithmetic, as the paged rows)
    let tc = g.attn_tc();
    g.set_attn_tc(false);
    for (heads, kvh, d) in [(4usize, 2usize, 64usize), (16, 8, 128), (8, 1, 128), (6, 3, 32)] {
        let row = kvh * d;
        let mut ids: Vec<i32> = (0..blocks as i32).collect();
        for i in (1..blocks).rev() {
            ids.swap(i, r.random_range(0..=i));
        }
        let mut tables = vec![-1i32; seqs.len() * width];
        let mut paged = [bf16_bits(&uniform(&mut r, cap * row, 1.0)), bf16_bits(&uniform(&mut r, cap * row, 1.0))];
        let (mut q, mut pos, mut seq_of, mut alone, mut long) = (vec![], vec![], vec![], vec![], vec![]);
        let mut next = 0;
        let scale = 1.0 / (d as f32).sqrt();
        for (s, &(p, m)) in seqs.iter().enumerate() {
            let len = p + m;
            let kv = [bf16_bits(&uniform(&mut r, cap * row, 1.0)), bf16_bits(&uniform(&mut r, cap * row, 1.0))];
            for j in 0..len.div_ceil(bs) {
                let id = ids[next] as usize;
                next += 1;
                tables[s * width + j] = id as i32;
                let n = bs.min(len - j * bs) * row;
                for (dst, src) in paged.iter_mut().zip(&kv) {
                    dst[id * bs * row..][..n].copy_from_slice(&src[j * bs * row..][..n]);
                }
            }
            let qs = uniform(&mut r, m * heads * d, 2.0);
            let ps: Vec<i32> = (p as i32..len as i32).collect();
            let cache = LayerKv { k: dev_bf16(&g, &[cap, kvh, d], &kv[0]), v: dev_bf16(&g, &[cap, kvh, d], &kv[1]) };
            let mut out = poisoned(&g, &[m, heads, d]);
            g.attention(&dev_f32(&g, &[m, heads, d], &qs), &cache, &dev_i32(&g, &ps), scale, &mut out).unwrap();
            alone.extend(read(&g, &out));
            long.extend(std::iter::repeat_n(m > 32, m));
            q.extend(qs);
            pos.extend(ps);
            seq_of.extend(std::iter::repeat_n(s as i32, m));
        }
        let mt = pos.len();
        let cache = LayerKv { k: dev_bf16(&g, &[cap, kvh, d], &paged[0]), v: dev_bf16(&g, &[cap, kvh, d], &paged[1]) };
        let tables = g.upload(Tensor::from_i32(&[seqs.len(), width], &tables).unwrap()).unwrap();
        let (positions, seqs_t, slots) = (dev_i32(&g, &pos), dev_i32(&g, &seq_of), dev_i32(&g, &vec![0; mt]));
        let pages = fusebox_core::Pages {
            positions: &positions,
            seqs: &seqs_t,
            tables: &tables,
            slots: &slots,
            block_size: bs,
        };
        let mut out = poisoned(&g, &[mt, heads, d]);
        g.paged_attention(&dev_f32(&g, &[mt, heads, d], &q), &cache, &pages, scale, &mut out).unwrap();
        let got = read(&g, &out);
        let what = format!("paged attention {heads}/{kvh} heads d={d}");
        for (i, (gr, ar)) in got.chunks(heads * d).zip(alone.chunks(heads * d)).enumerate() {
            let at = format!("{what}: row {i} (sequence {}, position {})", seq_of[i], pos[i]);
            if long[i] {
                let e = rel_err(gr, ar);
                assert!(e < TOL, "{at}: relative error {e:.2e} against the sequence alone");
            } else {
                assert!(
                    gr.iter().zip(ar).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{at}: not the bits of the sequence alone"
                );
            }
        }
        eprintln!("{what}: {mt} rows of {} sequences as each alone", seqs.len());
    }
    g.set_attn_tc(tc);
}
