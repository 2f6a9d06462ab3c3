//! Element-wise ops, norms, RoPE, random fill and the copy-bandwidth probe
//! (kernels: `elementwise.cu`, `norm_rope.cu`).

use anyhow::{anyhow, ensure, Result};
use cudarc::driver::{result as drv, sys};

use super::{dtype_tag, Arg, CudaBackend, Dims};
use crate::dtype::DType;
use crate::rope::RopeStyle;
use crate::tensor::Tensor;

const EW: &str = "elementwise.cu";
const NR: &str = "norm_rope.cu";

/// A grid-stride launch over `n` elements.
pub(crate) fn grid_1d(n: usize, sms: u32) -> Dims {
    let blocks = n.div_ceil(256).clamp(1, sms as usize * 8) as u32;
    ((blocks, 1, 1), (256, 1, 1), 0)
}

fn check_f32(t: &Tensor, op: &str, what: &str) -> Result<u64> {
    ensure!(t.dtype() == DType::F32, "cuda {op}: {what} must be f32, got {} {:?}", t.dtype(), t.shape());
    CudaBackend::ptr(t, op)
}

fn same_shape(a: &Tensor, b: &Tensor, op: &str) -> Result<()> {
    ensure!(a.shape() == b.shape(), "{op}: shapes {:?} and {:?} differ", a.shape(), b.shape());
    Ok(())
}

impl CudaBackend {
    pub(crate) fn add_assign_impl(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        same_shape(x, y, "add_assign")?;
        let (px, py) = (check_f32(x, "add_assign", "x")?, check_f32(y, "add_assign", "y")?);
        let n = x.numel();
        self.launch(EW, "add_assign_f32", grid_1d(n, self.sm_count), &[Arg::P(px), Arg::P(py), Arg::L(n as u64)])
    }

    pub(crate) fn silu_mul_impl(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        same_shape(gate, up, "silu_mul")?;
        same_shape(gate, out, "silu_mul")?;
        let (g, u, o) = (
            check_f32(gate, "silu_mul", "gate")?,
            check_f32(up, "silu_mul", "up")?,
            check_f32(out, "silu_mul", "out")?,
        );
        let n = gate.numel();
        self.launch(EW, "silu_mul_f32", grid_1d(n, self.sm_count), &[Arg::P(g), Arg::P(u), Arg::P(o), Arg::L(n as u64)])
    }

    pub(crate) fn copy_rows_impl(
        &self,
        src: &Tensor,
        src_row: usize,
        dst: &mut Tensor,
        dst_row: usize,
        n: usize,
    ) -> Result<()> {
        ensure!(src.dtype() == dst.dtype(), "copy_rows: {} into {}", src.dtype(), dst.dtype());
        let w = src.last_dim();
        ensure!(dst.last_dim() == w, "copy_rows: rows of {w} into rows of {}", dst.last_dim());
        ensure!(src_row + n <= src.rows() && dst_row + n <= dst.rows(), "copy_rows: rows out of range");
        let es = src.dtype().size();
        let bytes = n * w * es;
        let (s, d) = (Self::ptr(src, "copy_rows")?, Self::ptr(dst, "copy_rows")?);
        let (s, d) = (s + (src_row * w * es) as u64, d + (dst_row * w * es) as u64);
        if bytes.is_multiple_of(4) && s % 4 == 0 && d % 4 == 0 {
            let words = bytes / 4;
            return self.launch(
                EW,
                "copy_words",
                grid_1d(words, self.sm_count),
                &[Arg::P(s), Arg::P(d), Arg::L(words as u64)],
            );
        }
        unsafe { drv::memcpy_dtod_async(d, s, bytes, self.stream.cu_stream()) }.map_err(|e| anyhow!("copy_rows: {e:?}"))
    }

    pub(crate) fn copy_cols_impl(&self, src: &Tensor, dst: &mut Tensor, col: usize) -> Result<()> {
        let (m, n, wide) = crate::backend::copy_cols_dims(src, dst, col)?;
        let (s, d) = (Self::ptr(src, "copy_cols")?, Self::ptr(dst, "copy_cols")?);
        let args = [Arg::P(s), Arg::P(d), Arg::L(m as u64), Arg::L(n as u64), Arg::L(wide as u64), Arg::L(col as u64)];
        self.launch(EW, "copy_cols_f32", grid_1d(m * n, self.sm_count), &args)
    }

    /// `x` (f32) to bf16 into device memory at `dst`.
    pub(crate) fn to_bf16(&self, x: u64, n: usize, dst: u64) -> Result<()> {
        self.launch(EW, "f32_to_bf16_k", grid_1d(n, self.sm_count), &[Arg::P(x), Arg::P(dst), Arg::L(n as u64)])
    }

    pub(crate) fn rms_norm_impl(&self, x: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        let n = w.numel();
        ensure!(n > 0 && x.last_dim() == n, "rms_norm: input {:?} vs weight {:?}", x.shape(), w.shape());
        same_shape(x, out, "rms_norm")?;
        let (px, pw, po) =
            (check_f32(x, "rms_norm", "x")?, check_f32(w, "rms_norm", "weight")?, check_f32(out, "rms_norm", "out")?);
        let rows = x.rows();
        if n <= 256 {
            let per_block = 8u32;
            let dims = ((rows.div_ceil(per_block as usize) as u32, 1, 1), (32 * per_block, 1, 1), 0);
            self.launch(
                NR,
                "rms_norm_warp",
                dims,
                &[Arg::P(px), Arg::P(pw), Arg::P(po), Arg::I(rows as i32), Arg::I(n as i32), Arg::F(eps)],
            )
        } else {
            let dims = ((rows as u32, 1, 1), (row_block_threads(n), 1, 1), 0);
            self.launch(
                NR,
                "rms_norm_block",
                dims,
                &[Arg::P(px), Arg::P(pw), Arg::P(po), Arg::I(n as i32), Arg::F(eps)],
            )
        }
    }

    pub(crate) fn add_rms_norm_impl(
        &self,
        x: &mut Tensor,
        y: &Tensor,
        w: &Tensor,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        let n = w.numel();
        ensure!(n > 0 && x.last_dim() == n, "add_rms_norm: input {:?} vs weight {:?}", x.shape(), w.shape());
        same_shape(x, y, "add_rms_norm")?;
        same_shape(x, out, "add_rms_norm")?;
        let px = check_f32(x, "add_rms_norm", "x")?;
        let (py, pw, po) = (
            check_f32(y, "add_rms_norm", "y")?,
            check_f32(w, "add_rms_norm", "weight")?,
            check_f32(out, "add_rms_norm", "out")?,
        );
        let dims = ((x.rows() as u32, 1, 1), (row_block_threads(n), 1, 1), 0);
        self.launch(
            NR,
            "add_rms_norm_block",
            dims,
            &[Arg::P(px), Arg::P(py), Arg::P(pw), Arg::P(po), Arg::I(n as i32), Arg::F(eps)],
        )
    }

    pub(crate) fn rope_impl(
        &self,
        x: &mut Tensor,
        positions: &Tensor,
        inv_freq: &Tensor,
        style: RopeStyle,
    ) -> Result<()> {
        ensure!(x.shape().len() == 3, "rope: expected [rows, heads, head_dim], got {:?}", x.shape());
        let (m, heads, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        ensure!(d % 2 == 0, "rope: odd head_dim {d}");
        ensure!(inv_freq.numel() == d / 2, "rope: {} frequencies for head_dim {d}", inv_freq.numel());
        ensure!(
            positions.dtype() == DType::I32 && positions.numel() >= m,
            "rope: positions {:?} for {m} rows",
            positions.shape()
        );
        let px = check_f32(x, "rope", "x")?;
        let pf = check_f32(inv_freq, "rope", "inv_freq")?;
        let pp = Self::ptr(positions, "rope")?;
        let style = match style {
            RopeStyle::Half => 0,
            RopeStyle::Interleaved => 1,
        };
        let total = m * heads * d / 2;
        self.launch(
            NR,
            "rope_f32",
            grid_1d(total, self.sm_count),
            &[
                Arg::P(px),
                Arg::P(pp),
                Arg::P(pf),
                Arg::I(m as i32),
                Arg::I(heads as i32),
                Arg::I(d as i32),
                Arg::I(style),
            ],
        )
    }

    pub(crate) fn fill_random_impl(&self, t: &mut Tensor, seed: u64, lo: f32, hi: f32) -> Result<()> {
        let p = Self::ptr(t, "fill_random")?;
        let (tag, n) = match t.dtype() {
            DType::I32 | DType::U32 => (3, t.numel()),
            DType::U8 => {
                ensure!(t.numel().is_multiple_of(4), "fill_random: {} bytes is not whole words", t.numel());
                (3, t.numel() / 4)
            }
            d => (dtype_tag(d)?, t.numel()),
        };
        self.launch(
            EW,
            "fill_random_k",
            grid_1d(n, self.sm_count),
            &[Arg::P(p), Arg::L(n as u64), Arg::I(tag), Arg::L(seed), Arg::F(lo), Arg::F(hi)],
        )
    }

    pub(crate) fn copy_bandwidth_impl(&self) -> Result<f64> {
        let free = self.ctx.mem_get_info().map(|(f, _)| f).unwrap_or(0);
        let bytes = (1usize << 30).min(free / 4).max(64 << 20);
        let (a, b) = (self.alloc(bytes)?, self.alloc(bytes)?);
        let stream = self.stream.cu_stream();
        let copy = || unsafe { drv::memcpy_dtod_async(b.ptr, a.ptr, bytes, stream) }.map_err(|e| anyhow!("{e:?}"));
        for _ in 0..3 {
            copy()?;
        }
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let (e0, e1) = (
            self.ctx.new_event(Some(flags)).map_err(|e| anyhow!("{e:?}"))?,
            self.ctx.new_event(Some(flags)).map_err(|e| anyhow!("{e:?}"))?,
        );
        let mut best = f64::MAX;
        let mut times = vec![];
        for _ in 0..5 {
            e0.record(&self.stream).map_err(|e| anyhow!("{e:?}"))?;
            for _ in 0..4 {
                copy()?;
            }
            e1.record(&self.stream).map_err(|e| anyhow!("{e:?}"))?;
            e1.synchronize().map_err(|e| anyhow!("{e:?}"))?;
            let ms = e0.elapsed_ms(&e1).map_err(|e| anyhow!("{e:?}"))? as f64;
            times.push(ms);
            best = best.min(ms);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[times.len() / 2];
        // read + write, four copies per timed run
        Ok(2.0 * bytes as f64 * 4.0 / (med * 1e-3) / 1e9)
    }
}

/// Threads of a one-block-per-row norm kernel for rows of `n` values.
fn row_block_threads(n: usize) -> u32 {
    if n >= 4096 {
        1024
    } else if n >= 1024 {
        512
    } else {
        256
    }
}
