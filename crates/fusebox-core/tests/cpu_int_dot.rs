//! The CPU's `int_dot` site: packed-weight matmuls with the input quantized
//! to int16 in blocks of 32 (of 256 for the K-quants). Against f64 over the dequantized weight and the
//! int16-rounded input the integer kernels are exact up to f32 rounding;
//! against the f32 input they carry the int16 rounding (relative RMS about
//! 1e-5); row r of an m-row product is bitwise the one-row product.

use fusebox_core::fusion::Site;
use fusebox_core::{Backend, DType, GgmlType, Tensor, Weight};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod common;

fn int_backend(on: bool) -> fusebox_core::cpu::CpuBackend {
    let b = common::cpu();
    b.policy().override_site(Site::IntDot, Some(on));
    b
}

/// `x` as the integer path sees it: blocks of `span` scaled by amax / 16383 and rounded.
fn int_rounded(x: &[f32], span: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks_exact(span) {
        let d = b.iter().fold(0f32, |a, v| a.max(v.abs())) / 16383.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend(b.iter().map(|&v| (v * inv).round_ties_even() * d));
    }
    out
}

fn reference(w: &Weight, x: &[f32], expert: usize) -> Vec<f32> {
    let (_, rows, cols) = w.dims();
    let mut row = vec![0f32; cols];
    let m = x.len() / cols;
    let mut out = vec![0f32; m * rows];
    for j in 0..rows {
        w.dequant_row(expert, j, &mut row).unwrap();
        for r in 0..m {
            out[r * rows + j] = row.iter().zip(&x[r * cols..]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
        }
    }
    out
}

fn matmul(b: &dyn Backend, w: &Weight, x: &[f32], m: usize) -> Vec<f32> {
    let (_, rows, cols) = w.dims();
    let mut out = Tensor::zeros(&[m, rows], DType::F32);
    out.as_f32_mut().unwrap().fill(f32::NAN);
    b.matmul(&Tensor::from_f32(&[m, cols], x).unwrap(), w, &mut out).unwrap();
    out.as_f32().unwrap().to_vec()
}

/// Test weights with the input span their integer kernels take.
fn weights(r: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<(String, Weight, usize)> {
    let mut v = Vec::new();
    for bits in [4, 8] {
        for group in [32, 64, 128] {
            v.push((format!("{bits}-bit g{group}"), common::affine(r, 1, rows, cols, bits, group, DType::BF16), 32));
        }
    }
    v.push(("4-bit g64 f16 scales".into(), common::affine(r, 1, rows, cols, 4, 64, DType::F16), 32));
    v.push(("4-bit g64 f32 scales".into(), common::affine(r, 1, rows, cols, 4, 64, DType::F32), 32));
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        let span = if ty.block_size() == 256 { 256 } else { 32 };
        v.push((ty.name().to_string(), common::ggml(r, ty, 1, rows, cols), span));
    }
    v
}

#[test]
fn int_dot_is_exact_on_the_int16_input_and_close_on_the_f32_one() {
    let (on, off) = (int_backend(true), int_backend(false));
    let mut r = ChaCha8Rng::seed_from_u64(11);
    let (rows, cols) = (45, 512);
    for (name, w, span) in weights(&mut r, rows, cols) {
        for m in [1, 3, 32] {
            let mut x = common::randv(&mut r, m * cols);
            x[..32].fill(0.0); // an all-zero block
            let got = matmul(&on, &w, &x, m);
            let what = format!("{name} m={m}");
            common::check(&got, &reference(&w, &int_rounded(&x, span), 0), 1e-5, &format!("{what} vs int16 input"));
            let e = common::check(&got, &reference(&w, &x, 0), 2e-4, &format!("{what} vs f32 input"));
            // the f32 path stays the f32 path
            common::check(&matmul(&off, &w, &x, m), &reference(&w, &x, 0), 1e-5, &format!("{what} off"));
            assert!(e > 0.0, "{what}: the integer path did not run");
            if m > 1 {
                for row in 0..m {
                    let one = matmul(&on, &w, &x[row * cols..(row + 1) * cols], 1);
                    assert_eq!(one, got[row * rows..(row + 1) * rows], "{what}: row {row} differs from one-row");
                }
            }
        }
    }
}

/// Past the one-row path (more than 32 rows) the integer path is the int16
/// GEMM: every input row quantized per block of 32 (K-quants included),
/// tiles of 6 rows x 16 weight rows with remainders in both.
#[test]
fn int_dot_prefill_is_exact_on_the_int16_input_and_close_on_the_f32_one() {
    let (on, off) = (int_backend(true), int_backend(false));
    let mut r = ChaCha8Rng::seed_from_u64(13);
    for (rows, cols) in [(45, 512), (16, 256), (7, 768)] {
        for (name, w, _) in weights(&mut r, rows, cols) {
            for m in [33, 40, 64, 100] {
                let mut x = common::randv(&mut r, m * cols);
                x[..32].fill(0.0); // an all-zero block
                let got = matmul(&on, &w, &x, m);
                let what = format!("{name} {rows}x{cols} m={m}");
                common::check(&got, &reference(&w, &int_rounded(&x, 32), 0), 1e-5, &format!("{what} vs int16 input"));
                let f32_path = matmul(&off, &w, &x, m);
                let e = common::check(&got, &f32_path, 2e-4, &format!("{what} vs the f32 path"));
                assert!(e > 0.0, "{what}: the integer path did not run");
                common::check(&f32_path, &reference(&w, &x, 0), 1e-5, &format!("{what} off"));
            }
        }
    }
}

#[test]
fn int_dot_expert_matmul_matches_reference() {
    let b = int_backend(true);
    let mut r = ChaCha8Rng::seed_from_u64(12);
    let (e, k, n, cols, m) = (5, 2, 24, 128, 3);
    for w in [common::affine(&mut r, e, n, cols, 4, 64, DType::BF16), common::ggml(&mut r, GgmlType::Q4_0, e, n, cols)]
    {
        let ids: Vec<i32> = vec![0, 3, 4, 1, 2, 2];
        let ids = Tensor::from_i32(&[m, k], &ids).unwrap();
        let x = common::randv(&mut r, m * cols);
        let xs = common::randv(&mut r, m * k * cols);
        let mut y = Tensor::zeros(&[m, k, n], DType::F32);
        b.expert_matmul(&Tensor::from_f32(&[m, cols], &x).unwrap(), &w, &ids, &mut y).unwrap();
        let mut y2 = Tensor::zeros(&[m, k, n], DType::F32);
        b.expert_matmul(&Tensor::from_f32(&[m, k, cols], &xs).unwrap(), &w, &ids, &mut y2).unwrap();
        let idv = ids.as_i32().unwrap().to_vec();
        for row in 0..m {
            for s in 0..k {
                let ex = idv[row * k + s] as usize;
                let o = (row * k + s) * n;
                let want = reference(&w, &int_rounded(&x[row * cols..(row + 1) * cols], 32), ex);
                common::check(&y.as_f32().unwrap()[o..o + n], &want, 1e-5, "expert_matmul shared");
                let xr = &xs[(row * k + s) * cols..(row * k + s + 1) * cols];
                common::check(
                    &y2.as_f32().unwrap()[o..o + n],
                    &reference(&w, &int_rounded(xr, 32), ex),
                    1e-5,
                    "per slot",
                );
            }
        }
    }
}

/// `calls` matmuls of `x` and `w` inside `Backend::run`, each timed: the
/// seconds, sorted.
fn matmul_times(b: &fusebox_core::cpu::CpuBackend, x: &Tensor, w: &Weight, out: &mut Tensor, calls: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(calls);
    b.run(&mut || {
        for _ in 0..calls {
            let t = std::time::Instant::now();
            b.matmul(x, w, out)?;
            v.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })
    .unwrap();
    v.sort_by(f64::total_cmp);
    v
}

/// Benchmark, not a check (run with `--ignored --nocapture`): one-row
/// integer matmuls of Q4_0, Q4_K and Q6_K weights x 1024 inside
/// `Backend::run`: 1024 and 4096 rows on one thread (cache-resident), then
/// 131072 rows (75-110 MB, streamed from memory as in decode) on 1 and 2
/// threads; prints the 10th-percentile time of a call in values and weight
/// bytes per second.
#[test]
#[ignore]
fn cpu_int_dot_speed() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    for (threads, rows) in [(1, 1024usize), (1, 4096), (1, 131072), (2, 131072)] {
        let b = fusebox_core::cpu::CpuBackend::new(threads).unwrap();
        b.policy().override_site(Site::IntDot, Some(true));
        for ty in [GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            let cols = 1024;
            let w = common::ggml(&mut r, ty, 1, rows, cols);
            let x = Tensor::from_f32(&[1, cols], &common::randv(&mut r, cols)).unwrap();
            let mut out = Tensor::zeros(&[1, rows], DType::F32);
            let v = matmul_times(&b, &x, &w, &mut out, (20 * ((1 << 26) / (rows * cols))).max(10));
            let s = v[v.len() / 10];
            let (vals, bytes) = ((rows * cols) as f64, (rows * cols / ty.block_size() * ty.type_size()) as f64);
            println!(
                "{} {rows} x {cols}, {threads} thread(s): {:.1} us, {:.2} Gval/s, {:.1} GB/s",
                ty.name(),
                s * 1e6,
                vals / s / 1e9,
                bytes / s / 1e9
            );
        }
    }
}

/// Benchmark, not a check (run with `--ignored --nocapture`): the prefill
/// matmul (512 input rows, past the one-row path) of Q4_K, Q6_K and Q4_0
/// weights of 1024 rows x 1024, 3072 x 1024 and 1024 x 3072 on one thread,
/// `int_dot` off (the f32 GEMM) and on (the int16 GEMM) in alternation;
/// prints the 10th-percentile time in GFLOP/s.
#[test]
#[ignore]
fn cpu_prefill_matmul_speed() {
    let b = fusebox_core::cpu::CpuBackend::new(1).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(2);
    let m = 512;
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q4_0] {
        for (rows, cols) in [(1024usize, 1024usize), (3072, 1024), (1024, 3072)] {
            let w = common::ggml(&mut r, ty, 1, rows, cols);
            let x = Tensor::from_f32(&[m, cols], &common::randv(&mut r, m * cols)).unwrap();
            let mut out = Tensor::zeros(&[m, rows], DType::F32);
            let mut v = [Vec::new(), Vec::new()];
            b.run(&mut || {
                for i in 0..10 {
                    b.policy().override_site(Site::IntDot, Some(i % 2 == 1));
                    let t = std::time::Instant::now();
                    b.matmul(&x, &w, &mut out)?;
                    v[i % 2].push(t.elapsed().as_secs_f64());
                }
                Ok(())
            })
            .unwrap();
            let flop = 2.0 * (m * rows * cols) as f64;
            let mut line = format!("{} {m} x {cols} x {rows}:", ty.name());
            for (name, v) in ["f32", "int16"].iter().zip(&mut v) {
                v.sort_by(f64::total_cmp);
                let s = v[v.len() / 10];
                line += &format!(" {name} {:.2} ms {:.1} GFLOP/s;", s * 1e3, flop / s / 1e9);
            }
            println!("{line}");
        }
    }
}

/// Benchmark, not a check (run with `--ignored --nocapture`): the decode
/// matmuls of Qwen3-0.6B's 28 layers (q, k, v, o, gate, up, down; Q4_0,
/// 247 MB, distinct weights so they stream from memory) one input row each,
/// against one matmul of 150 MB, two threads; prints the median time and
/// the weight bytes a second.
#[test]
#[ignore]
fn cpu_int_dot_layer_shapes() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let b = fusebox_core::cpu::CpuBackend::new(2).unwrap();
    b.policy().override_site(Site::IntDot, Some(true));
    let shapes =
        [(2048usize, 1024usize), (1024, 1024), (1024, 1024), (1024, 2048), (3072, 1024), (3072, 1024), (1024, 3072)];
    let ws: Vec<_> = (0..28)
        .flat_map(|_| shapes.to_vec())
        .map(|(n, k)| (common::ggml(&mut r, GgmlType::Q4_0, 1, n, k), n, k))
        .collect();
    let big_rows = 1 << 18;
    let big = common::ggml(&mut r, GgmlType::Q4_0, 1, big_rows, 1024);
    let bytes = |n: usize, k: usize| n * k / 32 * 18;
    let xs: Vec<Tensor> =
        (1..=3).map(|i| Tensor::from_f32(&[1, 1024 * i], &common::randv(&mut r, 1024 * i)).unwrap()).collect();
    let mut outs: Vec<Tensor> = (1..=3).map(|i| Tensor::zeros(&[1, 1024 * i], DType::F32)).collect();
    let mut outb = Tensor::zeros(&[1, big_rows], DType::F32);
    let mut v = [Vec::new(), Vec::new()];
    b.run(&mut || {
        for _ in 0..8 {
            let t = std::time::Instant::now();
            for (w, n, k) in &ws {
                b.matmul(&xs[k / 1024 - 1], w, &mut outs[n / 1024 - 1])?;
            }
            v[0].push(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            b.matmul(&xs[0], &big, &mut outb)?;
            v[1].push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })
    .unwrap();
    let total = [ws.iter().map(|&(_, n, k)| bytes(n, k)).sum::<usize>(), bytes(big_rows, 1024)];
    for (i, (v, what)) in v.iter_mut().zip(["28 layers, 196 matmuls", "one matmul"]).enumerate() {
        v.sort_by(f64::total_cmp);
        let s = v[v.len() / 2];
        println!("{what}: {:.2} ms, {:.1} GB/s of {} MB", s * 1e3, total[i] as f64 / s / 1e9, total[i] / 1_000_000);
    }
}

/// Benchmark, not a check: one-row Q4_0 matmuls of 16, 64 and 1024 rows x
/// 1024 (in the caches) on one and two threads, median and 10th-percentile
/// time: the fixed cost of a matmul (quantizing the input, the hand-off).
#[test]
#[ignore]
fn cpu_int_dot_small_matmuls() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    for threads in [1, 2] {
        let b = fusebox_core::cpu::CpuBackend::new(threads).unwrap();
        b.policy().override_site(Site::IntDot, Some(true));
        for (n, k) in [(16usize, 1024usize), (64, 1024), (1024, 1024)] {
            let w = common::ggml(&mut r, GgmlType::Q4_0, 1, n, k);
            let x = Tensor::from_f32(&[1, k], &common::randv(&mut r, k)).unwrap();
            let mut out = Tensor::zeros(&[1, n], DType::F32);
            let v = matmul_times(&b, &x, &w, &mut out, 2000);
            println!(
                "{threads} thread(s), {n} x {k}: median {:.2} us, p10 {:.2} us",
                v[v.len() / 2] * 1e6,
                v[v.len() / 10] * 1e6
            );
        }
    }
}

/// Benchmark, not a check: Q4_0 and Q4_1 matmuls of 65536 x 1024 weights
/// (36-40 MB, streamed from memory) against 1, 2, 4, 8 and 16 input rows on
/// two threads (a batched decode step, a verify pass), each row bitwise
/// its one-row product; prints the 10th-percentile time and its ratio to
/// one row's.
#[test]
#[ignore]
fn cpu_int_dot_rows_speed() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let b = fusebox_core::cpu::CpuBackend::new(2).unwrap();
    b.policy().override_site(Site::IntDot, Some(true));
    let (n, k) = (65536usize, 1024usize);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
        let w = common::ggml(&mut r, ty, 1, n, k);
        let mut one = 0.0;
        for m in [1usize, 2, 4, 8, 16] {
            let x = Tensor::from_f32(&[m, k], &common::randv(&mut r, m * k)).unwrap();
            let mut out = Tensor::zeros(&[m, n], DType::F32);
            let v = matmul_times(&b, &x, &w, &mut out, 40);
            let s = v[v.len() / 10];
            if m == 1 {
                one = s;
            }
            println!("{} {n} x {k}, {m} rows: {:.2} ms, {:.2}x one row", ty.name(), s * 1e3, s / one);
        }
    }
}
