//! Packed-weight ops of the CPU backend against the reference dequantizer
//! (`Weight::dequant_row`) and f64 arithmetic, plus the MoE ops.

use fusebox_core::cpu::CpuBackend;
use fusebox_core::quant::{pack, unpack};
use fusebox_core::{Backend, DType, GgmlType, Tensor, Weight};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;

/// A backend on the f32 dot products, whatever `int_dot`'s default (its
/// integer kernels have their own tests, in cpu_int_dot.rs).
fn be() -> CpuBackend {
    let b = CpuBackend::new(3).unwrap();
    b.policy().override_site(fusebox_core::fusion::Site::IntDot, Some(false));
    b
}

fn randn(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect()
}

/// A random MLX affine weight `[experts, rows, cols]`.
fn affine(r: &mut ChaCha8Rng, experts: usize, rows: usize, cols: usize, bits: u32, group: usize) -> Weight {
    let n = experts * rows;
    let vals: Vec<u32> = (0..n * cols).map(|_| r.random_range(0..1u32 << bits)).collect();
    let words: Vec<u32> = vals.chunks(cols).flat_map(|row| pack(row, bits)).collect();
    let wpr = cols * bits as usize / 32;
    let ng = cols / group;
    let lead: Vec<usize> = if experts > 1 { vec![experts, rows] } else { vec![rows] };
    let shape = |last: usize| [lead.clone(), vec![last]].concat();
    let q = Tensor::from_bytes(&shape(wpr), DType::U32, bytemuck::cast_slice(&words)).unwrap();
    let scales: Vec<u16> = (0..n * ng).map(|_| half::bf16::from_f32(r.random::<f32>() * 0.1).to_bits()).collect();
    let biases: Vec<u16> = (0..n * ng).map(|_| half::bf16::from_f32(r.random::<f32>() - 0.5).to_bits()).collect();
    let s = Tensor::from_bytes(&shape(ng), DType::BF16, bytemuck::cast_slice(&scales)).unwrap();
    let b = Tensor::from_bytes(&shape(ng), DType::BF16, bytemuck::cast_slice(&biases)).unwrap();
    Weight::affine(q, s, b, bits, group).unwrap()
}

fn reference(w: &Weight, x: &[f32], expert: usize) -> Vec<f64> {
    let (_, rows, cols) = w.dims();
    let mut row = vec![0f32; cols];
    let m = x.len() / cols;
    let mut out = vec![0f64; m * rows];
    for j in 0..rows {
        w.dequant_row(expert, j, &mut row).unwrap();
        for r in 0..m {
            out[r * rows + j] = row.iter().zip(&x[r * cols..]).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    out
}

fn assert_rel(got: &[f32], want: &[f64], tol: f64, what: &str) {
    let den = want.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-30);
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .enumerate()
        .fold((0, 0f64), |a, (i, e)| if e > a.1 { (i, e) } else { a });
    assert!(err / den < tol, "{what}: relative error {:e} at {i} (got {}, want {})", err / den, got[i], want[i]);
}

#[test]
fn pack_unpack_round_trip_every_width() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    for bits in [2, 3, 4, 5, 6, 8] {
        let vals: Vec<u32> = (0..256).map(|_| r.random_range(0..1u32 << bits)).collect();
        let words = pack(&vals, bits);
        assert_eq!(words.len(), 256 * bits as usize / 32);
        for (i, &v) in vals.iter().enumerate() {
            assert_eq!(unpack(&words, bits, i), v, "bits {bits} value {i}");
        }
    }
}

#[test]
fn affine_matmul_matches_dequantized_reference() {
    let b = be();
    let mut r = ChaCha8Rng::seed_from_u64(2);
    for bits in [2, 3, 4, 5, 6, 8] {
        for group in [32, 64, 128] {
            for (m, rows, cols) in [(1, 37, 256), (3, 5, 384)] {
                let w = affine(&mut r, 1, rows, cols, bits, group);
                let x = randn(&mut r, m * cols);
                let mut out = Tensor::zeros(&[m, rows], DType::F32);
                b.matmul(&Tensor::from_f32(&[m, cols], &x).unwrap(), &w, &mut out).unwrap();
                assert_rel(out.as_f32().unwrap(), &reference(&w, &x, 0), 1e-5, &format!("{bits}-bit g{group} m={m}"));
                // embedding of a quantized table is the dequantized row
                let mut e = Tensor::zeros(&[1, cols], DType::F32);
                b.embedding(&w, &Tensor::from_i32(&[1], &[3]).unwrap(), &mut e).unwrap();
                let mut row = vec![0f32; cols];
                w.dequant_row(0, 3, &mut row).unwrap();
                assert_eq!(e.as_f32().unwrap(), &row[..]);
            }
        }
    }
}

#[test]
fn ggml_matmul_matches_dequantized_reference() {
    let b = be();
    let mut r = ChaCha8Rng::seed_from_u64(3);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        for (m, rows) in [(1, 19), (4, 6)] {
            let cols = 512;
            let w = common::ggml(&mut r, ty, 1, rows, cols);
            let x = randn(&mut r, m * cols);
            let mut out = Tensor::zeros(&[m, rows], DType::F32);
            b.matmul(&Tensor::from_f32(&[m, cols], &x).unwrap(), &w, &mut out).unwrap();
            assert_rel(out.as_f32().unwrap(), &reference(&w, &x, 0), 1e-5, &format!("{} m={m}", ty.name()));
        }
    }
}

#[test]
fn moe_ops_match_per_expert_reference() {
    let b = be();
    let mut r = ChaCha8Rng::seed_from_u64(4);
    let (e, k, n, cols, m) = (6, 2, 24, 64, 3);
    let w = affine(&mut r, e, n, cols, 4, 32);
    let logits = randn(&mut r, m * e);
    let mut ids = Tensor::zeros(&[m, k], DType::I32);
    let mut wts = Tensor::zeros(&[m, k], DType::F32);
    b.topk_router(&Tensor::from_f32(&[m, e], &logits).unwrap(), true, &mut ids, &mut wts).unwrap();
    for row in 0..m {
        let l = &logits[row * e..(row + 1) * e];
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        let got = &ids.as_i32().unwrap()[row * k..(row + 1) * k];
        assert_eq!(got, &[order[0] as i32, order[1] as i32]);
        let p: Vec<f64> = order[..k].iter().map(|&i| (l[i] as f64).exp()).collect();
        let ws = &wts.as_f32().unwrap()[row * k..(row + 1) * k];
        for s in 0..k {
            assert!((ws[s] as f64 - p[s] / (p[0] + p[1])).abs() < 1e-6);
        }
    }
    // shared input [m, cols] and per-slot input [m, k, cols]
    let x = randn(&mut r, m * cols);
    let xs = randn(&mut r, m * k * cols);
    let mut y = Tensor::zeros(&[m, k, n], DType::F32);
    b.expert_matmul(&Tensor::from_f32(&[m, cols], &x).unwrap(), &w, &ids, &mut y).unwrap();
    let mut y2 = Tensor::zeros(&[m, k, n], DType::F32);
    b.expert_matmul(&Tensor::from_f32(&[m, k, cols], &xs).unwrap(), &w, &ids, &mut y2).unwrap();
    let idv = ids.as_i32().unwrap().to_vec();
    for row in 0..m {
        for s in 0..k {
            let ex = idv[row * k + s] as usize;
            let o = (row * k + s) * n;
            let want = reference(&w, &x[row * cols..(row + 1) * cols], ex);
            assert_rel(&y.as_f32().unwrap()[o..o + n], &want, 1e-5, "expert_matmul shared");
            let want = reference(&w, &xs[(row * k + s) * cols..(row * k + s + 1) * cols], ex);
            assert_rel(&y2.as_f32().unwrap()[o..o + n], &want, 1e-5, "expert_matmul per slot");
        }
    }
    let mut out = Tensor::zeros(&[m, n], DType::F32);
    b.moe_combine(&y, &wts, &mut out).unwrap();
    let (yv, wv) = (y.as_f32().unwrap(), wts.as_f32().unwrap());
    let want: Vec<f64> = (0..m * n)
        .map(|i| {
            let (row, j) = (i / n, i % n);
            (0..k).map(|s| wv[row * k + s] as f64 * yv[(row * k + s) * n + j] as f64).sum()
        })
        .collect();
    assert_rel(out.as_f32().unwrap(), &want, 1e-6, "moe_combine");
    // an expert id out of range is an error, not a panic
    let bad = Tensor::from_i32(&[1, 2], &[0, 6]).unwrap();
    assert!(b.expert_matmul(&Tensor::from_f32(&[1, cols], &x[..cols]).unwrap(), &w, &bad, &mut y).is_err());
}

#[test]
fn bad_affine_shapes_are_rejected() {
    let q = Tensor::zeros(&[4, 8], DType::U32); // 4 rows of 64 4-bit values
    let s = Tensor::zeros(&[4, 2], DType::BF16);
    assert!(Weight::affine(q.clone(), s.clone(), s.clone(), 4, 32).is_ok());
    let err = Weight::affine(q.clone(), s.clone(), s.clone(), 4, 64).unwrap_err();
    assert!(format!("{err}").contains("scales have shape"), "{err}");
    assert!(Weight::affine(q.clone(), s.clone(), s, 7, 32).is_err());
}
