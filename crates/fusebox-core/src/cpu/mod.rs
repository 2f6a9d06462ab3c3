//! The CPU backend: f32 compute on all cores.
//!
//! Weights may be f32, f16 or bf16 (converted on the fly inside the dot
//! products, never copied); activations, the KV cache and all reductions are
//! f32. Work is spread over a rayon pool owned by the backend.

mod attention;
mod attn;
mod attn_block;
mod attn_group;
mod avx2;
mod gemm;
mod gemm_i16;
mod int_weights;
mod intdot;
mod intdot_rows8;
mod kernels;
mod quant;

use std::cell::RefCell;

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use intdot::IntRow;
pub use kernels::{axpy, dot_bf16, dot_f16, dot_f32};

use crate::backend::{copy_cols_dims, Backend};
use crate::dtype::{bf16_to_f32, f16_to_f32, DType};
use crate::fusion::{BackendKind, FusionPolicy, Site};
use crate::kv::{LayerKv, Pages};
use crate::quant::Weight;
use crate::rope::RopeStyle;
use crate::tensor::Tensor;

/// Work smaller than this many elements runs on the calling thread.
const PAR_MIN: usize = 1 << 15;
/// The widest head the rotary op and the f16-cache attention support (rows on the stack).
const MAX_HEAD_DIM: usize = 1024;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    policy: FusionPolicy,
    /// The KV cache in f16 (`FUSEBOX_KV_DTYPE=f16`) instead of f32.
    kv_f16: bool,
}

impl CpuBackend {
    /// A backend using `threads` worker threads (0 = one per core).
    pub fn new(threads: usize) -> Result<Self> {
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("fusebox-cpu-{i}")).build()?;
        let kv_f16 = match std::env::var("FUSEBOX_KV_DTYPE").as_deref() {
            Err(_) | Ok("f32") | Ok("bf16") => false,
            Ok("f16") => true,
            Ok(other) => bail!("FUSEBOX_KV_DTYPE={other}: expected f32 or f16 on the CPU (bf16 or f32 on CUDA)"),
        };
        Ok(CpuBackend { pool, policy: FusionPolicy::resolve(BackendKind::Cpu, "cpu")?, kv_f16 })
    }

    /// This backend's fusion decisions (defaults, tuned file, environment).
    pub fn policy(&self) -> &FusionPolicy {
        &self.policy
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The `rows`-long inputs of `xs` quantized to int16 when the `int_dot`
    /// site is on and takes this weight; `None` for the f32 path.
    fn int_inputs(&self, w: &Rows, xs: &[f32], k: usize) -> Option<Vec<IntRow>> {
        let span = w.int_span();
        if !self.policy.is_on(Site::IntDot) || !w.int_supported() || !k.is_multiple_of(span) {
            return None;
        }
        Some(
            xs.chunks_exact(k)
                .map(|x| {
                    let mut q = IntRow::default();
                    q.quantize(x, span);
                    q
                })
                .collect(),
        )
    }

    /// The prefill product (`m` rows of `xs` against the `n` rows of a packed
    /// weight) in int16 ([`gemm_i16`]): the inputs quantized once, then each
    /// block of [`gemm_i16::NR`] weight rows decoded to small integers once
    /// and used for every input row.
    fn int_prefill(&self, rows: &Rows, xs: &[f32], m: usize, n: usize, k: usize, os: &mut [f32]) {
        const BN: usize = gemm_i16::NR;
        let g = k / 32;
        let optr = SharedMut(os.as_mut_ptr());
        self.pool.install(|| {
            let x = gemm_i16::IntRows::new(xs, k);
            (0..n.div_ceil(BN)).into_par_iter().for_each(|b| {
                let j0 = b * BN;
                let nb = BN.min(n - j0);
                // f32 scratch: the rows' and the panel's int16 (BN * k / 2 each), then scales and biases
                with_scratch(BN * k + 2 * BN * g, |buf| {
                    let (wq, rest) = buf.split_at_mut(BN * k / 2);
                    let (panel, rest) = rest.split_at_mut(BN * k / 2);
                    let (ws, wb) = rest.split_at_mut(BN * g);
                    let wq: &mut [i16] = bytemuck::cast_slice_mut(wq);
                    ws.fill(0.0);
                    wb.fill(0.0);
                    for jj in 0..nb {
                        rows.int_row(j0 + jj, &mut wq[jj * k..(jj + 1) * k], &mut ws[jj..], &mut wb[jj..], BN);
                    }
                    let panel: &mut [i32] = bytemuck::cast_slice_mut(panel);
                    gemm_i16::block_product(&x, m, wq, ws, wb, nb, panel, |r, o| {
                        // SAFETY: each (r, j0..j0+nb) is written by exactly one task, inside `os`.
                        unsafe { optr.write_row(r * n + j0, o) };
                    });
                })
            })
        });
    }

    /// Rows per task for a GEMV of `n` rows: a few tasks per thread, so that
    /// work balances without paying task overhead on every handful of rows.
    fn gemv_chunk(&self, n: usize) -> usize {
        n.div_ceil(self.threads() * 4).clamp(16, 4096).next_multiple_of(8)
    }
}

/// Matmuls of up to this many rows compute every row with the one-row
/// (decode) dot product (the bound every backend shares, see
/// [`crate::backend::ROW_EXACT_MAX`]); longer inputs take the blocked
/// prefill path.
pub use crate::backend::ROW_EXACT_MAX;

/// A raw pointer that may be shared across threads writing disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// # Safety
    /// `i` is in bounds and no other thread touches element `i`.
    #[inline]
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }

    /// # Safety
    /// `i..i + v.len()` is in bounds and no other thread touches it.
    #[inline]
    unsafe fn write_row(self, i: usize, v: &[f32]) {
        std::ptr::copy_nonoverlapping(v.as_ptr(), self.0.add(i), v.len());
    }
}

/// Read-only rows of a weight in its stored format. Row `j` is row
/// `j % rows` of expert `j / rows`.
enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
    Affine(quant::AffineRows<'a>),
    Ggml(quant::GgmlRows<'a>),
}

impl<'a> Rows<'a> {
    fn dense(w: &'a Tensor) -> Result<Self> {
        Ok(match w.dtype() {
            DType::F32 => Rows::F32(w.as_f32()?),
            DType::BF16 => Rows::Bf16(w.as_u16()?),
            DType::F16 => Rows::F16(w.as_u16()?),
            d => bail!("weight of shape {:?} has dtype {d}; the CPU backend needs F32, F16 or BF16", w.shape()),
        })
    }

    fn new(w: &'a Weight) -> Result<Self> {
        match w {
            Weight::Dense(t) => Self::dense(t),
            Weight::Affine { .. } => Ok(Rows::Affine(quant::AffineRows::new(w)?)),
            Weight::Gguf { .. } => Ok(Rows::Ggml(quant::GgmlRows::new(w)?)),
        }
    }

    #[inline]
    fn dot(&self, j: usize, k: usize, x: &[f32]) -> f32 {
        let r = j * k..(j + 1) * k;
        match self {
            Rows::F32(w) => dot_f32(x, &w[r]),
            Rows::Bf16(w) => dot_bf16(x, &w[r]),
            Rows::F16(w) => dot_f16(x, &w[r]),
            Rows::Affine(a) => a.dot(j, x),
            Rows::Ggml(g) => g.dot(j, x),
        }
    }

    /// Whether [`Rows::dot_int`] takes this weight (a packed format the
    /// integer kernels know, on a processor they run on).
    fn int_supported(&self) -> bool {
        match self {
            Rows::Affine(a) => a.int_supported(),
            Rows::Ggml(g) => g.int_supported(),
            _ => false,
        }
    }

    /// Values per scale of the integer input this weight's kernels take
    /// ([`intdot::span`]).
    fn int_span(&self) -> usize {
        match self {
            Rows::Ggml(g) => intdot::span(g.ty),
            _ => 32,
        }
    }

    /// Row `j` against an integer-quantized input ([`Rows::int_supported`] only).
    #[inline]
    fn dot_int(&self, j: usize, y: &IntRow) -> f32 {
        match self {
            Rows::Affine(a) => a.dot_int(j, y),
            Rows::Ggml(g) => g.dot_int(j, y),
            _ => unreachable!("dot_int on a dense weight"),
        }
    }

    /// Whether [`Rows::dot_int8`] takes this weight.
    fn int8_supported(&self) -> bool {
        match self {
            Rows::Affine(a) => a.int8_supported(),
            Rows::Ggml(g) => g.int8_supported(),
            _ => false,
        }
    }

    /// Rows `j..j + 8` against an integer-quantized input
    /// ([`Rows::int8_supported`] only).
    #[inline]
    fn dot_int8(&self, j: usize, y: &IntRow, out: &mut [f32; 8]) {
        match self {
            Rows::Affine(a) => a.dot_int8(j, y, out),
            Rows::Ggml(g) => g.dot_int8(j, y, out),
            _ => unreachable!("dot_int8 on a weight without an eight-row kernel"),
        }
    }

    /// [`Rows::dot_int8`] against each of `ys`, bitwise the same values
    /// (the nibbles of a block unpacked once for all of them).
    #[inline]
    fn dot_int8_rows(&self, j: usize, ys: &[IntRow], out: &mut [[f32; 8]]) {
        match self {
            Rows::Ggml(g) => g.dot_int8_rows(j, ys, out),
            Rows::Affine(a) => a.dot_int8_rows(j, ys, out),
            _ => unreachable!("dot_int8_rows on a weight without an eight-row kernel"),
        }
    }

    /// Row `j` as small integers with a scale and bias per block of 32, put
    /// at `s[g * stride]` and `b[g * stride]` ([`Rows::int_supported`] only).
    fn int_row(&self, j: usize, q: &mut [i16], s: &mut [f32], b: &mut [f32], stride: usize) {
        match self {
            Rows::Affine(a) => a.int_row(j, q, s, b, stride),
            Rows::Ggml(g) => g.int_row(j, q, s, b, stride),
            _ => unreachable!("int_row on a dense weight"),
        }
    }

    /// [`Rows::dot`] of row `j` with each of `xs`, bitwise the same values;
    /// the packed formats dequantize the row once for several inputs.
    fn dot_rows(&self, j: usize, k: usize, xs: &[&[f32]], buf: &mut [f32], out: &mut [f32]) {
        match self {
            Rows::Affine(a) => a.dot_rows(j, xs, buf, out),
            Rows::Ggml(g) => g.dot_rows(j, xs, buf, out),
            _ => {
                for (x, o) in xs.iter().zip(out) {
                    *o = self.dot(j, k, x);
                }
            }
        }
    }

    #[inline]
    fn row_into(&self, j: usize, k: usize, out: &mut [f32]) {
        let r = j * k..(j + 1) * k;
        match self {
            Rows::F32(w) => out.copy_from_slice(&w[r]),
            Rows::Bf16(w) => out.iter_mut().zip(&w[r]).for_each(|(o, &b)| *o = bf16_to_f32(b)),
            Rows::F16(w) => {
                use half::slice::HalfFloatSliceExt;
                let h: &[half::f16] = bytemuck::cast_slice(&w[r]);
                h.convert_to_f32_slice(out)
            }
            Rows::Affine(a) => a.row_into(j, out),
            Rows::Ggml(g) => g.row_into(j, out),
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with a thread-local scratch buffer of at least `len` floats.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

fn same_shape(a: &Tensor, b: &Tensor, op: &str) -> Result<()> {
    ensure!(a.shape() == b.shape(), "{op}: shape {:?} does not match {:?}", a.shape(), b.shape());
    Ok(())
}

/// Keys and values must be `[capacity, kv_heads, head_dim]` with the same shape.
fn check_cache(cache: &LayerKv, op: &str) -> Result<()> {
    ensure!(
        cache.k.shape().len() == 3,
        "{op}: cache must be [capacity, kv_heads, head_dim], got {:?}",
        cache.k.shape()
    );
    same_shape(&cache.k, &cache.v, op)
}

/// The positions tensor as a slice, after checking its length and signs.
fn positions_of<'a>(positions: &'a Tensor, m: usize, op: &str) -> Result<&'a [i32]> {
    let p = positions.as_i32()?;
    ensure!(p.len() == m, "{op}: {} positions for {m} rows", p.len());
    if let Some(&v) = p.iter().find(|&&v| v < 0) {
        bail!("{op}: negative position {v}");
    }
    Ok(p)
}

impl Backend for CpuBackend {
    fn kv_dtype(&self) -> DType {
        if self.kv_f16 {
            DType::F16
        } else {
            DType::F32
        }
    }

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads())
    }

    fn device_name(&self) -> String {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        format!("{model} ({} threads)", self.threads())
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Ok(Tensor::zeros(shape, dtype))
    }

    fn upload(&self, t: Tensor) -> Result<Tensor> {
        Ok(t)
    }

    fn read_f32(&self, t: &Tensor, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        match t.dtype() {
            DType::F32 => out.extend_from_slice(t.as_f32()?),
            DType::BF16 => out.extend(t.as_u16()?.iter().map(|&b| bf16_to_f32(b))),
            DType::F16 => out.extend(t.as_u16()?.iter().map(|&b| f16_to_f32(b))),
            d => bail!("read_f32: cannot read a {d} tensor"),
        }
        Ok(())
    }

    fn run(&self, f: &mut (dyn FnMut() -> Result<()> + Send)) -> Result<()> {
        self.pool.install(f)
    }

    fn write_i32(&self, t: &mut Tensor, data: &[i32]) -> Result<()> {
        let dst = t.as_i32_mut()?;
        ensure!(dst.len() == data.len(), "write_i32: {} values into a tensor of {}", data.len(), dst.len());
        dst.copy_from_slice(data);
        Ok(())
    }

    fn write_f32(&self, t: &mut Tensor, data: &[f32]) -> Result<()> {
        let dst = t.as_f32_mut()?;
        ensure!(dst.len() >= data.len(), "write_f32: {} values into a tensor of {}", data.len(), dst.len());
        dst[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read_i32(&self, t: &Tensor, out: &mut Vec<i32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(t.as_i32()?);
        Ok(())
    }

    fn fill_random(&self, t: &mut Tensor, seed: u64, lo: f32, hi: f32) -> Result<()> {
        let dtype = t.dtype();
        let bytes = t.host_bytes_mut()?;
        let val = |i: usize| crate::dtype::random_f32(seed, i as u64, lo, hi);
        match dtype {
            DType::F32 => {
                bytemuck::cast_slice_mut::<u8, f32>(bytes).par_iter_mut().enumerate().for_each(|(i, v)| *v = val(i))
            }
            DType::BF16 => bytemuck::cast_slice_mut::<u8, u16>(bytes)
                .par_iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = crate::dtype::f32_to_bf16(val(i))),
            DType::F16 => bytemuck::cast_slice_mut::<u8, u16>(bytes)
                .par_iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = crate::dtype::f32_to_f16(val(i))),
            _ => {
                ensure!(bytes.len() % 4 == 0, "fill_random: {} bytes is not whole words", bytes.len());
                bytemuck::cast_slice_mut::<u8, u32>(bytes)
                    .par_iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = crate::dtype::random_bits(seed, i as u64) as u32)
            }
        }
        Ok(())
    }

    fn free_memory(&self) -> Option<usize> {
        // MemAvailable: what can be allocated without swapping, page cache included
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    fn copy_bandwidth(&self) -> Result<f64> {
        let n = 256 << 20;
        let src = vec![1u8; n];
        let mut dst = vec![0u8; n];
        let mut times = vec![];
        for i in 0..6 {
            let t = std::time::Instant::now();
            self.pool.install(|| {
                dst.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s))
            });
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        std::hint::black_box(&dst);
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Ok(2.0 * n as f64 / times[times.len() / 2] / 1e9)
    }

    fn sample(
        &self,
        logits: &Tensor,
        params: &Tensor,
        history: &mut Tensor,
        state: &mut Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let v = logits.last_dim();
        ensure!(
            logits.dtype() == DType::F32 && v > 0 && logits.numel() >= v,
            "sample: logits must be f32 [rows, vocab], got {:?} {}",
            logits.shape(),
            logits.dtype()
        );
        ensure!(
            params.dtype() == DType::F32 && params.numel() == crate::sample::SAMPLE_PARAMS,
            "sample: params must be f32 [{}], got {:?} {}",
            crate::sample::SAMPLE_PARAMS,
            params.shape(),
            params.dtype()
        );
        ensure!(
            state.dtype() == DType::I32 && state.numel() == 2,
            "sample: state must be i32 [2], got {:?} {}",
            state.shape(),
            state.dtype()
        );
        ensure!(
            out.dtype() == DType::I32 && out.numel() >= 1,
            "sample: out must be i32 [1], got {:?} {}",
            out.shape(),
            out.dtype()
        );
        let ls = logits.as_f32()?;
        let row = &ls[ls.len() - v..];
        let tok = crate::sample::sample_host(row, params.as_f32()?, history.as_i32_mut()?, state.as_i32_mut()?)?;
        out.as_i32_mut()?[0] = tok;
        Ok(())
    }

    fn embedding(&self, table: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()> {
        let (experts, vocab, dim) = table.dims();
        ensure!(experts == 1 && vocab > 0, "embedding: table must be 2-D, got {:?}", table.dims());
        let ids = ids.as_i32()?;
        ensure!(
            out.numel() == ids.len() * dim,
            "embedding: output {:?} for {} ids of width {dim}",
            out.shape(),
            ids.len()
        );
        let rows = Rows::new(table)?;
        let o = out.as_f32_mut()?;
        for (row, &id) in o.chunks_exact_mut(dim).zip(ids) {
            ensure!(
                id >= 0 && (id as usize) < vocab,
                "embedding: token id {id} out of range for a vocabulary of {vocab}"
            );
            rows.row_into(id as usize, dim, row);
        }
        Ok(())
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        let n = w.numel();
        ensure!(n > 0 && x.last_dim() == n, "rms_norm: input {:?} vs weight {:?}", x.shape(), w.shape());
        same_shape(x, out, "rms_norm")?;
        let (xs, ws, os) = (x.as_f32()?, w.as_f32()?, out.as_f32_mut()?);
        let f = |(xr, or): (&[f32], &mut [f32])| {
            let ss = dot_f32(xr, xr);
            let inv = 1.0 / (ss / n as f32 + eps).sqrt();
            for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(ws) {
                *o = wv * (xv * inv);
            }
        };
        if xs.len() >= PAR_MIN {
            self.pool.install(|| xs.par_chunks_exact(n).zip(os.par_chunks_exact_mut(n)).for_each(f));
        } else {
            xs.chunks_exact(n).zip(os.chunks_exact_mut(n)).for_each(f);
        }
        Ok(())
    }

    fn matmul(&self, x: &Tensor, w: &Weight, out: &mut Tensor) -> Result<()> {
        let (experts, n, k) = w.dims();
        ensure!(experts == 1 && n > 0, "matmul: weight must be 2-D, got {:?}", w.dims());
        ensure!(
            k > 0 && x.numel().is_multiple_of(k),
            "matmul: input {:?} does not match weight {:?}",
            x.shape(),
            w.dims()
        );
        let m = x.numel() / k;
        ensure!(out.numel() == m * n, "matmul: output {:?} for a [{m}, {n}] product", out.shape());
        let rows = Rows::new(w)?;
        let xs = x.as_f32()?;
        let os = out.as_f32_mut()?;
        if m <= ROW_EXACT_MAX {
            if let Some(ys) = self.int_inputs(&rows, xs, k) {
                // integer dot products: row r's outputs are the one-row step's
                let chunk = self.gemv_chunk(n);
                let eight = rows.int8_supported();
                let optr = SharedMut(os.as_mut_ptr());
                self.pool.install(|| {
                    (0..n.div_ceil(chunk)).into_par_iter().for_each(|ci| {
                        let (mut j, end) = (ci * chunk, ((ci + 1) * chunk).min(n));
                        if eight {
                            let mut o = [[0f32; 8]; ROW_EXACT_MAX];
                            while j + 8 <= end {
                                if let [y] = &ys[..] {
                                    rows.dot_int8(j, y, &mut o[0]);
                                } else {
                                    rows.dot_int8_rows(j, &ys, &mut o[..m]);
                                }
                                for (r, o) in o[..m].iter().enumerate() {
                                    // SAFETY: each (r, j..j + 8) is written by exactly one task, inside `os`.
                                    unsafe { optr.write_row(r * n + j, o) };
                                }
                                j += 8;
                            }
                        }
                        for j in j..end {
                            for (r, y) in ys.iter().enumerate() {
                                // SAFETY: each (r, j) is written by exactly one task, inside `os`.
                                unsafe { optr.write(r * n + j, rows.dot_int(j, y)) };
                            }
                        }
                    })
                });
                return Ok(());
            }
        }
        if m == 1 {
            let chunk = self.gemv_chunk(n);
            self.pool.install(|| {
                os.par_chunks_mut(chunk).enumerate().for_each(|(ci, oc)| {
                    for (jj, o) in oc.iter_mut().enumerate() {
                        *o = rows.dot(ci * chunk + jj, k, xs);
                    }
                })
            });
            return Ok(());
        }
        if m <= ROW_EXACT_MAX {
            // A few rows (a speculative verify pass): each output is the
            // one-token step's own dot product, so row r is bitwise what a
            // decode step at that position computes; a weight row stays in
            // cache while every input row reads it.
            let chunk = self.gemv_chunk(n);
            let optr = SharedMut(os.as_mut_ptr());
            let mut inputs: [&[f32]; ROW_EXACT_MAX] = [&[]; ROW_EXACT_MAX];
            for (i, x) in xs.chunks_exact(k).enumerate() {
                inputs[i] = x;
            }
            let inputs = &inputs[..m];
            self.pool.install(|| {
                (0..n.div_ceil(chunk)).into_par_iter().for_each(|ci| {
                    let mut v = [0f32; ROW_EXACT_MAX];
                    with_scratch(k, |buf| {
                        for j in ci * chunk..((ci + 1) * chunk).min(n) {
                            rows.dot_rows(j, k, inputs, buf, &mut v[..m]);
                            for (r, &x) in v[..m].iter().enumerate() {
                                // SAFETY: each (r, j) is written by exactly one task, inside `os`.
                                unsafe { optr.write(r * n + j, x) };
                            }
                        }
                    })
                })
            });
            return Ok(());
        }
        if self.policy.is_on(Site::IntDot) && rows.int_supported() && k % 32 == 0 && gemm_i16::supported() {
            self.int_prefill(&rows, xs, m, n, k, os);
            return Ok(());
        }
        // Prefill: convert a block of weight rows to f32 once, use it for every input row.
        const BN: usize = gemm::NR;
        let optr = SharedMut(os.as_mut_ptr());
        self.pool.install(|| {
            (0..n.div_ceil(BN)).into_par_iter().for_each(|b| {
                let j0 = b * BN;
                let nb = BN.min(n - j0);
                with_scratch(2 * BN * k, |buf| {
                    let (buf, panel) = buf.split_at_mut(BN * k);
                    for jj in 0..nb {
                        rows.row_into(j0 + jj, k, &mut buf[jj * k..(jj + 1) * k]);
                    }
                    gemm::block_product(xs, m, buf, nb, k, panel, |r, o| {
                        // SAFETY: each (r, j0..j0+nb) is written by exactly one task, inside `os`.
                        unsafe { optr.write_row(r * n + j0, o) };
                    });
                })
            })
        });
        Ok(())
    }

    fn expert_matmul(&self, x: &Tensor, w: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()> {
        let (experts, n, k) = w.dims();
        ensure!(ids.shape().len() == 2, "expert_matmul: ids must be [rows, slots], got {:?}", ids.shape());
        let (m, slots) = (ids.shape()[0], ids.shape()[1]);
        let shared = x.numel() == m * k;
        ensure!(
            shared || x.numel() == m * slots * k,
            "expert_matmul: input {:?} is neither [{m}, {k}] nor [{m}, {slots}, {k}]",
            x.shape()
        );
        ensure!(out.numel() == m * slots * n, "expert_matmul: output {:?} for [{m}, {slots}, {n}]", out.shape());
        let id = ids.as_i32()?;
        if let Some(&e) = id.iter().find(|&&e| e < 0 || e as usize >= experts) {
            bail!("expert_matmul: expert id {e} out of range for {experts} experts");
        }
        let rows = Rows::new(w)?;
        let xs = x.as_f32()?;
        let os = out.as_f32_mut()?;
        let chunk = self.gemv_chunk(m * slots * n);
        let ys = if m <= ROW_EXACT_MAX { self.int_inputs(&rows, xs, k) } else { None };
        // eight rows at a time where they are eight rows of one expert: chunks and rows are multiples of 8
        let eight = ys.is_some() && rows.int8_supported() && n % 8 == 0;
        self.pool.install(|| {
            os.par_chunks_mut(chunk).enumerate().for_each(|(ci, oc)| {
                let mut jj = 0;
                while jj < oc.len() {
                    let flat = ci * chunk + jj;
                    let (rs, j) = (flat / n, flat % n);
                    let xi = if shared { rs / slots } else { rs };
                    let row = id[rs] as usize * n + j;
                    match &ys {
                        Some(ys) if eight && j % 8 == 0 && jj + 8 <= oc.len() => {
                            let o: &mut [f32; 8] = (&mut oc[jj..jj + 8]).try_into().expect("eight outputs");
                            rows.dot_int8(row, &ys[xi], o);
                            jj += 8;
                            continue;
                        }
                        Some(ys) => oc[jj] = rows.dot_int(row, &ys[xi]),
                        None => oc[jj] = rows.dot(row, k, &xs[xi * k..(xi + 1) * k]),
                    }
                    jj += 1;
                }
            })
        });
        Ok(())
    }

    fn topk_router(&self, logits: &Tensor, renormalize: bool, ids: &mut Tensor, weights: &mut Tensor) -> Result<()> {
        let e = logits.last_dim();
        let m = logits.rows();
        ensure!(ids.shape().len() == 2 && ids.shape()[0] == m, "topk_router: ids {:?} for {m} rows", ids.shape());
        let k = ids.shape()[1];
        ensure!(k >= 1 && k <= e, "topk_router: top-{k} of {e} experts");
        ensure!(weights.numel() == m * k, "topk_router: weights {:?} for [{m}, {k}]", weights.shape());
        let ls = logits.as_f32()?;
        let (is, ws) = (ids.as_i32_mut()?, weights.as_f32_mut()?);
        for r in 0..m {
            let row = &ls[r * e..(r + 1) * e];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&v| (v - mx).exp()).sum();
            let (ir, wr) = (&mut is[r * k..(r + 1) * k], &mut ws[r * k..(r + 1) * k]);
            // selection by repeated scans: k is small (8 of 128 at most in practice)
            for s in 0..k {
                let mut best: Option<usize> = None;
                for (i, &v) in row.iter().enumerate() {
                    if ir[..s].contains(&(i as i32)) {
                        continue;
                    }
                    if best.is_none_or(|b| v > row[b]) {
                        best = Some(i);
                    }
                }
                let b = best.unwrap_or(0);
                ir[s] = b as i32;
                wr[s] = (row[b] - mx).exp() / sum;
            }
            if renormalize {
                let t: f32 = wr.iter().sum();
                wr.iter_mut().for_each(|w| *w /= t);
            }
        }
        Ok(())
    }

    fn moe_combine(&self, y: &Tensor, weights: &Tensor, out: &mut Tensor) -> Result<()> {
        let d = out.last_dim();
        let m = out.rows();
        ensure!(weights.numel().is_multiple_of(m.max(1)), "moe_combine: weights {:?} for {m} rows", weights.shape());
        let k = weights.numel() / m.max(1);
        ensure!(y.numel() == m * k * d, "moe_combine: expert outputs {:?} for [{m}, {k}, {d}]", y.shape());
        let (ys, ws, os) = (y.as_f32()?, weights.as_f32()?, out.as_f32_mut()?);
        for r in 0..m {
            let o = &mut os[r * d..(r + 1) * d];
            o.fill(0.0);
            for s in 0..k {
                axpy(ws[r * k + s], &ys[(r * k + s) * d..(r * k + s + 1) * d], o);
            }
        }
        Ok(())
    }

    fn rope(&self, x: &mut Tensor, positions: &Tensor, inv_freq: &Tensor, style: RopeStyle) -> Result<()> {
        ensure!(x.shape().len() == 3, "rope: expected [rows, heads, head_dim], got {:?}", x.shape());
        let (m, heads, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let half = d / 2;
        ensure!(d % 2 == 0 && d <= MAX_HEAD_DIM, "rope: unsupported head_dim {d}");
        let freqs = inv_freq.as_f32()?;
        ensure!(freqs.len() == half, "rope: {} frequencies for head_dim {d}", freqs.len());
        let pos = positions_of(positions, m, "rope")?;
        let xs = x.as_f32_mut()?;
        let f = |(row, &p): (&mut [f32], &i32)| {
            let mut cos = [0f32; MAX_HEAD_DIM / 2];
            let mut sin = [0f32; MAX_HEAD_DIM / 2];
            for i in 0..half {
                let a = p as f32 * freqs[i];
                cos[i] = a.cos();
                sin[i] = a.sin();
            }
            for h in row.chunks_exact_mut(d) {
                for i in 0..half {
                    let (a, b) = match style {
                        RopeStyle::Half => (i, i + half),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x0, x1) = (h[a], h[b]);
                    h[a] = x0 * cos[i] - x1 * sin[i];
                    h[b] = x1 * cos[i] + x0 * sin[i];
                }
            }
        };
        if m * heads * d >= PAR_MIN {
            self.pool.install(|| xs.par_chunks_exact_mut(heads * d).zip(pos.par_iter()).for_each(f));
        } else {
            xs.chunks_exact_mut(heads * d).zip(pos.iter()).for_each(f);
        }
        Ok(())
    }

    fn kv_write(&self, k: &Tensor, v: &Tensor, positions: &Tensor, cache: &mut LayerKv) -> Result<()> {
        same_shape(k, v, "kv_write")?;
        check_cache(cache, "kv_write")?;
        let cs = cache.k.shape();
        let (cap, row) = (cs[0], cs[1] * cs[2]);
        ensure!(
            k.shape().len() == 3 && k.shape()[1..] == cs[1..],
            "kv_write: keys {:?} do not match the cache {:?}",
            k.shape(),
            cs
        );
        let m = k.shape()[0];
        let pos = positions_of(positions, m, "kv_write")?;
        // check every position before writing any, so a failure leaves the cache as it was
        if let Some(&p) = pos.iter().find(|&&p| p as usize >= cap) {
            bail!("kv_write: position {p} is past the cache capacity {cap}");
        }
        let (ks, vs) = (k.as_f32()?, v.as_f32()?);
        if cache.k.dtype() == DType::F16 {
            use half::slice::HalfFloatSliceExt;
            for (src, dst) in [(ks, cache.k.as_u16_mut()?), (vs, cache.v.as_u16_mut()?)] {
                let dst: &mut [half::f16] = bytemuck::cast_slice_mut(dst);
                for (i, &p) in pos.iter().enumerate() {
                    let p = p as usize;
                    dst[p * row..(p + 1) * row].convert_from_f32_slice(&src[i * row..(i + 1) * row]);
                }
            }
            return Ok(());
        }
        for (src, dst) in [(ks, cache.k.as_f32_mut()?), (vs, cache.v.as_f32_mut()?)] {
            for (i, &p) in pos.iter().enumerate() {
                let p = p as usize;
                dst[p * row..(p + 1) * row].copy_from_slice(&src[i * row..(i + 1) * row]);
            }
        }
        Ok(())
    }

    fn attention(&self, q: &Tensor, cache: &LayerKv, positions: &Tensor, scale: f32, out: &mut Tensor) -> Result<()> {
        self.attention_contiguous(q, cache, positions, scale, out)
    }

    fn paged_attention(&self, q: &Tensor, cache: &LayerKv, pages: &Pages, scale: f32, out: &mut Tensor) -> Result<()> {
        self.attention_paged(q, cache, pages, scale, out)
    }

    fn fusion_policy(&self) -> Option<&crate::fusion::FusionPolicy> {
        Some(&self.policy)
    }

    fn add_rms_norm(&self, x: &mut Tensor, y: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        // one pass per row: the add, then the norm of the row just written
        // (the same arithmetic as add_assign + rms_norm, so the same bits)
        let n = w.numel();
        ensure!(n > 0 && x.last_dim() == n, "add_rms_norm: input {:?} vs weight {:?}", x.shape(), w.shape());
        same_shape(x, y, "add_rms_norm")?;
        same_shape(x, out, "add_rms_norm")?;
        let (ys, ws) = (y.as_f32()?, w.as_f32()?);
        let (xs, os) = (x.as_f32_mut()?, out.as_f32_mut()?);
        let f = |((xr, yr), or): ((&mut [f32], &[f32]), &mut [f32])| {
            xr.iter_mut().zip(yr).for_each(|(a, b)| *a += b);
            let ss = dot_f32(xr, xr);
            let inv = 1.0 / (ss / n as f32 + eps).sqrt();
            for ((o, &xv), &wv) in or.iter_mut().zip(xr.iter()).zip(ws) {
                *o = wv * (xv * inv);
            }
        };
        if xs.len() >= PAR_MIN {
            self.pool.install(|| {
                xs.par_chunks_exact_mut(n).zip(ys.par_chunks_exact(n)).zip(os.par_chunks_exact_mut(n)).for_each(f)
            });
        } else {
            xs.chunks_exact_mut(n).zip(ys.chunks_exact(n)).zip(os.chunks_exact_mut(n)).for_each(f);
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        same_shape(gate, up, "silu_mul")?;
        same_shape(gate, out, "silu_mul")?;
        let (g, u, o) = (gate.as_f32()?, up.as_f32()?, out.as_f32_mut()?);
        let f = |((o, &g), &u): ((&mut f32, &f32), &f32)| *o = g / (1.0 + (-g).exp()) * u;
        if o.len() >= PAR_MIN {
            self.pool.install(|| o.par_iter_mut().zip(g.par_iter()).zip(u.par_iter()).for_each(f));
        } else {
            o.iter_mut().zip(g).zip(u).for_each(f);
        }
        Ok(())
    }

    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        same_shape(x, y, "add_assign")?;
        let (xs, ys) = (x.as_f32_mut()?, y.as_f32()?);
        xs.iter_mut().zip(ys).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn softmax(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        same_shape(x, out, "softmax")?;
        let n = x.last_dim();
        ensure!(n > 0, "softmax: empty rows in {:?}", x.shape());
        let (xs, os) = (x.as_f32()?, out.as_f32_mut()?);
        for (xr, or) in xs.chunks_exact(n).zip(os.chunks_exact_mut(n)) {
            let mx = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in or.iter_mut().zip(xr) {
                *o = (v - mx).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            or.iter_mut().for_each(|o| *o *= inv);
        }
        Ok(())
    }

    fn argmax(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        let n = x.last_dim();
        ensure!(out.numel() == x.rows(), "argmax: output {:?} for {} rows", out.shape(), x.rows());
        let xs = x.as_f32()?;
        let os = out.as_i32_mut()?;
        for (xr, o) in xs.chunks_exact(n).zip(os.iter_mut()) {
            let mut best = 0usize;
            for (i, &v) in xr.iter().enumerate() {
                if v > xr[best] || (xr[best].is_nan() && !v.is_nan()) {
                    best = i;
                }
            }
            *o = best as i32;
        }
        Ok(())
    }

    fn copy_rows(&self, src: &Tensor, src_row: usize, dst: &mut Tensor, dst_row: usize, n: usize) -> Result<()> {
        ensure!(src.dtype() == dst.dtype(), "copy_rows: {} into {}", src.dtype(), dst.dtype());
        let w = src.last_dim();
        ensure!(dst.last_dim() == w, "copy_rows: rows of {w} into rows of {}", dst.last_dim());
        ensure!(src_row + n <= src.rows() && dst_row + n <= dst.rows(), "copy_rows: rows out of range");
        let es = src.dtype().size();
        let s = &src.host_bytes()?[src_row * w * es..(src_row + n) * w * es];
        dst.host_bytes_mut()?[dst_row * w * es..(dst_row + n) * w * es].copy_from_slice(s);
        Ok(())
    }
    fn copy_cols(&self, src: &Tensor, dst: &mut Tensor, col: usize) -> Result<()> {
        let (m, n, wide) = copy_cols_dims(src, dst, col)?;
        let s = src.as_f32()?;
        let d = dst.as_f32_mut()?;
        for r in 0..m {
            d[r * wide + col..r * wide + col + n].copy_from_slice(&s[r * n..(r + 1) * n]);
        }
        Ok(())
    }
}
