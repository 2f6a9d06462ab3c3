//! MoE routing and combining, softmax, argmax and sampling (kernels:
//! `moe.cu`, `sample.cu`). None of them allocates or waits for the device
//! (the sampler's scratch is sized for a 256k vocabulary at its first call),
//! so all of them can be captured in a decode-step graph.

use anyhow::{ensure, Result};

use super::ops::grid_1d;
use super::{Arg, CudaBackend};
use crate::dtype::DType;
use crate::sample::SAMPLE_PARAMS;
use crate::tensor::Tensor;

const MOE: &str = "moe.cu";
const SAMPLE: &str = "sample.cu";

/// The largest expert count the router stages in shared memory.
const MAX_EXPERTS: usize = 1 << 14;
/// The sampler's scratch holds at least this many floats, so that models
/// with up to this vocabulary never regrow it (a regrow would move a buffer
/// that a recorded graph still points at).
const SAMPLE_SCRATCH_MIN: usize = 1 << 18;
/// Tokens per block of the sampler's kernels (`CH` in `sample.cu`).
const SAMPLE_CHUNK: usize = 2048;
/// Bytes of the sampler's control block (`struct Ctl` in `sample.cu`).
const SAMPLE_CTL_BYTES: usize = 112 + 3 * 4096 * 8;

fn dev(t: &Tensor, want: DType, op: &str, what: &str) -> Result<u64> {
    ensure!(t.dtype() == want, "cuda {op}: {what} must be {want}, got {} {:?}", t.dtype(), t.shape());
    CudaBackend::ptr(t, op)
}

impl CudaBackend {
    pub(crate) fn topk_router_impl(
        &self,
        logits: &Tensor,
        renormalize: bool,
        ids: &mut Tensor,
        weights: &mut Tensor,
    ) -> Result<()> {
        let e = logits.last_dim();
        let m = logits.rows();
        ensure!(ids.shape().len() == 2 && ids.shape()[0] == m, "topk_router: ids {:?} for {m} rows", ids.shape());
        let k = ids.shape()[1];
        ensure!(k >= 1 && k <= e, "topk_router: top-{k} of {e} experts");
        ensure!(e <= MAX_EXPERTS, "topk_router: {e} experts (at most {MAX_EXPERTS})");
        ensure!(weights.numel() == m * k, "topk_router: weights {:?} for [{m}, {k}]", weights.shape());
        let pl = dev(logits, DType::F32, "topk_router", "logits")?;
        let pi = dev(ids, DType::I32, "topk_router", "ids")?;
        let pw = dev(weights, DType::F32, "topk_router", "weights")?;
        // rows per block: as many warps as fit 48 KB of staged rows, at most 4
        let warps = (48 * 1024 / (e * 4)).clamp(1, 4);
        let smem = (warps * e * 4) as u32;
        let dims = ((m.div_ceil(warps) as u32, 1, 1), (32 * warps as u32, 1, 1), smem);
        self.launch(
            MOE,
            "topk_router_k",
            dims,
            &[
                Arg::P(pl),
                Arg::P(pi),
                Arg::P(pw),
                Arg::I(m as i32),
                Arg::I(e as i32),
                Arg::I(k as i32),
                Arg::I(renormalize as i32),
            ],
        )
    }

    pub(crate) fn moe_combine_impl(&self, y: &Tensor, weights: &Tensor, out: &mut Tensor) -> Result<()> {
        let d = out.last_dim();
        let m = out.rows();
        ensure!(weights.numel().is_multiple_of(m.max(1)), "moe_combine: weights {:?} for {m} rows", weights.shape());
        let k = weights.numel() / m.max(1);
        ensure!(y.numel() == m * k * d, "moe_combine: expert outputs {:?} for [{m}, {k}, {d}]", y.shape());
        let py = dev(y, DType::F32, "moe_combine", "expert outputs")?;
        let pw = dev(weights, DType::F32, "moe_combine", "weights")?;
        let po = dev(out, DType::F32, "moe_combine", "out")?;
        let args =
            |cols: usize| [Arg::P(py), Arg::P(pw), Arg::P(po), Arg::I(m as i32), Arg::I(k as i32), Arg::I(cols as i32)];
        if d.is_multiple_of(4) && py % 16 == 0 && po % 16 == 0 {
            self.launch(MOE, "moe_combine_k4", grid_1d(m * d / 4, self.sm_count), &args(d / 4))
        } else {
            self.launch(MOE, "moe_combine_k", grid_1d(m * d, self.sm_count), &args(d))
        }
    }

    pub(crate) fn softmax_impl(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        ensure!(x.shape() == out.shape(), "softmax: shape {:?} does not match {:?}", x.shape(), out.shape());
        let n = x.last_dim();
        ensure!(n > 0, "softmax: empty rows in {:?}", x.shape());
        let (px, po) = (dev(x, DType::F32, "softmax", "x")?, dev(out, DType::F32, "softmax", "out")?);
        let rows = x.rows();
        if n <= 1024 {
            let dims = ((rows.div_ceil(8) as u32, 1, 1), (256, 1, 1), 0);
            self.launch(MOE, "softmax_warp", dims, &[Arg::P(px), Arg::P(po), Arg::I(rows as i32), Arg::I(n as i32)])
        } else {
            let threads = if n >= 8192 { 1024 } else { 256 };
            let dims = ((rows as u32, 1, 1), (threads, 1, 1), 0);
            self.launch(MOE, "softmax_block", dims, &[Arg::P(px), Arg::P(po), Arg::I(n as i32)])
        }
    }

    pub(crate) fn argmax_impl(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        let n = x.last_dim();
        let rows = x.rows();
        ensure!(n > 0, "argmax: empty rows in {:?}", x.shape());
        ensure!(out.numel() == rows, "argmax: output {:?} for {rows} rows", out.shape());
        let (px, po) = (dev(x, DType::F32, "argmax", "x")?, dev(out, DType::I32, "argmax", "out")?);
        if n <= 1024 {
            let dims = ((rows.div_ceil(8) as u32, 1, 1), (256, 1, 1), 0);
            self.launch(SAMPLE, "argmax_warp", dims, &[Arg::P(px), Arg::P(po), Arg::I(rows as i32), Arg::I(n as i32)])
        } else {
            let threads = if n >= 8192 { 1024 } else { 256 };
            let dims = ((rows as u32, 1, 1), (threads, 1, 1), 0);
            self.launch(SAMPLE, "argmax_block", dims, &[Arg::P(px), Arg::P(po), Arg::I(n as i32)])
        }
    }

    pub(crate) fn sample_impl(
        &self,
        logits: &Tensor,
        params: &Tensor,
        history: &mut Tensor,
        state: &mut Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let v = logits.last_dim();
        ensure!(
            v > 0 && logits.numel() >= v && v <= i32::MAX as usize - SAMPLE_CHUNK,
            "sample: logits {:?} must be [rows, vocab]",
            logits.shape()
        );
        ensure!(params.numel() == SAMPLE_PARAMS, "sample: params {:?}, expected [{SAMPLE_PARAMS}]", params.shape());
        ensure!(state.numel() == 2, "sample: state {:?}, expected [2] (history length, counter)", state.shape());
        ensure!(out.numel() >= 1, "sample: out {:?}, expected [1]", out.shape());
        ensure!(history.numel() <= i32::MAX as usize, "sample: history of {} entries", history.numel());
        let pl = dev(logits, DType::F32, "sample", "logits")?;
        let pp = dev(params, DType::F32, "sample", "params")?;
        let ph = dev(history, DType::I32, "sample", "history")?;
        let ps = dev(state, DType::I32, "sample", "state")?;
        let po = dev(out, DType::I32, "sample", "out")?;
        let row = pl + ((logits.rows() - 1) * v * 4) as u64;
        let cap = history.numel() as i32;
        // scratch: z [V] f32, the candidate list (keys [V] u32, masses [V] u64),
        // per-chunk partials, and the control block (zeroed below)
        let vp = v.max(SAMPLE_SCRATCH_MIN).next_multiple_of(64);
        let nb = v.div_ceil(SAMPLE_CHUNK);
        let nbp = vp.div_ceil(SAMPLE_CHUNK).next_multiple_of(64);
        let (o_key, o_mass) = (4 * vp, 8 * vp);
        let (o_pv, o_pi, o_pm) = (16 * vp, 16 * vp + 4 * nbp, 16 * vp + 8 * nbp);
        let o_ctl = (16 * vp + 16 * nbp).next_multiple_of(256);
        let base = self.scratch(4, o_ctl + SAMPLE_CTL_BYTES)?;
        let at = |o: usize| Arg::P(base + o as u64);
        let ctl = base + o_ctl as u64;
        unsafe { cudarc::driver::result::memset_d8_async(ctl, 0, SAMPLE_CTL_BYTES, self.stream.cu_stream()) }
            .map_err(|e| anyhow::anyhow!("sample: clearing the control block: {e:?}"))?;
        let grid = ((nb as u32, 1, 1), (256, 1, 1), 0);
        let vi = Arg::I(v as i32);
        self.launch(
            SAMPLE,
            "sample_scale",
            grid,
            &[
                Arg::P(row),
                Arg::P(pp),
                Arg::P(ph),
                Arg::I(cap),
                Arg::P(ps),
                Arg::P(po),
                vi,
                at(0),
                at(o_pv),
                at(o_pi),
                Arg::P(ctl),
            ],
        )?;
        for stage in 1..=3 {
            let args = [Arg::P(pp), vi, at(0), at(o_key), at(o_mass), Arg::P(ctl), Arg::I(stage)];
            self.launch(SAMPLE, "sample_select", grid, &args)?;
        }
        self.launch(
            SAMPLE,
            "sample_draw",
            grid,
            &[Arg::P(pp), Arg::P(ph), Arg::I(cap), Arg::P(ps), Arg::P(po), vi, at(0), at(o_pm), Arg::P(ctl)],
        )
    }
}
