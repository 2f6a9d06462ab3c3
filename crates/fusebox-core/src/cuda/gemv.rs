//! Matmul (decode GEMV and cuBLAS prefill), expert matmul, embedding, and
//! weight upload (kernels: `gemv.cu`).
//!
//! * one input row (decode): `gemv_<fmt>_m1`; see gemv.cu for the design.
//!   `FUSEBOX_GEMV_KSPLIT=1|2|4|8` fixes how many warps split each row's k
//!   range (tuning; normally chosen per shape).
//! * 2 to `ROW_EXACT_MAX` (32) rows (speculative verify, short prompts):
//!   `gemv_<fmt>_mn` launches of up to 8 rows, each reading the weight once,
//!   planned with the one-row launch's k split and x window so that every
//!   row is bitwise the decode step's ([`CudaBackend::plan_gemv_split`]);
//!   4-bit int_dot products of 5 or more rows go to the tensor cores first,
//!   with the same bits (gemv_tc.rs; `FUSEBOX_GEMV_TC=0` keeps them here).
//! * `m > ROW_EXACT_MAX`: cuBLAS. bf16 and affine weights run bf16 x bf16 -> f32 (the
//!   affine weight dequantized to bf16 in scratch, x rounded to bf16); f32 and
//!   f16 weights run f32 SGEMM (f16 widened to f32 in scratch).
//!   `FUSEBOX_PREFILL_F32=1` takes the f32 path for every format.
//! * expert matmuls (MoE): up to `ROW_EXACT_MAX` rows, one GEMV per (row,
//!   slot) pair; past it, 4-bit weights are grouped by expert (qmm.rs:
//!   each expert's weight read once per 32 of its pairs, on the tensor
//!   cores), other formats stay per pair. `FUSEBOX_GROUPED_MOE=0` keeps the
//!   per-pair GEMVs.
//! * GGUF weights are re-laid out at upload as MLX affine weights: Q4_0, Q4_1
//!   and Q8_0 exactly (4/8-bit, group 32, f16 scales and biases, f32 if a
//!   bias would overflow f16); Q4_K and Q5_K exactly as 4/5-bit group 32 with
//!   f32 scales (d * sc) and biases (-dmin * m); Q6_K as 6-bit group 16 with
//!   f32 scales t = d * sc and biases -32 t (the kernels compute t*q - 32t
//!   where ggml computes t*(q - 32): equal up to one rounding). F32/F16/BF16
//!   GGUF tensors become dense weights.

use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::cublas::{result as blas, sys as bsys};
use rayon::prelude::*;

use super::ops::grid_1d;
use super::{dtype_tag, Arg, CudaBackend};
use crate::backend::ROW_EXACT_MAX;
use crate::dtype::{f16_to_f32, DType};
use crate::quant::{ggml, pack, GgmlType, Weight};
use crate::tensor::Tensor;

const FILE: &str = "gemv.cu";
/// The most input rows the GEMV kernels take in one launch.
pub const MAX_GEMV_ROWS: usize = 8;
const THREADS: u32 = 256;
const WARPS: usize = THREADS as usize / 32;

/// Vector GEMV kernels: `[format][one row, up to 2, 4, 8 rows]`
/// ([`template_rows`]). Formats: 0 f32, 1 f16, 2 bf16, then affine 2, 3, 4,
/// 5, 6, 8 bits, then 6-bit with group size 16 (the GGUF Q6_K layout), then
/// 4 and 8 bits through integer dot products ([`CudaBackend::kernel_fmt`]).
const GEMV: [[&str; 4]; 12] = [
    ["gemv_f32_m1", "gemv_f32_m2", "gemv_f32_m4", "gemv_f32_mn"],
    ["gemv_f16_m1", "gemv_f16_m2", "gemv_f16_m4", "gemv_f16_mn"],
    ["gemv_bf16_m1", "gemv_bf16_m2", "gemv_bf16_m4", "gemv_bf16_mn"],
    ["gemv_q2_m1", "gemv_q2_m2", "gemv_q2_m4", "gemv_q2_mn"],
    ["gemv_q3_m1", "gemv_q3_m2", "gemv_q3_m4", "gemv_q3_mn"],
    ["gemv_q4_m1", "gemv_q4_m2", "gemv_q4_m4", "gemv_q4_mn"],
    ["gemv_q5_m1", "gemv_q5_m2", "gemv_q5_m4", "gemv_q5_mn"],
    ["gemv_q6_m1", "gemv_q6_m2", "gemv_q6_m4", "gemv_q6_mn"],
    ["gemv_q8_m1", "gemv_q8_m2", "gemv_q8_m4", "gemv_q8_mn"],
    ["gemv_q6g16_m1", "gemv_q6g16_m2", "gemv_q6g16_m4", "gemv_q6g16_mn"],
    ["gemv_q4i_m1", "gemv_q4i_m2", "gemv_q4i_m4", "gemv_q4i_mn"],
    ["gemv_q8i_m1", "gemv_q8i_m2", "gemv_q8i_m4", "gemv_q8i_mn"],
];
/// The kernel variant (its compile-time row count: 1, 2, 4 or 8) that takes
/// `m` input rows, and its index into [`GEMV`].
fn template_rows(m: usize) -> (usize, usize) {
    match m {
        1 => (1, 0),
        2 => (2, 1),
        3 | 4 => (4, 2),
        _ => (8, 3),
    }
}
/// Dense rows that are not 16-byte aligned: scalar loads.
const GEMV_SCALAR: [&str; 3] = ["gemv_scalar_f32", "gemv_scalar_f16", "gemv_scalar_bf16"];

/// The vector kernels' shape, as `Fmt<FMT>` and `Cfg<FMT, M>` in gemv.cu
/// (a kernel given less shared memory than its ring and x staging need
/// refuses the launch by writing NaN).
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// Values per lane unit.
    lu: usize,
    /// Output rows per warp.
    r: usize,
    /// Shared-memory ring bytes per block.
    ring: usize,
    /// Values per staged x sum (affine).
    sumg: usize,
}

/// `pre_hopper`: compute capability below 9.0 (the kernels take fewer affine
/// rows per warp there, to stay within 128 registers).
/// Mirrors `Cfg` in kernels/gemv.cuh for the kernel of `mt` rows (1, 2, 4 or 8).
fn shape(fmt: usize, mt: usize, pre_hopper: bool) -> Shape {
    let affine = fmt >= 3;
    let g16 = fmt == 9;
    let bits = match fmt {
        0 => 32,
        1 | 2 => 16,
        3 => 2,
        4 => 3,
        5 => 4,
        6 => 5,
        7 | 9 => 6,
        _ => 8,
    };
    let lu = match fmt {
        0 => 4,
        1 | 2 => 8,
        8 => 16,
        _ => 32,
    };
    let words = lu * bits / 32;
    let sbw = if !affine {
        0
    } else if g16 {
        2
    } else {
        1
    };
    let wpl = words + 2 * sbw;
    let r = match (mt, affine) {
        (1, _) if wpl > 6 => 2,
        (1, true) if pre_hopper => 2,
        (1, _) => 4,
        (2 | 4, true) if pre_hopper => 1,
        (2 | 4, _) => 2,
        (_, true) => 1,
        (_, false) => 2,
    };
    const STAGES: usize = 3;
    Shape { lu, r, ring: 4 * WARPS * STAGES * r * 32 * wpl, sumg: if g16 { 16 } else { lu } }
}

fn affine_fmt(bits: u32) -> Option<usize> {
    Some(match bits {
        2 => 3,
        3 => 4,
        4 => 5,
        5 => 6,
        6 => 7,
        8 => 8,
        _ => return None,
    })
}

/// `FUSEBOX_GEMV_KSPLIT` (1, 2, 4 or 8) fixes how many warps share a row's
/// k range (tuning); unset, it follows the grid size.
fn ksplit_override() -> Option<usize> {
    static K: OnceLock<Option<usize>> = OnceLock::new();
    *K.get_or_init(|| {
        std::env::var("FUSEBOX_GEMV_KSPLIT").ok().and_then(|v| v.parse().ok()).filter(|k| matches!(k, 1 | 2 | 4 | 8))
    })
}

/// How one GEMV launch is laid out ([`CudaBackend::plan_gemv`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    pub name: &'static str,
    /// The vector kernels (else the scalar fallback for unaligned dense rows).
    pub vector: bool,
    /// Output rows per warp and row group.
    pub rows_per_warp: usize,
    pub blocks: usize,
    pub gy: usize,
    pub ks: usize,
    pub kw: usize,
    pub gw: usize,
    pub smem: usize,
}

/// A device weight as the kernels see it.
pub(super) struct Dev {
    /// Index into [`GEMV`].
    pub fmt: usize,
    pub w: u64,
    pub sc: u64,
    pub bi: u64,
    pub bits: u32,
    pub gs: usize,
    pub sdt: i32,
    pub experts: usize,
    pub n: usize,
    pub k: usize,
}

impl Dev {
    pub fn of(w: &Weight, op: &str) -> Result<Dev> {
        let (experts, n, k) = w.dims();
        ensure!(experts > 0 && n > 0 && k > 0, "cuda {op}: empty weight {:?}", w.dims());
        ensure!(n < i32::MAX as usize && k < i32::MAX as usize, "cuda {op}: weight {:?} is too large", w.dims());
        match w {
            Weight::Dense(t) => {
                ensure!(
                    t.dtype().is_float(),
                    "cuda {op}: dense weight {:?} must be f32, f16 or bf16, got {}",
                    t.shape(),
                    t.dtype()
                );
                Ok(Dev {
                    fmt: dtype_tag(t.dtype())? as usize,
                    w: CudaBackend::ptr(t, op)?,
                    sc: 0,
                    bi: 0,
                    bits: (t.dtype().size() * 8) as u32,
                    gs: 0,
                    sdt: 0,
                    experts,
                    n,
                    k,
                })
            }
            Weight::Affine { q, scales, biases, bits, group_size, .. } => {
                let fmt = affine_fmt(*bits).ok_or_else(|| {
                    anyhow!("cuda {op}: {bits}-bit affine weights are not supported (2, 3, 4, 5, 6, 8)")
                })?;
                let gs = *group_size;
                ensure!(
                    matches!(gs, 32 | 64 | 128) || (gs == 16 && *bits == 6),
                    "cuda {op}: {bits}-bit affine weights in groups of {gs} (32, 64 or 128; 16 only for 6 bits)"
                );
                let fmt = if gs == 16 { 9 } else { fmt };
                ensure!(k % 32 == 0 && k % gs == 0, "cuda {op}: {k} columns are not whole groups of {gs} (and of 32)");
                ensure!(q.dtype() == DType::U32, "cuda {op}: packed weight must be U32, got {}", q.dtype());
                ensure!(
                    q.numel() * 32 == experts * n * k * *bits as usize,
                    "cuda {op}: packed weight {:?} does not hold {experts}x{n}x{k} {bits}-bit values",
                    q.shape()
                );
                let groups = experts * n * (k / gs);
                ensure!(groups < i32::MAX as usize, "cuda {op}: {groups} scale groups is too many");
                ensure!(
                    scales.numel() == groups && biases.numel() == groups,
                    "cuda {op}: scales {:?} / biases {:?} for {experts}x{n}x{k} in groups of {gs}",
                    scales.shape(),
                    biases.shape()
                );
                ensure!(
                    scales.dtype() == biases.dtype(),
                    "cuda {op}: scales ({}) and biases ({}) must share a dtype",
                    scales.dtype(),
                    biases.dtype()
                );
                Ok(Dev {
                    fmt,
                    w: CudaBackend::ptr(q, op)?,
                    sc: CudaBackend::ptr(scales, op)?,
                    bi: CudaBackend::ptr(biases, op)?,
                    bits: *bits,
                    gs,
                    sdt: dtype_tag(scales.dtype())?,
                    experts,
                    n,
                    k,
                })
            }
            Weight::Gguf { ty, .. } => bail!(
                "cuda {op}: {} GGUF weight is not in a GPU layout; load it through upload_weight, which re-lays it out",
                ty.name()
            ),
        }
    }

    pub fn affine(&self) -> bool {
        self.fmt >= 3
    }

    /// Bytes from one expert to the next.
    pub fn w_estride(&self) -> u64 {
        (self.n * self.k * self.bits as usize / 8) as u64
    }

    /// Scale elements from one expert to the next.
    pub fn sb_estride(&self) -> u64 {
        if self.affine() {
            (self.n * (self.k / self.gs)) as u64
        } else {
            0
        }
    }
}

/// Converted GGUF types already announced on stderr.
static ANNOUNCED: Mutex<Vec<GgmlType>> = Mutex::new(Vec::new());

fn announce(ty: GgmlType, what: &str) {
    let mut seen = ANNOUNCED.lock().unwrap();
    if !seen.contains(&ty) {
        seen.push(ty);
        eprintln!("fusebox: GGUF {} weights re-laid out as {what} for the GPU", ty.name());
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// One ggml block as affine values (`vals`, one per element) and per-group
/// scales and biases (`s`, `b`, one per group of the layout).
fn block_to_affine(ty: GgmlType, blk: &[u8], vals: &mut [u32], s: &mut [f32], b: &mut [f32]) {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let off = if ty == GgmlType::Q4_1 { 4 } else { 2 };
            for j in 0..16 {
                vals[j] = (blk[off + j] & 0xF) as u32;
                vals[j + 16] = (blk[off + j] >> 4) as u32;
            }
            let d = f16_at(blk, 0);
            s[0] = d;
            b[0] = if ty == GgmlType::Q4_1 { f16_at(blk, 2) } else { -8.0 * d };
        }
        GgmlType::Q8_0 => {
            for j in 0..32 {
                vals[j] = (blk[2 + j] ^ 0x80) as u32; // i8 + 128
            }
            let d = f16_at(blk, 0);
            s[0] = d;
            b[0] = -128.0 * d;
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let scales = &blk[4..16];
            let (qh, qs) =
                if ty == GgmlType::Q5_K { (Some(&blk[16..48]), &blk[48..176]) } else { (None, &blk[16..144]) };
            for c in 0..4 {
                for h in 0..2 {
                    let (sc, m) = ggml::scale_min_k4(2 * c + h, scales);
                    s[2 * c + h] = d * sc as f32;
                    b[2 * c + h] = -(dmin * m as f32);
                }
                let q = &qs[32 * c..32 * c + 32];
                for l in 0..32 {
                    let (mut lo, mut hi) = ((q[l] & 0xF) as u32, (q[l] >> 4) as u32);
                    if let Some(qh) = qh {
                        lo += if qh[l] & (1 << (2 * c)) != 0 { 16 } else { 0 };
                        hi += if qh[l] & (2 << (2 * c)) != 0 { 16 } else { 0 };
                    }
                    vals[64 * c + l] = lo;
                    vals[64 * c + 32 + l] = hi;
                }
            }
        }
        GgmlType::Q6_K => {
            let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
            let d = f16_at(blk, 208);
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                let v = &mut vals[128 * n..128 * n + 128];
                for l in 0..32 {
                    v[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as u32;
                    v[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as u32;
                    v[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as u32;
                    v[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as u32;
                }
            }
            for g in 0..16 {
                let t = d * (sc[g] as i8) as f32;
                s[g] = t;
                b[g] = -32.0 * t;
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("dense GGUF types are not re-laid out"),
    }
}

/// f16 bits of every value when all of them are exact in f16.
fn exact_f16(v: &[f32]) -> Option<Vec<u16>> {
    v.iter()
        .map(|&x| {
            let h = half::f16::from_f32(x);
            (h.to_f32() == x).then_some(h.to_bits())
        })
        .collect()
}

/// A GGUF weight (host bytes) in the layout the kernels read, on the host.
fn gguf_to_gpu_layout(data: &[u8], ty: GgmlType, experts: usize, rows: usize, cols: usize) -> Result<Weight> {
    let lead: Vec<usize> = if experts > 1 { vec![experts, rows] } else { vec![rows] };
    let shape = |last: usize| [lead.clone(), vec![last]].concat();
    let dense = |dt: DType| -> Result<Weight> { Ok(Weight::Dense(Tensor::from_bytes(&shape(cols), dt, data)?)) };
    let (bits, gs) = match ty {
        GgmlType::F32 => return dense(DType::F32),
        GgmlType::F16 => return dense(DType::F16),
        GgmlType::BF16 => return dense(DType::BF16),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => (4u32, 32usize),
        GgmlType::Q8_0 => (8, 32),
        GgmlType::Q5_K => (5, 32),
        GgmlType::Q6_K => (6, 16),
    };
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let rb = ty.row_bytes(cols);
    ensure!(
        data.len() == experts * rows * rb,
        "{} data is {} bytes, expected {}",
        ty.name(),
        data.len(),
        experts * rows * rb
    );
    let (wpr, gpr, gpb) = (cols * bits as usize / 32, cols / gs, bs / gs);
    let nrows = experts * rows;
    let mut q = vec![0u32; nrows * wpr];
    let mut s = vec![0f32; nrows * gpr];
    let mut b = vec![0f32; nrows * gpr];
    q.par_chunks_mut(wpr.max(1))
        .zip(s.par_chunks_mut(gpr.max(1)))
        .zip(b.par_chunks_mut(gpr.max(1)))
        .enumerate()
        .for_each(|(i, ((qr, sr), br))| {
            let mut vals = vec![0u32; cols];
            for (bi, blk) in data[i * rb..(i + 1) * rb].chunks_exact(ts).enumerate() {
                let g = bi * gpb..(bi + 1) * gpb;
                block_to_affine(ty, blk, &mut vals[bi * bs..(bi + 1) * bs], &mut sr[g.clone()], &mut br[g]);
            }
            qr.copy_from_slice(&pack(&vals, bits));
        });
    // the legacy types keep f16 scales when every bias is exact in f16
    let small = if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) {
        exact_f16(&s).zip(exact_f16(&b))
    } else {
        None
    };
    let (scales, biases, what) = match small {
        Some((sh, bh)) => (
            Tensor::from_bytes(&shape(gpr), DType::F16, bytemuck::cast_slice(&sh))?,
            Tensor::from_bytes(&shape(gpr), DType::F16, bytemuck::cast_slice(&bh))?,
            "f16",
        ),
        None => (
            Tensor::from_bytes(&shape(gpr), DType::F32, bytemuck::cast_slice(&s))?,
            Tensor::from_bytes(&shape(gpr), DType::F32, bytemuck::cast_slice(&b))?,
            "f32",
        ),
    };
    announce(ty, &format!("{bits}-bit affine (group {gs}, {what} scales)"));
    let q = Tensor::from_bytes(&shape(wpr), DType::U32, bytemuck::cast_slice(&q))?;
    Ok(Weight::Affine { q, scales, biases, bits, group_size: gs, experts, rows, cols })
}

impl CudaBackend {
    /// Upload with 16 spare bytes after the data: the GEMV copies 16-bit
    /// scales as the aligned 32-bit words that hold them, which for the last
    /// element of an odd-length tensor reaches two bytes past its end.
    pub(crate) fn upload_weight_impl(&self, w: Weight) -> Result<Weight> {
        // GGUF blocks are re-laid out as weights the GEMV reads; the rest go up
        // as they are (device allocations are padded, so reading a 16-bit scale
        // as part of a 4-byte word never leaves the buffer)
        match w {
            Weight::Gguf { data, ty, experts, rows, cols } => {
                let host = gguf_to_gpu_layout(data.host_bytes()?, ty, experts, rows, cols)?;
                drop(data);
                crate::backend::upload_weight_tensors(self, host)
            }
            w => crate::backend::upload_weight_tensors(self, w),
        }
    }

    /// How a GEMV of `d` over `m` input rows and `pairs` (expert, row) pairs
    /// is launched: the kernel, the grid, the k split, the row groups per
    /// warp, the x window and the shared memory. The fused kernels (fused.rs)
    /// use the same plan, so their products equal the stand-alone ones.
    /// The kernel format of `d`: its weight format, or for 4- and 8-bit
    /// affine weights with the `int_dot` site on, 10 and 11: the same
    /// weights through integer dot products (x quantized to int16 per unit of
    /// the lane's values; `IntDot` in gemv.cuh). Every GEMV-core kernel
    /// (plain, fused QKV, fused MoE) takes the same choice, so the rows of a
    /// product agree whichever kernel computes them.
    pub(super) fn kernel_fmt(&self, d: &Dev) -> usize {
        match d.fmt {
            5 | 8 if crate::backend::Backend::fused(self, crate::fusion::Site::IntDot) => 10 + (d.fmt == 8) as usize,
            f => f,
        }
    }

    pub(super) fn plan_gemv(&self, d: &Dev, x: u64, m: usize, pairs: usize) -> Result<Plan> {
        self.plan_gemv_split(d, x, m, pairs, pairs)
    }

    /// [`CudaBackend::plan_gemv`], with the k split and the x window planned
    /// as for a one-row launch over `split_pairs` pairs, whatever `m` and
    /// `pairs` are. Those two decide which lane sums which k-steps and in
    /// which order (within a lane, across the warps of a split, and the
    /// warp's butterfly, whose tree does not depend on how many values it
    /// reduces at once); the rows per warp and row groups per warp only
    /// decide which warp does it. So every output of an `m`-row `mn` launch,
    /// or of a launch over more pairs, is bitwise what the one-row launch
    /// (`split_pairs` pairs, the decode step) computes for that row.
    fn plan_gemv_split(&self, d: &Dev, x: u64, m: usize, pairs: usize, split_pairs: usize) -> Result<Plan> {
        ensure!((1..=MAX_GEMV_ROWS).contains(&m), "cuda gemv: {m} input rows (1 to {MAX_GEMV_ROWS})");
        ensure!(pairs < i32::MAX as usize, "cuda expert_matmul: {pairs} (row, slot) pairs");
        ensure!(m == 1 || pairs == 1, "cuda gemv: {m} input rows over {pairs} pairs");
        let (n, k) = (d.n, d.k);
        let (mt, variant) = template_rows(m);
        let pre_hopper = self.info.compute_capability.0 < 9;
        let sh = shape(d.fmt, mt, pre_hopper);
        // the one-row shape, which the k split is planned for
        let sh1 = shape(d.fmt, 1, pre_hopper);
        // rows of k dense values start 16-byte aligned only when k fills whole vectors
        let vector = (d.affine() || (k % sh.lu == 0 && d.w.is_multiple_of(16))) && x.is_multiple_of(16);
        let gy = pairs.min(65535);
        if !vector {
            // a warp per output row, every input row alike: exact for any m
            ensure!(!d.affine(), "cuda matmul: input rows at {x:#x} are not 16-byte aligned");
            let name = GEMV_SCALAR[d.fmt];
            return Ok(Plan {
                name,
                vector: false,
                rows_per_warp: sh.r,
                blocks: n.div_ceil(WARPS),
                gy,
                ks: 1,
                kw: 0,
                gw: 1,
                smem: 0,
            });
        }
        let groups = n.div_ceil(sh.r);
        let steps = (k / sh.lu).div_ceil(32);
        // affine kernels stage kw values of each x row (and their sums) in
        // shared memory next to the ring: as much of k as fits one row's
        // budget (the one-row value for every m, so the windows match)
        let (kw, smem) = if d.affine() {
            let per_kilo = 1024 * 9 / 2 + 4 * 1024 / sh.sumg;
            let kw = k.next_multiple_of(1024).min(((112usize << 10).saturating_sub(sh1.ring)) / per_kilo * 1024);
            ensure!(kw >= 1024, "cuda gemv: no room for x in shared memory");
            (kw, sh.ring + m * (kw + kw / 8 + kw / sh.sumg) * 4)
        } else {
            (k, sh.ring)
        };
        // Split k over up to 8 warps when there are few row groups: about 12
        // an SM for dense rows and for one affine product (measured on an
        // H100, 4-bit g64: 4096 rows of 4096 or 12288 go from 39 and 42% of
        // the copy bandwidth to 42 and 58% with two warps on a group, and
        // Qwen3-8B 4-bit decode from 267 to 274 tok/s; 12288 rows lose with a
        // split), about 4 for affine expert products over several pairs (12
        // took Qwen3-30B-A3B 4-bit decode from 275 to 266 tok/s). With many
        // row groups each warp takes several, so the grid is one wave: 8 warps
        // a block, 2 blocks an SM (1 for more than 4 rows). Decided on the one-row launch
        // over split_pairs pairs.
        let sms = self.sm_count as usize;
        let split_below = sms * if d.affine() && split_pairs > 1 { 4 } else { 12 };
        let wave = sms * WARPS * if mt <= 4 { 2 } else { 1 };
        let work1 = n.div_ceil(sh1.r) * split_pairs.min(65535);
        let (ks, gw) = if let Some(ks) = ksplit_override() {
            (ks, 1)
        } else if work1 < split_below || kw < k {
            let mut ks = 1;
            while ks < WARPS && work1 * ks < split_below && ks * 2 <= steps {
                ks *= 2;
            }
            (ks, 1)
        } else {
            (1, (groups * gy).div_ceil(wave))
        };
        let name = GEMV[self.kernel_fmt(d)][variant];
        Ok(Plan { name, vector, rows_per_warp: sh.r, blocks: groups.div_ceil(WARPS / ks * gw), gy, ks, kw, gw, smem })
    }

    /// Input rows one `mn` launch of `d` takes within the device's shared
    /// memory, with the one-row x window ([`CudaBackend::plan_gemv_split`]):
    /// 8, fewer for affine weights with a long window, 1 (the one-row kernel
    /// for each row) if not even two rows fit.
    fn gemv_rows_per_launch(&self, d: &Dev, x: u64) -> Result<usize> {
        // static shared memory of the kernels (the split sums) stays below 1 KB
        let room = self.smem_optin.saturating_sub(1 << 10);
        for m in (2..=MAX_GEMV_ROWS).rev() {
            if self.plan_gemv(d, x, m, 1)?.smem <= room {
                return Ok(m);
            }
        }
        Ok(1)
    }

    /// `out[p + r] = w[ids[p]] @ x[p / x_div + r]` for pairs `p < pairs` and
    /// rows `r < m` (m > 1 only with one pair); `ids == 0` means expert 0.
    /// The k split is planned for `split_pairs` pairs ([`CudaBackend::plan_gemv_split`]).
    #[allow(clippy::too_many_arguments)]
    fn launch_gemv(
        &self,
        d: &Dev,
        x: u64,
        out: u64,
        m: usize,
        ids: u64,
        pairs: usize,
        x_div: usize,
        split_pairs: usize,
    ) -> Result<()> {
        let Plan { name, blocks, gy, ks, kw, gw, smem, .. } = self.plan_gemv_split(d, x, m, pairs, split_pairs)?;
        let n = d.n;
        let k = d.k;
        let dims = ((blocks.min(1 << 30) as u32, gy as u32, 1), (THREADS, 1, 1), smem as u32);
        self.launch(
            FILE,
            name,
            dims,
            &[
                Arg::P(d.w),
                Arg::P(d.sc),
                Arg::P(d.bi),
                Arg::P(x),
                Arg::P(out),
                Arg::P(ids),
                Arg::I(n as i32),
                Arg::I(k as i32),
                Arg::I(m as i32),
                Arg::I(d.gs.max(1) as i32),
                Arg::I(d.sdt),
                Arg::I(ks as i32),
                Arg::I(x_div as i32),
                Arg::I(pairs as i32),
                Arg::I(d.experts as i32),
                Arg::L(d.w_estride()),
                Arg::L(d.sb_estride()),
                Arg::I(kw as i32),
                Arg::I(gw as i32),
                Arg::I(smem as i32),
            ],
        )
    }

    /// `m <= ROW_EXACT_MAX` rows, each bitwise as the one-row (decode) GEMV
    /// computes it: `mn` launches of up to 8 rows (balanced chunks, each
    /// reading the weight once) with the one-row plan's k split and window.
    fn gemv_rows(&self, d: &Dev, x: u64, out: u64, m: usize) -> Result<()> {
        // 4-bit int_dot rows on the tensor cores first (gemv_tc.rs), the rest here
        let done = if self.gemv_tc_serves(d, x, m) { self.gemv_tc_rows(d, x, out, m)? } else { 0 };
        let (x, out, m) = (x + (done * d.k * 4) as u64, out + (done * d.n * 4) as u64, m - done);
        if m <= 1 {
            return if m == 1 { self.launch_gemv(d, x, out, 1, 0, 1, 1, 1) } else { Ok(()) };
        }
        let per = self.gemv_rows_per_launch(d, x)?;
        let launches = m.div_ceil(per);
        let chunk = m.div_ceil(launches);
        let mut r = 0;
        while r < m {
            let rows = chunk.min(m - r);
            let (xr, or) = (x + (r * d.k * 4) as u64, out + (r * d.n * 4) as u64);
            self.launch_gemv(d, xr, or, rows, 0, 1, 1, 1)?;
            r += rows;
        }
        Ok(())
    }

    /// Rows (`ids[r]`, or `r` without ids) of expert 0 of a weight,
    /// dequantized into `out` (`nrows * k` values, f32 or bf16).
    fn launch_dequant(&self, d: &Dev, ids: u64, nrows: usize, out: u64, bf16: bool) -> Result<()> {
        ensure!(out.is_multiple_of(16), "cuda dequantize: output at {out:#x} is not 16-byte aligned");
        let per = if d.k.is_multiple_of(8) { 8 } else { 1 };
        let dt = if d.affine() { -1 } else { d.fmt as i32 };
        // 4- and 8-bit affine rows: the kernel that reads 8 values at once
        let fast = d.affine()
            && d.bits.is_multiple_of(4)
            && per == 8
            && d.w.is_multiple_of(8)
            && ((nrows * d.k / 8) as u64) < (1 << 32);
        let name = match (fast, d.bits) {
            (true, 4) => "dequant_rows_q4",
            (true, 8) => "dequant_rows_q8",
            _ => "dequant_rows",
        };
        self.launch(
            FILE,
            name,
            grid_1d(nrows * d.k / per, self.sm_count),
            &[
                Arg::P(d.w),
                Arg::P(d.sc),
                Arg::P(d.bi),
                Arg::I(dt),
                Arg::I(d.bits as i32),
                Arg::I(d.gs.max(1) as i32),
                Arg::I(d.sdt),
                Arg::P(ids),
                Arg::I(nrows as i32),
                Arg::I(d.k as i32),
                Arg::I(d.n as i32),
                Arg::P(out),
                Arg::I(bf16 as i32),
            ],
        )
    }

    /// Row-major `out[m, n] = x[m, k] @ w[n, k]^T` through cuBLAS
    /// (column-major `out^T = w^T^T x^T`), f32 accumulation and output.
    #[allow(clippy::too_many_arguments)]
    fn gemm_ex(
        &self,
        w: u64,
        wt: bsys::cudaDataType,
        x: u64,
        xt: bsys::cudaDataType,
        out: u64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        ensure!(m < i32::MAX as usize, "cuda matmul: {m} input rows");
        let h = *self.blas()?.handle();
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: w holds n*k, x m*k and out m*n elements of the given types
        // on the device; the handle is bound to the backend's stream.
        unsafe {
            blas::gemm_ex(
                h,
                bsys::cublasOperation_t::CUBLAS_OP_T,
                bsys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const c_void,
                w as *const c_void,
                wt,
                k as i32,
                x as *const c_void,
                xt,
                k as i32,
                (&beta) as *const f32 as *const c_void,
                out as *mut c_void,
                bsys::cudaDataType::CUDA_R_32F,
                n as i32,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow!("cuda matmul: cuBLAS GemmEx [{m}, {k}] x [{n}, {k}]^T: {e:?}"))
    }

    /// The prefill product (m > ROW_EXACT_MAX rows) through cuBLAS.
    fn gemm(&self, d: &Dev, x: u64, out: u64, m: usize) -> Result<()> {
        let (n, k) = (d.n, d.k);
        let f32t = bsys::cudaDataType::CUDA_R_32F;
        let bf16t = bsys::cudaDataType::CUDA_R_16BF;
        if self.prefill_f32 || d.fmt <= 1 {
            let w = if d.fmt == 0 {
                d.w
            } else {
                let s = self.scratch(1, n * k * 4)?;
                self.launch_dequant(d, 0, n, s, false)?;
                s
            };
            return self.gemm_ex(w, f32t, x, f32t, out, m, n, k);
        }
        let w = if d.fmt == 2 {
            d.w
        } else {
            let s = self.scratch(1, n * k * 2)?;
            self.launch_dequant(d, 0, n, s, true)?;
            s
        };
        let xb = self.scratch(0, m * k * 2)?;
        self.to_bf16(x, m * k, xb)?;
        self.gemm_ex(w, bf16t, xb, bf16t, out, m, n, k)
    }

    pub(crate) fn matmul_impl(&self, x: &Tensor, w: &Weight, out: &mut Tensor) -> Result<()> {
        let (experts, n, k) = w.dims();
        ensure!(experts == 1 && n > 0, "cuda matmul: weight must be 2-D, got {:?}", w.dims());
        ensure!(
            k > 0 && x.numel().is_multiple_of(k),
            "cuda matmul: input {:?} does not match weight {:?}",
            x.shape(),
            w.dims()
        );
        let m = x.numel() / k;
        ensure!(out.numel() == m * n, "cuda matmul: output {:?} for a [{m}, {n}] product", out.shape());
        ensure!(x.dtype() == DType::F32, "cuda matmul: input must be f32, got {} {:?}", x.dtype(), x.shape());
        ensure!(out.dtype() == DType::F32, "cuda matmul: output must be f32, got {} {:?}", out.dtype(), out.shape());
        let (px, po) = (Self::ptr(x, "matmul")?, Self::ptr(out, "matmul")?);
        let d = Dev::of(w, "matmul")?;
        if m == 0 {
            return Ok(());
        }
        if m <= super::qmm::QMM_MAX_ROWS && self.qmm_serves(&d) {
            self.qmm(&d, px, po, m)
        } else if m <= ROW_EXACT_MAX {
            self.gemv_rows(&d, px, po, m)
        } else {
            self.gemm(&d, px, po, m)
        }
    }

    pub(crate) fn expert_matmul_impl(&self, x: &Tensor, w: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()> {
        let (_, n, k) = w.dims();
        ensure!(
            ids.shape().len() == 2 && ids.dtype() == DType::I32,
            "cuda expert_matmul: ids must be I32 [rows, slots], got {} {:?}",
            ids.dtype(),
            ids.shape()
        );
        let (m, slots) = (ids.shape()[0], ids.shape()[1]);
        let shared = x.numel() == m * k;
        ensure!(
            shared || x.numel() == m * slots * k,
            "cuda expert_matmul: input {:?} is neither [{m}, {k}] nor [{m}, {slots}, {k}]",
            x.shape()
        );
        ensure!(out.numel() == m * slots * n, "cuda expert_matmul: output {:?} for [{m}, {slots}, {n}]", out.shape());
        ensure!(
            x.dtype() == DType::F32 && out.dtype() == DType::F32,
            "cuda expert_matmul: input and output must be f32"
        );
        let (px, po, pi) =
            (Self::ptr(x, "expert_matmul")?, Self::ptr(out, "expert_matmul")?, Self::ptr(ids, "expert_matmul")?);
        let d = Dev::of(w, "expert_matmul")?;
        if m * slots == 0 {
            return Ok(());
        }
        if self.qmm_serves_experts(&d, m) {
            return self.qmm_experts(&d, px, po, pi, m * slots, if shared { slots } else { 1 });
        }
        // up to ROW_EXACT_MAX rows: the k split of one row's slots, so each
        // row's products are bitwise the decode step's
        let split_pairs = if m <= ROW_EXACT_MAX { slots } else { m * slots };
        self.launch_gemv(&d, px, po, 1, pi, m * slots, if shared { slots.max(1) } else { 1 }, split_pairs)
    }

    pub(crate) fn embedding_impl(&self, table: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()> {
        let (experts, vocab, dim) = table.dims();
        ensure!(experts == 1 && vocab > 0, "cuda embedding: table must be 2-D, got {:?}", table.dims());
        ensure!(ids.dtype() == DType::I32, "cuda embedding: ids must be I32, got {}", ids.dtype());
        let count = ids.numel();
        ensure!(
            out.numel() == count * dim && out.dtype() == DType::F32,
            "cuda embedding: output {} {:?} for {count} ids of width {dim} (f32)",
            out.dtype(),
            out.shape()
        );
        let (pi, po) = (Self::ptr(ids, "embedding")?, Self::ptr(out, "embedding")?);
        let d = Dev::of(table, "embedding")?;
        if count == 0 {
            return Ok(());
        }
        self.launch_dequant(&d, pi, count, po, false)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The re-laid-out GGUF weight dequantizes (reference path) to the
    /// original values: exactly for the affine-exact types, to one rounding
    /// for the rest.
    #[test]
    fn gguf_relayout_matches_reference_dequant() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let (experts, rows, cols) = (2, 3, 512);
            let mut bytes = vec![0u8; experts * rows * ty.row_bytes(cols)];
            r.fill(&mut bytes[..]);
            let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
            for blk in bytes.chunks_exact_mut(ty.type_size()) {
                let d = f16(0.01 + r.random::<f32>() * 0.05);
                match ty {
                    GgmlType::Q6_K => blk[208..210].copy_from_slice(&d),
                    _ => blk[0..2].copy_from_slice(&d),
                }
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K) {
                    blk[2..4].copy_from_slice(&f16(r.random::<f32>() * 0.05 - 0.02));
                }
            }
            let data = Tensor::from_bytes(&[bytes.len()], DType::U8, &bytes).unwrap();
            let w = Weight::gguf(data.clone(), ty, experts, rows, cols).unwrap();
            let a = gguf_to_gpu_layout(&bytes, ty, experts, rows, cols).unwrap();
            assert_eq!(a.dims(), w.dims());
            let (mut x, mut y) = (vec![0f32; cols], vec![0f32; cols]);
            for e in 0..experts {
                for j in 0..rows {
                    w.dequant_row(e, j, &mut x).unwrap();
                    a.dequant_row(e, j, &mut y).unwrap();
                    for i in 0..cols {
                        let tol = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K) {
                            0.0
                        } else {
                            1e-6 * x[i].abs().max(0.5)
                        };
                        assert!((x[i] - y[i]).abs() <= tol, "{} ({e}, {j}, {i}): {} vs {}", ty.name(), x[i], y[i]);
                    }
                }
            }
        }
    }
}
