//! The CUDA matmul (GEMV for m <= 8, cuBLAS above), expert matmul and
//! embedding against the CPU backend, for dense, MLX affine and GGUF
//! weights. Every test skips without a GPU (`FUSEBOX_REQUIRE_CUDA=1` makes
//! that a failure). `cuda_gemv_bandwidth` (ignored) times the decode GEMV.

use fusebox_core::cuda::{backend_for_tests, CudaBackend};
use fusebox_core::fusion::Site;
use fusebox_core::{Backend, DType, GgmlType, Tensor, Weight};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::*;

/// GPU and CPU `x @ w^T` for a random x of m rows.
fn both_matmul(be: &CudaBackend, w: &Weight, gw: &Weight, m: usize, r: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>) {
    let (_, n, k) = w.dims();
    let x = Tensor::from_f32(&[m, k], &randv(r, m * k)).unwrap();
    let mut want = Tensor::zeros(&[m, n], DType::F32);
    cpu().matmul(&x, w, &mut want).unwrap();
    let mut out = poisoned(be, &[m, n]);
    be.matmul(&be.upload(x).unwrap(), gw, &mut out).unwrap();
    (read(be, &out), want.as_f32().unwrap().to_vec())
}

#[test]
fn dense_matmul_matches_cpu() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(11);
    // the last ones: scalar fallback (k % 8 != 0), several row groups per warp
    let shapes = [(1, 48), (7, 96), (64, 160), (300, 1024), (2048, 512), (5, 37), (3, 100), (20000, 64)];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut worst = [0f64; 2];
        for &(n, k) in &shapes {
            let w = dense(&mut r, dtype, 1, n, k);
            let gw = be.upload_weight(w.clone()).unwrap();
            for m in [1, 2, 5, 8, 9, 33] {
                let (got, want) = both_matmul(&be, &w, &gw, m, &mut r);
                let gemm = m > 8;
                let tol = if gemm && dtype == DType::BF16 { 1e-2 } else { 1e-5 };
                let e = check(&got, &want, tol, &format!("{dtype} [{m}, {k}] x [{n}, {k}]^T"));
                worst[gemm as usize] = worst[gemm as usize].max(e);
            }
        }
        println!("dense {dtype}: worst relative error GEMV {:.2e}, cuBLAS {:.2e}", worst[0], worst[1]);
    }
}

/// The affine weights the matmul tests take, as (group, scale type, n, k):
/// every group size, bf16/f16/f32 scales (varied with the bit width), and
/// also x staged in several windows (k = 14336) and several row groups per
/// warp (n = 9000).
fn affine_cases(bits: u32) -> Vec<(usize, DType, usize, usize)> {
    let mut v = vec![];
    for group in [32, 64, 128] {
        let sdt = [DType::BF16, DType::F16, DType::F32][(bits as usize + group / 32) % 3];
        let big = if group == 128 { (5, 14336) } else { (9000, 2 * group) };
        for (n, k) in [(7, 3 * group), (300, 1024 + group), (1, 4096), big] {
            v.push((group, sdt, n, k));
        }
    }
    v
}

#[test]
fn affine_matmul_matches_cpu() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(12);
    for bits in [2, 3, 4, 5, 6, 8] {
        let mut worst = [0f64; 2];
        for (group, sdt, n, k) in affine_cases(bits) {
            let w = affine(&mut r, 1, n, k, bits, group, sdt);
            let gw = be.upload_weight(w.clone()).unwrap();
            // 40 rows: past ROW_EXACT_MAX, the dequantized weight through cuBLAS
            for m in [1, 3, 8, 12, 40] {
                let (got, want) = both_matmul(&be, &w, &gw, m, &mut r);
                let gemm = m > fusebox_core::backend::ROW_EXACT_MAX;
                let what = format!("{bits}-bit g{group} {sdt} scales [{m}, {k}] x [{n}, {k}]^T");
                let e = check(&got, &want, if gemm { 1e-2 } else { 1e-3 }, &what);
                worst[gemm as usize] = worst[gemm as usize].max(e);
            }
        }
        println!("affine {bits}-bit: worst relative error GEMV {:.2e}, cuBLAS {:.2e}", worst[0], worst[1]);
    }
}

#[test]
fn gguf_matmul_matches_cpu() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(13);
    for ty in GGUF_TYPES {
        let mut worst = [0f64; 2];
        for (n, k) in [(19, 512), (300, 256), (64, 2816)] {
            let w = ggml(&mut r, ty, 1, n, k);
            let gw = be.upload_weight(w.clone()).unwrap();
            assert!(matches!(gw, Weight::Affine { .. }), "{} should become an affine weight", ty.name());
            for m in [1, 4, 12, 40] {
                let (got, want) = both_matmul(&be, &w, &gw, m, &mut r);
                let gemm = m > fusebox_core::backend::ROW_EXACT_MAX;
                let what = format!("{} [{m}, {k}] x [{n}, {k}]^T", ty.name());
                let e = check(&got, &want, if gemm { 1e-2 } else { 1e-3 }, &what);
                worst[gemm as usize] = worst[gemm as usize].max(e);
            }
        }
        println!("{}: worst relative error GEMV {:.2e}, cuBLAS {:.2e}", ty.name(), worst[0], worst[1]);
    }
    // f32 / f16 GGUF tensors are dense weights
    let v = randv(&mut r, 8 * 64);
    let h: Vec<u16> = v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
    let w = Weight::gguf(
        Tensor::from_bytes(&[8 * 64 * 2], DType::U8, bytemuck::cast_slice(&h)).unwrap(),
        GgmlType::F16,
        1,
        8,
        64,
    )
    .unwrap();
    let gw = be.upload_weight(w).unwrap();
    let dw = Weight::dense(host_tensor(&[8, 64], DType::F16, &v)).unwrap();
    let (got, want) = both_matmul(&be, &dw, &gw, 1, &mut r);
    check(&got, &want, 1e-5, "F16 GGUF");
}

#[test]
fn expert_matmul_matches_cpu() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(14);
    let (e, n, k) = (6, 40, 256);
    let weights = vec![
        ("bf16", dense(&mut r, DType::BF16, e, n, k)),
        ("f32", dense(&mut r, DType::F32, e, n, k)),
        ("4-bit g64", affine(&mut r, e, n, k, 4, 64, DType::BF16)),
        ("3-bit g32", affine(&mut r, e, n, k, 3, 32, DType::F16)),
        ("Q4_K", ggml(&mut r, GgmlType::Q4_K, e, n, k)),
        ("Q6_K", ggml(&mut r, GgmlType::Q6_K, e, n, k)),
    ];
    for (name, w) in &weights {
        let gw = be.upload_weight(w.clone()).unwrap();
        for (m, slots) in [(1, 2), (3, 4), (5, 1)] {
            let idv: Vec<i32> = (0..m * slots).map(|_| r.random_range(0..e as i32)).collect();
            let ids = Tensor::from_i32(&[m, slots], &idv).unwrap();
            let gids = be.upload(ids.clone()).unwrap();
            for shared in [true, false] {
                let xs = if shared { vec![m, k] } else { vec![m, slots, k] };
                let x = Tensor::from_f32(&xs, &randv(&mut r, xs.iter().product())).unwrap();
                let mut want = Tensor::zeros(&[m, slots, n], DType::F32);
                cpu().expert_matmul(&x, w, &ids, &mut want).unwrap();
                let mut out = poisoned(&be, &[m, slots, n]);
                be.expert_matmul(&be.upload(x).unwrap(), &gw, &gids, &mut out).unwrap();
                let tol = if name.contains("bit") || name.starts_with('Q') { 1e-3 } else { 1e-5 };
                check(
                    &read(&be, &out),
                    want.as_f32().unwrap(),
                    tol,
                    &format!("{name} m={m} slots={slots} shared={shared}"),
                );
            }
        }
    }
    // an expert id out of range gives zeros (the CPU backend reports an error)
    let w = &weights[2].1;
    let gw = be.upload_weight(w.clone()).unwrap();
    let gids = be.upload(Tensor::from_i32(&[1, 2], &[1, e as i32]).unwrap()).unwrap();
    let x = be.upload(Tensor::from_f32(&[1, k], &randv(&mut r, k)).unwrap()).unwrap();
    let mut out = poisoned(&be, &[1, 2, n]);
    be.expert_matmul(&x, &gw, &gids, &mut out).unwrap();
    let got = read(&be, &out);
    assert!(got[..n].iter().all(|v| v.is_finite()) && got[n..].iter().all(|&v| v == 0.0), "bad expert id");
}

#[test]
fn embedding_matches_cpu() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(15);
    let (vocab, dim) = (50, 256);
    let mut tables: Vec<(String, Weight)> = vec![];
    for dt in [DType::F32, DType::F16, DType::BF16] {
        tables.push((format!("dense {dt}"), dense(&mut r, dt, 1, vocab, dim)));
    }
    tables.push(("dense bf16 odd width".into(), dense(&mut r, DType::BF16, 1, vocab, 37)));
    for (bits, group) in [(2, 32), (3, 64), (4, 128), (5, 32), (6, 64), (8, 128)] {
        tables.push((format!("{bits}-bit g{group}"), affine(&mut r, 1, vocab, dim, bits, group, DType::BF16)));
    }
    for ty in GGUF_TYPES {
        tables.push((ty.name().to_string(), ggml(&mut r, ty, 1, vocab, dim)));
    }
    for (name, w) in &tables {
        let gw = be.upload_weight(w.clone()).unwrap();
        let d = w.dims().2;
        let idv: Vec<i32> =
            (0..7).map(|i| if i == 3 { vocab as i32 - 1 } else { r.random_range(0..vocab as i32) }).collect();
        let ids = Tensor::from_i32(&[7], &idv).unwrap();
        let mut want = Tensor::zeros(&[7, d], DType::F32);
        cpu().embedding(w, &ids, &mut want).unwrap();
        let mut out = poisoned(&be, &[7, d]);
        be.embedding(&gw, &be.upload(ids).unwrap(), &mut out).unwrap();
        let got = read(&be, &out);
        if name.starts_with('Q') {
            // re-laid out GGUF rows: equal up to one rounding per value
            check(&got, want.as_f32().unwrap(), 1e-6, name);
        } else {
            assert_eq!(got, want.as_f32().unwrap(), "{name}: embedding rows differ");
        }
    }
}

/// The decode step is captured as a graph: the GEMV and expert GEMV must
/// read x and the expert ids from device memory on every replay.
#[test]
fn gemv_replays_in_a_graph() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(16);
    let (e, n, k) = (4, 96, 512);
    let w = affine(&mut r, 1, n, k, 4, 64, DType::BF16);
    let we = affine(&mut r, e, n, k, 4, 32, DType::BF16);
    let (gw, gwe) = (be.upload_weight(w.clone()).unwrap(), be.upload_weight(we.clone()).unwrap());
    let mut x = be.zeros(&[1, k], DType::F32).unwrap();
    let mut ids = be.zeros(&[1, 2], DType::I32).unwrap();
    let mut y = be.zeros(&[1, n], DType::F32).unwrap();
    let mut ye = be.zeros(&[1, 2, n], DType::F32).unwrap();
    for step in 0..4 {
        let xv = randv(&mut r, k);
        let idv = [r.random_range(0..e as i32), r.random_range(0..e as i32)];
        be.write_f32(&mut x, &xv).unwrap();
        be.write_i32(&mut ids, &idv).unwrap();
        be.run_graph(0x6e6d76, &mut || {
            be.matmul(&x, &gw, &mut y)?;
            be.expert_matmul(&x, &gwe, &ids, &mut ye)
        })
        .unwrap();
        let hx = Tensor::from_f32(&[1, k], &xv).unwrap();
        let (mut want, mut wante) = (Tensor::zeros(&[1, n], DType::F32), Tensor::zeros(&[1, 2, n], DType::F32));
        cpu().matmul(&hx, &w, &mut want).unwrap();
        cpu().expert_matmul(&hx, &we, &Tensor::from_i32(&[1, 2], &idv).unwrap(), &mut wante).unwrap();
        check(&read(&be, &y), want.as_f32().unwrap(), 1e-3, &format!("graph step {step}"));
        check(&read(&be, &ye), wante.as_f32().unwrap(), 1e-3, &format!("graph expert step {step}"));
    }
}

#[test]
fn bad_matmul_arguments_are_errors() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(17);
    let gw = be.upload_weight(dense(&mut r, DType::BF16, 1, 8, 64)).unwrap();
    let x = be.upload(Tensor::from_f32(&[2, 64], &randv(&mut r, 128)).unwrap()).unwrap();
    let mut small = be.zeros(&[2, 7], DType::F32).unwrap();
    assert!(be.matmul(&x, &gw, &mut small).is_err());
    let x48 = be.upload(Tensor::from_f32(&[1, 48], &randv(&mut r, 48)).unwrap()).unwrap();
    let mut out = be.zeros(&[1, 8], DType::F32).unwrap();
    assert!(be.matmul(&x48, &gw, &mut out).is_err());
    // a host input is refused, not read
    let hx = Tensor::from_f32(&[1, 64], &randv(&mut r, 64)).unwrap();
    assert!(be.matmul(&hx, &gw, &mut out).is_err());
    // a GGUF weight that skipped upload_weight
    let raw = ggml(&mut r, GgmlType::Q4_0, 1, 8, 64);
    assert!(be
        .matmul(&be.upload(Tensor::from_f32(&[1, 64], &randv(&mut r, 64)).unwrap()).unwrap(), &raw, &mut out)
        .is_err());
}

/// A device weight of random values: bf16 dense (`bits == 16`) or affine
/// with `bits`, `group` and scales/biases of `sdt`.
fn device_weight(be: &CudaBackend, bits: u32, group: usize, sdt: DType, n: usize, k: usize, seed: u64) -> Weight {
    if bits == 16 {
        let mut t = be.zeros(&[n, k], DType::BF16).unwrap();
        be.fill_random(&mut t, seed, -1.0, 1.0).unwrap();
        return Weight::dense(t).unwrap();
    }
    let mut q = be.zeros(&[n, k * bits as usize / 32], DType::U32).unwrap();
    let mut s = be.zeros(&[n, k / group], sdt).unwrap();
    let mut b = be.zeros(&[n, k / group], sdt).unwrap();
    be.fill_random(&mut q, seed, 0.0, 1.0).unwrap();
    be.fill_random(&mut s, seed + 1, 0.001, 0.01).unwrap();
    be.fill_random(&mut b, seed + 2, -0.1, 0.1).unwrap();
    if group == 16 {
        // the GGUF Q6_K layout (Weight::affine only takes MLX group sizes)
        return Weight::Affine { q, scales: s, biases: b, bits, group_size: group, experts: 1, rows: n, cols: k };
    }
    Weight::affine(q, s, b, bits, group).unwrap()
}

/// Decode GEMV (m = 1) bandwidth: weight bytes per second, timed over CUDA
/// graph replays of 100 launches that rotate over enough weight copies to
/// spill the L2. Run with `--ignored --nocapture` on a GPU;
/// `FUSEBOX_BENCH_ALL=1` adds more formats, `FUSEBOX_BENCH_ONLY=4-bit` (a
/// substring of "<format> <n>x<k>") picks rows, `FUSEBOX_BENCH_M=1,4,16`
/// times those input row counts (default 1; each line also gives the time
/// as a multiple of the same weight's one-row product when 1 is listed).
#[test]
#[ignore]
fn cuda_gemv_bandwidth() {
    let Some(be) = backend_for_tests() else { return };
    let copy = be.copy_bandwidth().unwrap();
    println!("{}: copy bandwidth {copy:.0} GB/s (read + write)", be.name());
    let mut formats = vec![("bf16", 16, 0, DType::BF16), ("4-bit g64", 4, 64, DType::BF16)];
    if std::env::var("FUSEBOX_BENCH_ALL").is_ok_and(|v| v == "1") {
        formats.extend([
            ("8-bit g32 f16", 8, 32, DType::F16),
            ("5-bit g32 f32", 5, 32, DType::F32),
            ("6-bit g16 f32", 6, 16, DType::F32),
            ("3-bit g64", 3, 64, DType::BF16),
        ]);
    }
    // FUSEBOX_BENCH_ONLY: time only the rows whose label contains it (profiling)
    let only = std::env::var("FUSEBOX_BENCH_ONLY").unwrap_or_default();
    let ms: Vec<usize> = match std::env::var("FUSEBOX_BENCH_M") {
        Ok(v) => v.split(',').map(|t| t.trim().parse().expect("FUSEBOX_BENCH_M: a list like 1,4,16")).collect(),
        Err(_) => vec![1],
    };
    let mut rows = vec![];
    let mut key = 0x6762_0000u64;
    for &(fmt, bits, group, sdt) in &formats {
        for (n, k) in [(4096, 4096), (4096, 12288), (12288, 4096), (151936, 1024), (1024, 4096)] {
            if !format!("{fmt} {n}x{k}").contains(only.as_str()) {
                continue;
            }
            let one = device_weight(&be, bits, group, sdt, n, k, 1);
            let bytes = one.size_bytes();
            let copies = ((512usize << 20) / bytes).clamp(1, 64);
            let mut ws = vec![one];
            for c in 1..copies {
                ws.push(device_weight(&be, bits, group, sdt, n, k, 10 * c as u64 + 1));
            }
            let mut one_row = None;
            for &m in &ms {
                let mut x = be.zeros(&[m, k], DType::F32).unwrap();
                be.fill_random(&mut x, 7, -1.0, 1.0).unwrap();
                let mut out = be.zeros(&[m, n], DType::F32).unwrap();
                const REPS: usize = 100;
                key += 1;
                let mut f = || {
                    for i in 0..REPS {
                        be.matmul(&x, &ws[i % copies], &mut out)?;
                    }
                    Ok(())
                };
                for _ in 0..3 {
                    be.run_graph(key, &mut f).unwrap();
                }
                be.synchronize().unwrap();
                let mut times = vec![];
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    for _ in 0..4 {
                        be.run_graph(key, &mut f).unwrap();
                    }
                    be.synchronize().unwrap();
                    times.push(t.elapsed().as_secs_f64() / (4 * REPS) as f64);
                }
                times.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let s = times[times.len() / 2];
                if m == 1 {
                    one_row = Some(s);
                }
                let gbs = bytes as f64 / s / 1e9;
                let vs_one = one_row.map(|t| format!(" {:>5.2}x one row", s / t)).unwrap_or_default();
                rows.push(format!(
                    "{fmt:>14} {n:>6} x {k:<6} m {m:>2} {:>8.1} MB {:>8.2} us {gbs:>7.0} GB/s {:>5.1}% of copy{vs_one}",
                    bytes as f64 / 1e6,
                    s * 1e6,
                    100.0 * gbs / copy
                ));
            }
            drop(ws);
        }
    }
    println!("{}", rows.join("\n"));
}

/// The first row of the m-row product `got` of `xs` (m rows of k) and `gw`
/// that differs in any bit from its one-row product: (row, output, the m-row
/// value, the one-row value).
fn first_differing_row(be: &CudaBackend, gw: &Weight, xs: &[f32], got: &[f32]) -> Option<(usize, usize, f32, f32)> {
    let (_, n, k) = gw.dims();
    (0..xs.len() / k).find_map(|row| {
        let mut one = poisoned(be, &[1, n]);
        let x1 = Tensor::from_f32(&[1, k], &xs[row * k..(row + 1) * k]).unwrap();
        be.matmul(&be.upload(x1).unwrap(), gw, &mut one).unwrap();
        let want = read(be, &one);
        let i = got[row * n..(row + 1) * n].iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits())?;
        Some((row, i, got[row * n + i], want[i]))
    })
}

/// Row r of an m-row product is bitwise the one-row product of row r, for
/// every GEMV variant (1, 2, 4 and 8 rows a kernel) and a split or unsplit k:
/// what makes a speculative verify pass score exactly what decode steps do.
#[test]
fn gemv_rows_are_bitwise_one_row_products() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(15);
    let weights = vec![
        ("bf16 4096 x 1024", dense(&mut r, DType::BF16, 1, 4096, 1024)),
        ("4-bit g64 4096 x 2048", affine(&mut r, 1, 4096, 2048, 4, 64, DType::BF16)),
        ("4-bit g64 300 x 1024", affine(&mut r, 1, 300, 1024, 4, 64, DType::BF16)),
        ("8-bit g32 1000 x 512", affine(&mut r, 1, 1000, 512, 8, 32, DType::F16)),
        ("6-bit g16 (Q6_K) 256 x 512", ggml(&mut r, GgmlType::Q6_K, 1, 256, 512)),
    ];
    for (name, w) in weights {
        let (_, n, k) = w.dims();
        let gw = be.upload_weight(w).unwrap();
        for m in [2, 3, 4, 5, 8, 12, 32] {
            let xs = randv(&mut r, m * k);
            let mut out = poisoned(&be, &[m, n]);
            be.matmul(&be.upload(Tensor::from_f32(&[m, k], &xs).unwrap()).unwrap(), &gw, &mut out).unwrap();
            let got = read(&be, &out);
            if let Some((row, i, a, b)) = first_differing_row(&be, &gw, &xs, &got) {
                panic!("{name}: row {row} of {m} differs from its one-row product (output {i}: {a} vs {b})");
            }
        }
    }
}

/// The `int_dot` site (4- and 8-bit affine weights through int16 x and exact
/// integer dot products): within 4e-4 of the CPU's f32 product (measured
/// worst: 5.1e-5 for 4-bit, 1.3e-4 for 8-bit, on a single output), for every
/// group size and scale type, several x windows and row groups, and with row
/// r of an m-row product bitwise its one-row product.
#[test]
fn int_dot_gemv_matches_cpu_and_rows_agree() {
    let Some(be) = backend_for_tests() else { return };
    be.policy().override_site(Site::IntDot, Some(true));
    let c = cpu();
    c.policy().override_site(Site::IntDot, Some(false));
    let mut r = ChaCha8Rng::seed_from_u64(16);
    for bits in [4, 8] {
        let mut worst = 0f64;
        for (group, sdt, n, k) in affine_cases(bits) {
            let w = affine(&mut r, 1, n, k, bits, group, sdt);
            let gw = be.upload_weight(w.clone()).unwrap();
            for m in [1, 3, 8] {
                let xs = randv(&mut r, m * k);
                let x = Tensor::from_f32(&[m, k], &xs).unwrap();
                let mut want = Tensor::zeros(&[m, n], DType::F32);
                c.matmul(&x, &w, &mut want).unwrap();
                let mut out = poisoned(&be, &[m, n]);
                be.matmul(&be.upload(x).unwrap(), &gw, &mut out).unwrap();
                let got = read(&be, &out);
                let what = format!("int_dot {bits}-bit g{group} {sdt} scales [{m}, {k}] x [{n}, {k}]^T");
                worst = worst.max(check(&got, want.as_f32().unwrap(), 4e-4, &what));
                for row in 0..m.min(3) {
                    let mut one = poisoned(&be, &[1, n]);
                    let x1 = Tensor::from_f32(&[1, k], &xs[row * k..(row + 1) * k]).unwrap();
                    be.matmul(&be.upload(x1).unwrap(), &gw, &mut one).unwrap();
                    let same = got[row * n..(row + 1) * n]
                        .iter()
                        .zip(read(&be, &one))
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}: row {row} differs from its one-row product");
                }
            }
        }
        println!("int_dot {bits}-bit: worst relative error {worst:.2e}");
    }
}

/// `FUSEBOX_GEMV_TC` (gemv_tc.cu): 4-bit int_dot products of 5 to 32 rows on
/// the tensor cores (and the rows left to the GEMV's kernels) give every row
/// bitwise its one-row (decode GEMV) product, through the one-row plan's k
/// splits (1 to 8 slices), x windows (k past 8192), partial steps (k not a
/// multiple of 1024), every group size and scale type, and row counts that
/// take one 8- or 16-row launch, two, or a launch and a GEMV remainder.
#[test]
fn gemv_tc_rows_are_bitwise_one_row_products() {
    let Some(be) = backend_for_tests() else { return };
    be.policy().override_site(Site::IntDot, Some(true));
    be.set_gemv_tc(true);
    let mut r = ChaCha8Rng::seed_from_u64(17);
    let cases = [
        (64, DType::BF16, 4096, 4096),
        (64, DType::BF16, 12288, 4096),
        (64, DType::BF16, 4096, 12288),
        (32, DType::F16, 1024, 4096),
        (128, DType::F32, 300, 14336),
        (32, DType::BF16, 7, 96),
        (64, DType::F16, 33, 1088),
    ];
    for (group, sdt, n, k) in cases {
        let gw = be.upload_weight(affine(&mut r, 1, n, k, 4, group, sdt)).unwrap();
        for m in [2, 5, 8, 9, 12, 16, 17, 21, 32] {
            let xs = randv(&mut r, m * k);
            let mut out = poisoned(&be, &[m, n]);
            be.matmul(&be.upload(Tensor::from_f32(&[m, k], &xs).unwrap()).unwrap(), &gw, &mut out).unwrap();
            let got = read(&be, &out);
            if let Some((row, i, a, b)) = first_differing_row(&be, &gw, &xs, &got) {
                panic!(
                    "gemv_tc 4-bit g{group} {sdt} [{m}, {k}] x [{n}, {k}]^T: row {row}, output {i}: {a} vs one-row {b}"
                );
            }
        }
    }
    be.set_gemv_tc(false);
}
