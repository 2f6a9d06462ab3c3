//! Site `tc_matmul`: the tensor-core 4-bit matmul (kernels/qmm.cu) at every
//! row count from 1 to 32 against the CPU's dequantized f32 product, and each
//! row of an m-row product bitwise equal to that row's one-row product (what
//! keeps speculative and batched greedy output equal to plain greedy). Skips
//! without a GPU (`FUSEBOX_REQUIRE_CUDA=1` makes that a failure).

use fusebox_core::cuda::{backend_for_tests, CudaBackend};
use fusebox_core::fusion::Site;
use fusebox_core::{Backend, DType, GgmlType, Tensor, Weight};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::*;

/// `x @ w^T` on the GPU with the site on.
fn gpu_matmul(be: &CudaBackend, gw: &Weight, x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let xt = be.upload(Tensor::from_f32(&[m, k], x).unwrap()).unwrap();
    let mut out = poisoned(be, &[m, n]);
    be.matmul(&xt, gw, &mut out).unwrap();
    read(be, &out)
}

fn cpu_matmul(w: &Weight, x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let c = cpu();
    c.policy().override_site(Site::IntDot, Some(false));
    let mut want = Tensor::zeros(&[m, n], DType::F32);
    c.matmul(&Tensor::from_f32(&[m, k], x).unwrap(), w, &mut want).unwrap();
    want.as_f32().unwrap().to_vec()
}

/// Every row count 1..=32 against the CPU; rows bitwise equal to one-row products.
fn check_weight(be: &CudaBackend, w: &Weight, what: &str, r: &mut ChaCha8Rng) -> f64 {
    let (_, n, k) = w.dims();
    let gw = be.upload_weight(w.clone()).unwrap();
    let x = randv(r, 32 * k);
    let want = cpu_matmul(w, &x, 32, n, k);
    // one row at a time: the decode product of each row
    let ones: Vec<Vec<f32>> = (0..32).map(|i| gpu_matmul(be, &gw, &x[i * k..(i + 1) * k], 1, n, k)).collect();
    let mut worst = 0f64;
    for m in 1..=32 {
        let got = gpu_matmul(be, &gw, &x[..m * k], m, n, k);
        let e = check(&got, &want[..m * n], 1e-4, &format!("{what}: [{m}, {k}] x [{n}, {k}]^T"));
        worst = worst.max(e);
        for (i, one) in ones.iter().enumerate().take(m) {
            let row = &got[i * n..(i + 1) * n];
            if let Some(j) = row.iter().zip(one).position(|(a, b)| a.to_bits() != b.to_bits()) {
                panic!(
                    "{what}: row {i} of a {m}-row product differs from its one-row product at {j}: {} vs {}",
                    row[j], one[j]
                );
            }
        }
    }
    worst
}

#[test]
fn tc_matmul_matches_cpu_at_every_row_count_and_rows_match_one_row_products() {
    let Some(be) = backend_for_tests() else { return };
    be.set_fused(Site::TcMatmul, true);
    let mut r = ChaCha8Rng::seed_from_u64(31);
    // (n, k, group, scale dtype): the k split differs across them (1 to 8 warps a row tile)
    let cases = [
        (64, 1024, 64, DType::BF16),
        (1024, 4096, 64, DType::BF16),
        (4096, 1024, 32, DType::F16),
        (256, 2048, 128, DType::F32),
        (48, 256, 32, DType::F32),
        (20000, 128, 128, DType::BF16),
    ];
    for (n, k, group, sdt) in cases {
        let w = affine(&mut r, 1, n, k, 4, group, sdt);
        let what = format!("4-bit g{group} {sdt} scales");
        let worst = check_weight(&be, &w, &what, &mut r);
        println!("{what} [{n}, {k}]: worst relative error {worst:.2e} over m = 1..32");
    }
    // GGUF Q4_0 and Q4_K become 4-bit affine weights of groups of 32 at upload
    for ty in [GgmlType::Q4_0, GgmlType::Q4_K] {
        let w = ggml(&mut r, ty, 1, 512, 1024);
        let what = format!("{ty:?}");
        let worst = check_weight(&be, &w, &what, &mut r);
        println!("{what} [512, 1024]: worst relative error {worst:.2e} over m = 1..32");
    }
}

/// Run to run, the same bits.
#[test]
fn tc_matmul_is_deterministic() {
    let Some(be) = backend_for_tests() else { return };
    be.set_fused(Site::TcMatmul, true);
    let mut r = ChaCha8Rng::seed_from_u64(32);
    let (n, k) = (2048, 4096);
    let w = affine(&mut r, 1, n, k, 4, 64, DType::BF16);
    let gw = be.upload_weight(w).unwrap();
    let x = randv(&mut r, 16 * k);
    let a = gpu_matmul(&be, &gw, &x, 16, n, k);
    for _ in 0..3 {
        let b = gpu_matmul(&be, &gw, &x, 16, n, k);
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "two runs differ");
    }
}

/// `expert_matmul` on the GPU.
fn gpu_experts(be: &CudaBackend, gw: &Weight, x: &Tensor, ids: &Tensor, n: usize) -> Vec<f32> {
    let (m, slots) = (ids.shape()[0], ids.shape()[1]);
    let mut out = poisoned(be, &[m, slots, n]);
    be.expert_matmul(&be.upload(x.clone()).unwrap(), gw, &be.upload(ids.clone()).unwrap(), &mut out).unwrap();
    read(be, &out)
}

/// MoE prefill: past `ROW_EXACT_MAX` rows the pairs are grouped by expert
/// (kernels `qmm_group`, `qmme4_*`), shared input or one per pair, chunks of
/// up to 32 pairs; against the CPU, run to run bitwise, and with the site on
/// a pair's row is bitwise the same at every pair count.
#[test]
fn grouped_expert_matmul_matches_cpu() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(33);
    let weights = [
        ("4-bit g64 bf16", affine(&mut r, 8, 64, 512, 4, 64, DType::BF16)),
        ("4-bit g32 f16", affine(&mut r, 16, 48, 256, 4, 32, DType::F16)),
        ("4-bit g128 f32", affine(&mut r, 4, 32, 1024, 4, 128, DType::F32)),
        ("Q4_0", ggml(&mut r, GgmlType::Q4_0, 8, 64, 512)),
        ("Q4_K", ggml(&mut r, GgmlType::Q4_K, 6, 32, 256)),
    ];
    for (name, w) in &weights {
        let (e, n, k) = w.dims();
        let gw = be.upload_weight(w.clone()).unwrap();
        for (m, slots) in [(33, 1), (40, 2), (100, 4)] {
            // mostly valid experts, a few outside [0, e) (zero rows)
            let idv: Vec<i32> = (0..m * slots)
                .map(|i| if i % 37 == 5 { [-1, e as i32][i % 2] } else { r.random_range(0..e as i32) })
                .collect();
            let ids = Tensor::from_i32(&[m, slots], &idv).unwrap();
            for shared in [true, false] {
                let xs = if shared { vec![m, k] } else { vec![m, slots, k] };
                let x = Tensor::from_f32(&xs, &randv(&mut r, xs.iter().product())).unwrap();
                let what = format!("{name} m={m} slots={slots} shared={shared}");
                let c = cpu();
                c.policy().override_site(Site::IntDot, Some(false));
                let mut want = Tensor::zeros(&[m, slots, n], DType::F32);
                let valid: Vec<i32> = idv.iter().map(|&i| i.clamp(0, e as i32 - 1)).collect();
                c.expert_matmul(&x, w, &Tensor::from_i32(&[m, slots], &valid).unwrap(), &mut want).unwrap();
                let mut want = want.as_f32().unwrap().to_vec();
                for (p, &i) in idv.iter().enumerate() {
                    if i < 0 || i >= e as i32 {
                        want[p * n..(p + 1) * n].fill(0.0);
                    }
                }
                be.set_fused(Site::TcMatmul, false);
                let got = gpu_experts(&be, &gw, &x, &ids, n);
                check(&got, &want, 1e-4, &what);
                let again = gpu_experts(&be, &gw, &x, &ids, n);
                assert!(got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: two runs differ");
                // with the site on, the first row's pairs alone give the same bits
                be.set_fused(Site::TcMatmul, true);
                let first =
                    if shared { x.as_f32().unwrap()[..k].to_vec() } else { x.as_f32().unwrap()[..slots * k].to_vec() };
                let xs1 = if shared { vec![1, k] } else { vec![1, slots, k] };
                let one = gpu_experts(
                    &be,
                    &gw,
                    &Tensor::from_f32(&xs1, &first).unwrap(),
                    &Tensor::from_i32(&[1, slots], &idv[..slots]).unwrap(),
                    n,
                );
                let all = gpu_experts(&be, &gw, &x, &ids, n);
                assert!(
                    one.iter().zip(&all[..slots * n]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: row 0 alone differs from row 0 of {m} rows"
                );
                be.set_fused(Site::TcMatmul, false);
            }
        }
    }
}
