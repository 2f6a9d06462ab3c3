//! Helpers shared by the CUDA op tests: random weights of every format,
//! relative errors, device buffers.
#![allow(dead_code)]

use fusebox_core::cpu::CpuBackend;
use fusebox_core::cuda::CudaBackend;
use fusebox_core::quant::pack;
use fusebox_core::{Backend, DType, GgmlType, Tensor, Weight};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub fn cpu() -> CpuBackend {
    CpuBackend::new(0).unwrap()
}

pub fn randv(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect()
}

/// Float values as a host tensor of `dtype`.
pub fn host_tensor(shape: &[usize], dtype: DType, v: &[f32]) -> Tensor {
    match dtype {
        DType::F32 => Tensor::from_f32(shape, v).unwrap(),
        DType::F16 => {
            let h: Vec<u16> = v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
            Tensor::from_bytes(shape, dtype, bytemuck::cast_slice(&h)).unwrap()
        }
        DType::BF16 => {
            let h: Vec<u16> = v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            Tensor::from_bytes(shape, dtype, bytemuck::cast_slice(&h)).unwrap()
        }
        d => panic!("not a float dtype: {d}"),
    }
}

pub fn lead(experts: usize, rows: usize) -> Vec<usize> {
    if experts > 1 {
        vec![experts, rows]
    } else {
        vec![rows]
    }
}

pub fn dense(r: &mut ChaCha8Rng, dtype: DType, experts: usize, rows: usize, cols: usize) -> Weight {
    let shape = [lead(experts, rows), vec![cols]].concat();
    Weight::dense(host_tensor(&shape, dtype, &randv(r, experts * rows * cols))).unwrap()
}

/// A random MLX affine weight `[experts, rows, cols]` with scales/biases of `sdt`.
pub fn affine(
    r: &mut ChaCha8Rng,
    experts: usize,
    rows: usize,
    cols: usize,
    bits: u32,
    group: usize,
    sdt: DType,
) -> Weight {
    let n = experts * rows;
    let vals: Vec<u32> = (0..n * cols).map(|_| r.random_range(0..1u32 << bits)).collect();
    let words: Vec<u32> = vals.chunks(cols).flat_map(|row| pack(row, bits)).collect();
    let (wpr, ng) = (cols * bits as usize / 32, cols / group);
    let shape = |last: usize| [lead(experts, rows), vec![last]].concat();
    let q = Tensor::from_bytes(&shape(wpr), DType::U32, bytemuck::cast_slice(&words)).unwrap();
    let sv: Vec<f32> = (0..n * ng).map(|_| r.random::<f32>() * 0.1).collect();
    let bv: Vec<f32> = (0..n * ng).map(|_| r.random::<f32>() - 0.5).collect();
    let (s, b) = (host_tensor(&shape(ng), sdt, &sv), host_tensor(&shape(ng), sdt, &bv));
    Weight::affine(q, s, b, bits, group).unwrap()
}

/// A random ggml weight with sane f16 scale fields.
pub fn ggml(r: &mut ChaCha8Rng, ty: GgmlType, experts: usize, rows: usize, cols: usize) -> Weight {
    let nb = experts * rows * cols / ty.block_size();
    let mut bytes = vec![0u8; nb * ty.type_size()];
    r.fill(&mut bytes[..]);
    let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
    for blk in bytes.chunks_exact_mut(ty.type_size()) {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 => blk[0..2].copy_from_slice(&f16(0.01 + r.random::<f32>() * 0.05)),
            GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
                blk[0..2].copy_from_slice(&f16(0.01 + r.random::<f32>() * 0.05));
                blk[2..4].copy_from_slice(&f16(r.random::<f32>() * 0.05));
            }
            GgmlType::Q6_K => blk[208..210].copy_from_slice(&f16(0.001 + r.random::<f32>() * 0.01)),
            _ => unreachable!(),
        }
    }
    let data = Tensor::from_bytes(&[bytes.len()], DType::U8, &bytes).unwrap();
    Weight::gguf(data, ty, experts, rows, cols).unwrap()
}

pub const GGUF_TYPES: [GgmlType; 6] =
    [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

/// ||got - want|| / ||want||; NaN anywhere (an unwritten output) fails.
pub fn rel_err(got: &[f32], want: &[f32], what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: non-finite output {} at {i} (want {})", got[i], want[i]);
    }
    let num: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub fn check(got: &[f32], want: &[f32], tol: f64, what: &str) -> f64 {
    let e = rel_err(got, want, what);
    assert!(e < tol, "{what}: relative error {e:e} (tolerance {tol:e})");
    e
}

/// A device f32 tensor filled with NaN (so unwritten elements show).
pub fn poisoned(be: &CudaBackend, shape: &[usize]) -> Tensor {
    let mut t = be.zeros(shape, DType::F32).unwrap();
    let n = t.numel();
    be.write_f32(&mut t, &vec![f32::NAN; n]).unwrap();
    t
}

pub fn read(be: &CudaBackend, t: &Tensor) -> Vec<f32> {
    let mut v = vec![];
    be.read_f32(t, &mut v).unwrap();
    v
}
