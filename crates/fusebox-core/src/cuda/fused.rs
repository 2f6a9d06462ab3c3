//! The fused decode kernels (`fused.cu`): sites `qk_norm`, `rope_kv_append`,
//! `moe`, `swiglu` and `dflash_attn`. Each launcher checks that its kernel covers the call (one
//! token, GEMV-able weight formats, head_dim <= 256, ...) and otherwise runs
//! the graph path, so a fused site switched on never changes what is
//! computed, only how many kernels compute it.
//!
//! The GEMV parts are planned by [`CudaBackend::plan_gemv`] exactly as the
//! graph path's stand-alone launches, and the epilogues repeat the graph
//! path's formulas in the same order: fused and graph results are bitwise
//! equal (tests/cuda_fused.rs checks it).

use std::sync::OnceLock;

use anyhow::{ensure, Result};

use super::attn::check_cache_dtype;
use super::gemv::{Dev, Plan};
use super::{Arg, CudaBackend};
use crate::backend::{
    attn_inputs_graph, dflash_attn_graph, moe_experts_graph, norm_rope_append_graph, swiglu_graph, AttnBufs, AttnIn,
    DraftAttn, MoeBufs, MoeIn, SwigluBufs,
};
use crate::dtype::DType;
use crate::kv::LayerKv;
use crate::quant::Weight;
use crate::rope::RopeStyle;
use crate::tensor::Tensor;

const FILE: &str = "fused.cu";
const THREADS: u32 = 256;
/// Scratch slot of the completion counters (zeroed at allocation; every
/// fused kernel leaves them zero).
const COUNTER_SLOT: usize = 6;
const COUNTERS: usize = 1 << 16;

/// Kernel names by GEMV kernel format (the order of `GEMV` in gemv.rs).
const QKV: [&str; 12] = [
    "fused_qkv_f32",
    "fused_qkv_f16",
    "fused_qkv_bf16",
    "fused_qkv_q2",
    "fused_qkv_q3",
    "fused_qkv_q4",
    "fused_qkv_q5",
    "fused_qkv_q6",
    "fused_qkv_q8",
    "fused_qkv_q6g16",
    "fused_qkv_q4i",
    "fused_qkv_q8i",
];
const MOE_GATEUP: [&str; 12] = [
    "fused_moe_gateup_f32",
    "fused_moe_gateup_f16",
    "fused_moe_gateup_bf16",
    "fused_moe_gateup_q2",
    "fused_moe_gateup_q3",
    "fused_moe_gateup_q4",
    "fused_moe_gateup_q5",
    "fused_moe_gateup_q6",
    "fused_moe_gateup_q8",
    "fused_moe_gateup_q6g16",
    "fused_moe_gateup_q4i",
    "fused_moe_gateup_q8i",
];
const MOE_DOWN: [&str; 12] = [
    "fused_moe_down_f32",
    "fused_moe_down_f16",
    "fused_moe_down_bf16",
    "fused_moe_down_q2",
    "fused_moe_down_q3",
    "fused_moe_down_q4",
    "fused_moe_down_q5",
    "fused_moe_down_q6",
    "fused_moe_down_q8",
    "fused_moe_down_q6g16",
    "fused_moe_down_q4i",
    "fused_moe_down_q8i",
];

/// The widest expert MLP the fused MoE path takes
/// (`FUSEBOX_FUSED_MOE_MAX_DFF`); wider experts take the graph path.
pub fn moe_max_dff() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| match std::env::var("FUSEBOX_FUSED_MOE_MAX_DFF") {
        Err(_) => DEFAULT_MOE_MAX_DFF,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("fusebox: FUSEBOX_FUSED_MOE_MAX_DFF={v} is not a whole number; using {DEFAULT_MOE_MAX_DFF}");
            DEFAULT_MOE_MAX_DFF
        }),
    })
}
/// The default of [`moe_max_dff`]: the widest expert width measured, Qwen3-30B-A3B's
/// 768 (1.001x there, docs/benchmark_results/fused-moe-h200.md); wider experts are
/// unmeasured and take the graph path.
pub const DEFAULT_MOE_MAX_DFF: usize = 768;

/// Output rows one block of a plan covers.
fn rows_per_block(p: &Plan) -> usize {
    (8 / p.ks) * p.gw * p.rows_per_warp
}

fn style_tag(s: RopeStyle) -> i32 {
    match s {
        RopeStyle::Half => 0,
        RopeStyle::Interleaved => 1,
    }
}

/// The optional per-head norm weight as a pointer (0 for none), checked.
fn norm_ptr(w: Option<&Tensor>, hd: usize, what: &str) -> Result<u64> {
    match w {
        None => Ok(0),
        Some(t) => {
            ensure!(
                t.dtype() == DType::F32 && t.numel() == hd,
                "cuda {what}: norm weight must be f32 [{hd}], got {} {:?}",
                t.dtype(),
                t.shape()
            );
            CudaBackend::ptr(t, what)
        }
    }
}

/// The shapes of one token's attention inputs, when a fused kernel covers them.
#[derive(Clone, Copy)]
struct Heads {
    hd: usize,
    nh: usize,
    nkv: usize,
    cap: usize,
}

/// The shapes the fused kernels need, for `rows` rows of queries (`None`
/// where a kernel does not cover the call).
fn heads(a: &AttnIn, b: &AttnBufs, cache: &LayerKv) -> Option<Heads> {
    heads_rows(a, b, cache).filter(|(_, rows)| *rows == 1).map(|(h, _)| h)
}

/// [`heads`] for any number of rows: `(heads, rows)`.
fn heads_rows(a: &AttnIn, b: &AttnBufs, cache: &LayerKv) -> Option<(Heads, usize)> {
    let cs = cache.k.shape();
    if cs.len() != 3 || cache.v.shape() != cs || check_cache_dtype(cache, "fused").is_err() {
        return None;
    }
    let (cap, nkv, hd) = (cs[0], cs[1], cs[2]);
    let qs = b.q.shape();
    if qs.len() != 3 {
        return None;
    }
    let rows = qs[0];
    let ok = (1..=65535).contains(&rows)
        && a.positions.numel() >= rows
        && a.slots.is_none() // a paged cache's write: the graph path
        && a.positions.dtype() == DType::I32
        && qs[2] == hd
        && hd % 2 == 0
        && hd <= 256
        && cap <= i32::MAX as usize
        && b.q_raw.numel() == b.q.numel()
        && b.k_raw.numel() == rows * nkv * hd
        && b.v.numel() == rows * nkv * hd
        && a.inv_freq.numel() * 2 >= hd;
    ok.then_some((Heads { hd, nh: qs[1], nkv, cap }, rows))
}

impl CudaBackend {
    fn counters(&self) -> Result<u64> {
        self.scratch(COUNTER_SLOT, COUNTERS * 4)
    }

    /// Site `qk_norm`: one launch for the three projections, norms, RoPE and
    /// the KV append; the graph path where the kernel does not apply.
    pub(crate) fn qkv_rope_impl(&self, h: &Tensor, a: &AttnIn, b: &mut AttnBufs, cache: &mut LayerKv) -> Result<()> {
        if !self.qkv_fused(h, a, b, cache)? {
            let append = crate::backend::Backend::fused(self, crate::fusion::Site::RopeKvAppend);
            return attn_inputs_graph(self, h, a, b, cache, append);
        }
        Ok(())
    }

    /// Launch the fused QKV kernel if it covers the call (Ok(false) if not).
    fn qkv_fused(&self, h: &Tensor, a: &AttnIn, b: &mut AttnBufs, cache: &mut LayerKv) -> Result<bool> {
        let Some(Heads { hd, nh, nkv, cap }) = heads(a, b, cache) else { return Ok(false) };
        let (Ok(dq), Ok(dk), Ok(dv)) = (Dev::of(a.wq, "qkv"), Dev::of(a.wk, "qkv"), Dev::of(a.wv, "qkv")) else {
            return Ok(false);
        };
        let same = |x: &Dev, y: &Dev| x.fmt == y.fmt && x.gs == y.gs && x.sdt == y.sdt && x.k == y.k;
        // weights the tensor-core matmul serves take the graph path (one row as many)
        if [&dq, &dk, &dv].iter().any(|d| self.qmm_serves(d)) {
            return Ok(false);
        }
        if !(same(&dq, &dk) && same(&dq, &dv) && dq.experts == 1 && dk.experts == 1 && dv.experts == 1)
            || h.numel() != dq.k
            || h.dtype() != DType::F32
            || dq.n != nh * hd
            || dk.n != nkv * hd
            || dv.n != nkv * hd
        {
            return Ok(false);
        }
        let x = Self::ptr(h, "qkv")?;
        let (pq, pk) = (self.plan_gemv(&dq, x, 1, 1)?, self.plan_gemv(&dk, x, 1, 1)?);
        if !(pq.vector && pk.vector) || pq.kw != pk.kw || pq.smem != pk.smem || pq.smem < 8 * hd * 4 {
            return Ok(false);
        }
        // a block completes at most 256 heads (its list in shared memory)
        if rows_per_block(&pq).max(rows_per_block(&pk)) / hd + 2 > 256 || nh + nkv > COUNTERS {
            return Ok(false);
        }
        let name = QKV[self.kernel_fmt(&dq)];
        let bf16 = cache.k.dtype() == DType::BF16;
        let blocks = pq.blocks + 2 * pk.blocks;
        let args = [
            Arg::P(dq.w),
            Arg::P(dq.sc),
            Arg::P(dq.bi),
            Arg::P(dk.w),
            Arg::P(dk.sc),
            Arg::P(dk.bi),
            Arg::P(dv.w),
            Arg::P(dv.sc),
            Arg::P(dv.bi),
            Arg::P(x),
            Arg::I(dq.k as i32),
            Arg::I(dq.gs.max(1) as i32),
            Arg::I(dq.sdt),
            Arg::I(pq.kw as i32),
            Arg::I(pq.smem as i32),
            Arg::I(dq.n as i32),
            Arg::I(dk.n as i32),
            Arg::I(pq.blocks as i32),
            Arg::I(pk.blocks as i32),
            Arg::I(pq.ks as i32),
            Arg::I(pk.ks as i32),
            Arg::I(pq.gw as i32),
            Arg::I(pk.gw as i32),
            Arg::P(Self::ptr(b.q_raw, "qkv")?),
            Arg::P(Self::ptr(b.k_raw, "qkv")?),
            Arg::P(Self::ptr(b.q, "qkv")?),
            Arg::P(Self::ptr(&cache.k, "qkv")?),
            Arg::P(Self::ptr(&cache.v, "qkv")?),
            Arg::I(bf16 as i32),
            Arg::I(cap as i32),
            Arg::P(norm_ptr(a.q_norm, hd, "qkv")?),
            Arg::P(norm_ptr(a.k_norm, hd, "qkv")?),
            Arg::F(a.eps),
            Arg::P(Self::ptr(a.positions, "qkv")?),
            Arg::P(Self::ptr(a.inv_freq, "qkv")?),
            Arg::I(style_tag(a.style)),
            Arg::I(hd as i32),
            Arg::P(self.counters()?),
        ];
        self.launch(FILE, name, ((blocks as u32, 1, 1), (THREADS, 1, 1), pq.smem as u32), &args)?;
        Ok(true)
    }

    /// Site `rope_kv_append`: norms, RoPE and the KV append of one token in
    /// one launch; the graph path where the kernel does not apply.
    pub(crate) fn rope_kv_append_impl(&self, a: &AttnIn, b: &mut AttnBufs, cache: &mut LayerKv) -> Result<()> {
        match heads(a, b, cache) {
            Some(h) => self.launch_rope_kv_append(a, b, cache, &h, 1),
            None => norm_rope_append_graph(self, a, b, cache, true),
        }
    }

    /// Site `dflash_attn`: a DFlash draft block's attention. The three
    /// projections, then norms, RoPE and the KV append of every block row in
    /// one launch, then attention of all rows in one pass over the keys;
    /// the graph path ([`dflash_attn_graph`]) where the site is off.
    pub(crate) fn dflash_attn_impl(&self, h: &Tensor, a: &AttnIn, b: &mut AttnBufs, c: &mut DraftAttn) -> Result<()> {
        if !crate::backend::Backend::fused(self, crate::fusion::Site::DflashAttn) {
            return dflash_attn_graph(self, h, a, b, c);
        }
        let be: &dyn crate::backend::Backend = self;
        be.matmul(h, a.wq, b.q_raw)?;
        be.matmul(h, a.wk, b.k_raw)?;
        be.matmul(h, a.wv, b.v)?;
        match heads_rows(a, b, c.cache) {
            Some((hs, rows)) => self.launch_rope_kv_append(a, b, c.cache, &hs, rows)?,
            None => norm_rope_append_graph(self, a, b, c.cache, true)?,
        }
        self.attention_with(b.q, c.cache, c.limits, c.scale, c.out, true, None)
    }

    fn launch_rope_kv_append(
        &self,
        a: &AttnIn,
        b: &mut AttnBufs,
        cache: &mut LayerKv,
        hs: &Heads,
        rows: usize,
    ) -> Result<()> {
        let Heads { hd, nh, nkv, cap } = *hs;
        let bf16 = cache.k.dtype() == DType::BF16;
        let args = [
            Arg::P(Self::ptr(b.q_raw, "rope_kv_append")?),
            Arg::P(Self::ptr(b.k_raw, "rope_kv_append")?),
            Arg::P(Self::ptr(b.v, "rope_kv_append")?),
            Arg::P(norm_ptr(a.q_norm, hd, "rope_kv_append")?),
            Arg::P(norm_ptr(a.k_norm, hd, "rope_kv_append")?),
            Arg::F(a.eps),
            Arg::P(Self::ptr(a.positions, "rope_kv_append")?),
            Arg::P(Self::ptr(a.inv_freq, "rope_kv_append")?),
            Arg::I(style_tag(a.style)),
            Arg::I(hd as i32),
            Arg::I(nh as i32),
            Arg::I(nkv as i32),
            Arg::I(cap as i32),
            Arg::P(Self::ptr(b.q, "rope_kv_append")?),
            Arg::P(Self::ptr(&cache.k, "rope_kv_append")?),
            Arg::P(Self::ptr(&cache.v, "rope_kv_append")?),
            Arg::I(bf16 as i32),
        ];
        let blocks = (nh + 2 * nkv).div_ceil(8) as u32;
        self.launch(FILE, "rope_kv_append", ((blocks, rows as u32, 1), (THREADS, 1, 1), 0), &args)
    }

    /// Site `moe`: two launches (gate/up + SwiGLU; down x router weight,
    /// summed); the graph path where the kernels do not apply.
    pub(crate) fn moe_experts_impl(&self, h: &Tensor, e: &MoeIn, b: &mut MoeBufs, out: &mut Tensor) -> Result<()> {
        if !self.moe_fused(h, e, b, out)? {
            return moe_experts_graph(self, h, e, b, out);
        }
        Ok(())
    }

    fn moe_fused(&self, h: &Tensor, e: &MoeIn, b: &mut MoeBufs, out: &mut Tensor) -> Result<bool> {
        let ids = e.ids.shape();
        if ids.len() != 2 || ids[0] != 1 || e.ids.dtype() != DType::I32 || e.weights.numel() != ids[1] {
            return Ok(false);
        }
        let slots = ids[1];
        let (Ok(dg), Ok(du), Ok(dd)) = (Dev::of(e.gate, "moe"), Dev::of(e.up, "moe"), Dev::of(e.down, "moe")) else {
            return Ok(false);
        };
        // expert weights the grouped tensor-core kernels serve take the graph path
        if [&dg, &du, &dd].iter().any(|d| self.qmm_serves_experts(d, 1)) {
            return Ok(false);
        }
        let (d, ff) = (dg.k, dg.n);
        let same = dg.fmt == du.fmt && dg.gs == du.gs && dg.sdt == du.sdt && (du.n, du.k) == (ff, d);
        if !same
            || dg.experts != du.experts
            || (dd.n, dd.k) != (d, ff)
            || ff > moe_max_dff()
            || slots == 0
            || h.numel() != d
            || out.numel() != d
            || b.gate.numel() != slots * ff
            || b.up.numel() != slots * ff
            || b.act.numel() != slots * ff
            || b.y.numel() != slots * d
            || e.weights.dtype() != DType::F32
        {
            return Ok(false);
        }
        let x = Self::ptr(h, "moe")?;
        let act = Self::ptr(b.act, "moe")?;
        let (pg, pd) = (self.plan_gemv(&dg, x, 1, slots)?, self.plan_gemv(&dd, act, 1, slots)?);
        if !(pg.vector && pd.vector) || pg.gy != slots || pd.gy != slots {
            return Ok(false);
        }
        if slots * pg.blocks > COUNTERS || pd.blocks > COUNTERS {
            return Ok(false);
        }
        let ids = Self::ptr(e.ids, "moe")?;
        let (g, u) = (Self::ptr(b.gate, "moe")?, Self::ptr(b.up, "moe")?);
        self.launch_gateup(&dg, &du, &pg, x, ids, slots, [g, u, act])?;
        let cnt = self.counters()?;
        let name = MOE_DOWN[self.kernel_fmt(&dd)];
        let tail = [Self::ptr(e.weights, "moe")?, Self::ptr(b.y, "moe")?, Self::ptr(out, "moe")?];
        let (args, n) = join_args([Arg::P(dd.w)], moe_args(&dd, &pd, act, ids, slots, cnt), tail.map(Arg::P));
        let dims = ((pd.blocks as u32, slots as u32, 1), (THREADS, 1, 1), pd.smem as u32);
        self.launch(FILE, name, dims, &args[..n])?;
        Ok(true)
    }

    /// Gate and up of `slots` (expert, input) pairs and SwiGLU in one launch
    /// (`fused_moe_gateup_<fmt>`): `out` = [gate scratch, up scratch, act].
    #[allow(clippy::too_many_arguments)]
    fn launch_gateup(&self, dg: &Dev, du: &Dev, p: &Plan, x: u64, ids: u64, slots: usize, out: [u64; 3]) -> Result<()> {
        let name = MOE_GATEUP[self.kernel_fmt(dg)];
        let head = [Arg::P(dg.w), Arg::P(du.w), Arg::P(du.sc), Arg::P(du.bi)];
        let (args, n) = join_args(head, moe_args(dg, p, x, ids, slots, self.counters()?), out.map(Arg::P));
        let dims = (((2 * p.blocks) as u32, slots as u32, 1), (THREADS, 1, 1), p.smem as u32);
        self.launch(FILE, name, dims, &args[..n])
    }

    /// Site `swiglu`: a dense MLP's gate and up projections and SwiGLU of one
    /// token in one launch; the graph path where the kernel does not apply.
    pub(crate) fn swiglu_impl(&self, h: &Tensor, gate: &Weight, up: &Weight, b: &mut SwigluBufs) -> Result<()> {
        if !self.swiglu_fused(h, gate, up, b)? {
            return swiglu_graph(self, h, gate, up, b);
        }
        Ok(())
    }

    fn swiglu_fused(&self, h: &Tensor, gate: &Weight, up: &Weight, b: &mut SwigluBufs) -> Result<bool> {
        let (Ok(dg), Ok(du)) = (Dev::of(gate, "swiglu"), Dev::of(up, "swiglu")) else { return Ok(false) };
        let (ff, d) = (dg.n, dg.k);
        // weights the tensor-core matmul serves take the graph path (one row as many)
        if self.qmm_serves(&dg) || self.qmm_serves(&du) {
            return Ok(false);
        }
        let same = dg.fmt == du.fmt && dg.gs == du.gs && dg.sdt == du.sdt && (du.n, du.k) == (ff, d);
        if !same
            || dg.experts != 1
            || du.experts != 1
            || h.numel() != d
            || h.dtype() != DType::F32
            || b.gate.numel() != ff
            || b.up.numel() != ff
            || b.act.numel() != ff
        {
            return Ok(false);
        }
        let x = Self::ptr(h, "swiglu")?;
        let p = self.plan_gemv(&dg, x, 1, 1)?;
        if !p.vector || p.blocks > COUNTERS {
            return Ok(false);
        }
        let out = [Self::ptr(b.gate, "swiglu")?, Self::ptr(b.up, "swiglu")?, Self::ptr(b.act, "swiglu")?];
        self.launch_gateup(&dg, &du, &p, x, 0, 1, out)?;
        Ok(true)
    }
}

/// `head`, then the shared MoE arguments, then `tail`, without allocating
/// (these launches are on the decode path).
/// Returns the buffer and how many of its arguments are used.
fn join_args<const H: usize, const T: usize>(head: [Arg; H], mid: [Arg; 18], tail: [Arg; T]) -> ([Arg; 32], usize) {
    let mut a = [Arg::I(0); 32];
    a[..H].copy_from_slice(&head);
    a[H..H + 18].copy_from_slice(&mid);
    a[H + 18..H + 18 + T].copy_from_slice(&tail);
    (a, H + 18 + T)
}

/// The arguments the MoE kernels share (`MOE_W` in fused.cu).
fn moe_args(d: &Dev, p: &Plan, x: u64, ids: u64, slots: usize, cnt: u64) -> [Arg; 18] {
    [
        Arg::P(d.sc),
        Arg::P(d.bi),
        Arg::P(x),
        Arg::P(ids),
        Arg::I(d.n as i32),
        Arg::I(d.k as i32),
        Arg::I(d.gs.max(1) as i32),
        Arg::I(d.sdt),
        Arg::I(slots as i32),
        Arg::I(d.experts as i32),
        Arg::L(d.w_estride()),
        Arg::L(d.sb_estride()),
        Arg::I(p.ks as i32),
        Arg::I(p.kw as i32),
        Arg::I(p.gw as i32),
        Arg::I(p.smem as i32),
        Arg::I(p.blocks as i32),
        Arg::P(cnt),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The no-allocation argument buffer holds exactly head, shared, tail, in order.
    #[test]
    fn join_args_concatenates_in_order() {
        let mid: [Arg; 18] = std::array::from_fn(|i| Arg::I(10 + i as i32));
        let (a, n) = join_args([Arg::P(1), Arg::P(2)], mid, [Arg::L(3)]);
        assert_eq!(n, 21);
        let want: Vec<Arg> = [Arg::P(1), Arg::P(2)].into_iter().chain(mid).chain([Arg::L(3)]).collect();
        assert_eq!(format!("{:?}", &a[..n]), format!("{want:?}"));
    }
}
