//! The CUDA backend's basic ops against the CPU backend (fresh random inputs,
//! odd sizes, outputs poisoned with NaN first), random fill (the same values
//! on both backends), the copy-bandwidth probe, and CUDA graph capture and
//! replay. Skips without a GPU; fails when FUSEBOX_REQUIRE_CUDA=1.

use fusebox_core::cpu::CpuBackend;
use fusebox_core::cuda::{backend_for_tests, backend_for_tests_with_graphs, CudaBackend};
use fusebox_core::rope::{inv_freq, RopeScaling, RopeStyle};
use fusebox_core::{Backend, DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn uniform(r: &mut ChaCha8Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-s..s)).collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().max(1e-30);
    (num / den).sqrt()
}

/// A GPU f32 tensor from host values.
fn up(g: &CudaBackend, shape: &[usize], v: &[f32]) -> Tensor {
    g.upload(Tensor::from_f32(shape, v).unwrap()).unwrap()
}

/// A GPU f32 tensor filled with NaN (poisoned output).
fn poisoned(g: &CudaBackend, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    up(g, shape, &vec![f32::NAN; n])
}

fn read(g: &dyn Backend, t: &Tensor) -> Vec<f32> {
    let mut v = vec![];
    g.read_f32(t, &mut v).unwrap();
    v
}

const ROWS_N: [[usize; 2]; 8] = [[1, 1], [1, 17], [2, 33], [3, 129], [1, 1000], [3, 1031], [40, 4096], [7, 257]];

#[test]
fn elementwise_norm_and_rope_match_the_cpu() {
    let Some(g) = backend_for_tests() else { return };
    let c = CpuBackend::new(0).unwrap();
    let s = seed();
    eprintln!("seed {s}");
    let mut r = ChaCha8Rng::seed_from_u64(s);
    for [rows, n] in ROWS_N {
        let (x, y) = (uniform(&mut r, rows * n, 3.0), uniform(&mut r, rows * n, 3.0));
        let shape = [rows, n];
        // add_assign
        let (mut xc, yc) = (Tensor::from_f32(&shape, &x).unwrap(), Tensor::from_f32(&shape, &y).unwrap());
        let (mut xg, yg) = (up(&g, &shape, &x), up(&g, &shape, &y));
        c.add_assign(&mut xc, &yc).unwrap();
        g.add_assign(&mut xg, &yg).unwrap();
        let e = rel(&read(&g, &xg), xc.as_f32().unwrap());
        assert!(e < 1e-6, "add_assign {shape:?}: {e:e}");
        // silu_mul
        let mut oc = Tensor::zeros(&shape, DType::F32);
        let mut og = poisoned(&g, &shape);
        c.silu_mul(&xc, &yc, &mut oc).unwrap();
        g.silu_mul(&xg, &yg, &mut og).unwrap();
        let e = rel(&read(&g, &og), oc.as_f32().unwrap());
        assert!(e < 1e-5, "silu_mul {shape:?}: {e:e}");
        // rms_norm, whole rows and as a per-head norm
        let w = uniform(&mut r, n, 1.5);
        let (wc, wg) = (Tensor::from_f32(&[n], &w).unwrap(), up(&g, &[n], &w));
        let mut og = poisoned(&g, &shape);
        c.rms_norm(&xc, &wc, 1e-6, &mut oc).unwrap();
        g.rms_norm(&xg, &wg, 1e-6, &mut og).unwrap();
        let e = rel(&read(&g, &og), oc.as_f32().unwrap());
        assert!(e < 1e-5, "rms_norm {shape:?}: {e:e}");
        // the fused residual add + RMSNorm against the CPU's graph path
        let (mut xc2, mut xg2) = (Tensor::from_f32(&shape, &x).unwrap(), up(&g, &shape, &x));
        let mut og2 = poisoned(&g, &shape);
        c.add_assign(&mut xc2, &yc).unwrap();
        c.rms_norm(&xc2, &wc, 1e-6, &mut oc).unwrap();
        g.add_rms_norm(&mut xg2, &yg, &wg, 1e-6, &mut og2).unwrap();
        assert!(rel(&read(&g, &xg2), xc2.as_f32().unwrap()) < 1e-6, "add_rms_norm x {shape:?}");
        let e = rel(&read(&g, &og2), oc.as_f32().unwrap());
        assert!(e < 1e-5, "add_rms_norm {shape:?}: {e:e}");
        // copy_rows
        if rows > 1 {
            let mut dc = Tensor::zeros(&[1, n], DType::F32);
            let mut dg = poisoned(&g, &[1, n]);
            c.copy_rows(&xc, rows - 1, &mut dc, 0, 1).unwrap();
            g.copy_rows(&xg, rows - 1, &mut dg, 0, 1).unwrap();
            assert_eq!(read(&g, &dg), dc.as_f32().unwrap(), "copy_rows {shape:?}");
        }
        // copy_cols: the rows into the second slot of a three-slot concat
        let m = shape[0];
        let (mut dc, mut dg) = (Tensor::zeros(&[m, 3 * n], DType::F32), poisoned(&g, &[m, 3 * n]));
        let (xc2d, xg2d) = (Tensor::from_f32(&[m, n], &x).unwrap(), up(&g, &[m, n], &x));
        c.copy_cols(&xc2d, &mut dc, n).unwrap();
        g.copy_cols(&xg2d, &mut dg, n).unwrap();
        let got = read(&g, &dg);
        for row in 0..m {
            let s = row * 3 * n + n;
            assert_eq!(got[s..s + n], dc.as_f32().unwrap()[s..s + n], "copy_cols {shape:?} row {row}");
        }
    }
    for (m, heads, d, style) in [
        (1, 4, 8, RopeStyle::Half),
        (3, 2, 64, RopeStyle::Interleaved),
        (5, 16, 128, RopeStyle::Half),
        (2, 3, 16, RopeStyle::Interleaved),
    ] {
        let x = uniform(&mut r, m * heads * d, 2.0);
        let inv = inv_freq(d, 1e6, RopeScaling::None);
        let pos: Vec<i32> = (0..m).map(|i| r.random_range(0..40000) + i as i32).collect();
        let mut xc = Tensor::from_f32(&[m, heads, d], &x).unwrap();
        let mut xg = up(&g, &[m, heads, d], &x);
        let (ic, ig) = (Tensor::from_f32(&[d / 2], &inv).unwrap(), up(&g, &[d / 2], &inv));
        let pc = Tensor::from_i32(&[m], &pos).unwrap();
        let pg = g.upload(pc.clone()).unwrap();
        c.rope(&mut xc, &pc, &ic, style).unwrap();
        g.rope(&mut xg, &pg, &ig, style).unwrap();
        let e = rel(&read(&g, &xg), xc.as_f32().unwrap());
        assert!(e < 1e-5, "rope {m}x{heads}x{d} {style:?}: {e:e}");
    }
}

#[test]
fn random_fill_is_the_same_on_cpu_and_gpu() {
    let Some(g) = backend_for_tests() else { return };
    let c = CpuBackend::new(0).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::I32] {
        let shape = [37, 129];
        let mut tc = Tensor::zeros(&shape, dtype);
        let mut tg = g.zeros(&shape, dtype).unwrap();
        c.fill_random(&mut tc, 42, -0.5, 0.25).unwrap();
        g.fill_random(&mut tg, 42, -0.5, 0.25).unwrap();
        if dtype == DType::I32 {
            let (mut a, mut b) = (vec![], vec![]);
            g.read_i32(&tg, &mut a).unwrap();
            c.read_i32(&tc, &mut b).unwrap();
            assert_eq!(a, b, "fill_random of packed words");
            continue;
        }
        let (a, b) = (read(&g, &tg), read(&c, &tc));
        assert_eq!(a, b, "fill_random {dtype}");
        // rounding to 16 bits may reach the upper bound itself
        assert!(b.iter().all(|v| (-0.5..=0.25).contains(v)), "{dtype} out of range");
    }
}

#[test]
fn copy_bandwidth_is_plausible() {
    let Some(g) = backend_for_tests() else { return };
    let bw = g.copy_bandwidth().unwrap();
    eprintln!("{}: device-to-device copy {bw:.0} GB/s (read + write)", g.name());
    assert!(bw > 100.0 && bw < 20000.0, "{bw} GB/s");
}

/// A captured graph replays the same ops on new input values: the
/// position (a device value written before each replay) moves RoPE.
#[test]
fn graph_replay_reads_new_values_from_device_buffers() {
    let Some(g) = backend_for_tests_with_graphs(true) else { return };
    let c = CpuBackend::new(0).unwrap();
    let (heads, d) = (4, 32);
    let x0: Vec<f32> = (0..heads * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let w: Vec<f32> = (0..d).map(|i| 1.0 + (i as f32 * 0.11).cos() * 0.1).collect();
    let inv = inv_freq(d, 1e4, RopeScaling::None);
    let (ig, wg) = (up(&g, &[d / 2], &inv), up(&g, &[d], &w));
    let xin = up(&g, &[1, heads, d], &x0);
    let mut h = g.zeros(&[1, heads, d], DType::F32).unwrap();
    let mut pos = g.zeros(&[1], DType::I32).unwrap();
    for step in 0..6 {
        g.write_i32(&mut pos, &[step * 3]).unwrap();
        let (xin, wg, ig) = (&xin, &wg, &ig);
        let (hp, pp) = (&mut h, &pos);
        g.run_graph(77, &mut || {
            g.rms_norm(xin, wg, 1e-6, hp)?;
            g.rope(hp, pp, ig, RopeStyle::Half)
        })
        .unwrap();
        // CPU reference for this step
        let mut hc = Tensor::zeros(&[1, heads, d], DType::F32);
        let xc = Tensor::from_f32(&[1, heads, d], &x0).unwrap();
        c.rms_norm(&xc, &Tensor::from_f32(&[d], &w).unwrap(), 1e-6, &mut hc).unwrap();
        c.rope(
            &mut hc,
            &Tensor::from_i32(&[1], &[step * 3]).unwrap(),
            &Tensor::from_f32(&[d / 2], &inv).unwrap(),
            RopeStyle::Half,
        )
        .unwrap();
        let e = rel(&read(&g, &h), hc.as_f32().unwrap());
        assert!(e < 1e-5, "step {step} (graph {}): {e:e}", if step >= 2 { "replayed" } else { "eager/captured" });
    }
}
