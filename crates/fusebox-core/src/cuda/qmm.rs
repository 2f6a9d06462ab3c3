//! Site `tc_matmul`: a 4-bit affine weight's matmul for 1 to [`QMM_MAX_ROWS`]
//! input rows on the tensor cores (kernels/qmm.cu). `qmm_prep` splits x into
//! two bf16 parts (in the kernel's fragment order) with each group's sum, then one
//! `qmm4_g{GS}_n{NT}` launch reads the weight once for all rows. From 17
//! rows on (`FUSEBOX_QMM_STAGED_ROWS`), `qmms4_*` stages x once per block of
//! 8 row tiles instead (every warp of `qmm4_*` reads its x tiles from L2) and
//! runs the same k slices as blocks, added by `qmm_ksum`.
//!
//! The k split is planned from the weight's shape and the device alone, never
//! from the row count, so a row's product is bitwise the same at every row
//! count (tests/cuda_qmm.rs checks it).
//!
//! MoE expert matmuls past `ROW_EXACT_MAX` rows (prefill) use the same kernel
//! grouped by expert whatever the site says: `qmm_group` sorts the (row,
//! slot) pairs by expert and cuts them into chunks of one expert's pairs,
//! `qmm_prep` gathers the chunks' input rows (hi and lo parts: x in bf16
//! alone put the tiny 4-bit MoE fixture at relative RMS 3.6e-3 against the
//! CPU, over the 2e-3 bar), and one `qmme4_g{GS}_n{NT}` launch runs a block
//! row per chunk of up to 32 pairs. By default the blocks stage each k step
//! of the chunk's x in shared memory for their 8 row tiles (`qmmx4_*`, no k
//! split) instead of every warp reading it from L2, where x is 16 times the
//! weight's bytes (`FUSEBOX_GROUPED_STAGED=0` runs the unstaged `qmme4_*`).

use anyhow::{ensure, Result};

use super::gemv::Dev;
use super::{Arg, CudaBackend};
use crate::fusion::Site;

const FILE: &str = "qmm.cu";
/// The most input rows one launch takes (8 column tiles of 4 rows' hi and lo parts).
pub const QMM_MAX_ROWS: usize = 32;
const THREADS: u32 = 256;
const WARPS: usize = 8;
/// Scratch slots: x in bf16, and the group sums.
const XB_SLOT: usize = 7;
const XS_SLOT: usize = 8;
/// The k slices' partial sums of a staged dense launch (`qmms4_*`, ksw > 1).
const PART_SLOT: usize = 13;
/// The affine 4-bit format in gemv.rs' table.
const FMT_Q4: usize = 5;

/// Grouped (MoE) scratch slots: x in bf16, group sums, the pairs sorted by
/// expert, the chunk table.
const GXB_SLOT: usize = 9;
const GXS_SLOT: usize = 10;
const ORDER_SLOT: usize = 11;
const TABLE_SLOT: usize = 12;
/// The most experts `qmm_group` sorts (`QMM_GROUP_MAX_EXPERTS`).
const MAX_EXPERTS: usize = 1024;
/// Input rows of one grouped chunk (one expert's pairs, 8 column tiles).
const CHUNK_ROWS: usize = 32;

/// A kernel family's names by group size (32, 64, 128) and column tiles (1, 2, 4, 8).
macro_rules! names {
    ($p:literal) => {
        [
            [concat!($p, "_g32_n1"), concat!($p, "_g32_n2"), concat!($p, "_g32_n4"), concat!($p, "_g32_n8")],
            [concat!($p, "_g64_n1"), concat!($p, "_g64_n2"), concat!($p, "_g64_n4"), concat!($p, "_g64_n8")],
            [concat!($p, "_g128_n1"), concat!($p, "_g128_n2"), concat!($p, "_g128_n4"), concat!($p, "_g128_n8")],
        ]
    };
}
/// The dense kernels.
const KERNELS: [[&str; 4]; 3] = names!("qmm4");
/// The dense kernels with x staged in shared memory, k slices as blocks.
const STAGED: [[&str; 4]; 3] = names!("qmms4");
/// The grouped kernels: x read by every warp, k split from the shape.
const GROUPED: [[&str; 4]; 3] = names!("qmme4");
/// The grouped kernels with x staged in shared memory (no k split).
const GROUPED_STAGED: [[&str; 4]; 3] = names!("qmmx4");

/// `FUSEBOX_GROUPED_STAGED` (default on: Qwen3-30B-A3B pp512 6,686 -> 8,357
/// tok/s on an H100; `0` restores `qmme4_*`), read once.
fn grouped_staged() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FUSEBOX_GROUPED_STAGED").map(|v| v != "0").unwrap_or(true))
}

/// `FUSEBOX_QMM_STAGED_ROWS` (default 17): the dense product of this many
/// input rows or more takes `qmms4_*` (x staged once per block of 8 row
/// tiles, the same k slices as blocks) instead of `qmm4_*`, whose every warp
/// reads its x tiles from L2. Both compute a row bitwise alike. On an H100
/// (4096 x 12288) staging took 32 rows from 80.9 to 49.4 us and 8 rows from
/// 25.3 to 24.0, but 16 rows from 35.8 to 37.6 and one row from 19.3 to 23.2
/// (docs/benchmark_results/qmm-lean-h100-2026-12-07.md). Read once.
fn staged_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| std::env::var("FUSEBOX_QMM_STAGED_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(17))
}

/// `FUSEBOX_GROUPED_MOE` (default on), read once.
fn grouped_moe() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FUSEBOX_GROUPED_MOE").map(|v| v != "0").unwrap_or(true))
}

/// One `qmm_prep` launch: `m` rows of x (row r = `order[r] / x_div` when
/// `order` is not null) into `xb` and `xs` padded to `mp` rows.
struct Prep {
    x: u64,
    xb: u64,
    xs: u64,
    m: usize,
    mp: usize,
    k: usize,
    gs: usize,
    order: u64,
    x_div: usize,
}

fn group_index(gs: usize) -> usize {
    match gs {
        32 => 0,
        64 => 1,
        _ => 2,
    }
}

/// Whether the kernel covers a weight of this shape (whatever the switch says).
pub(super) fn covers(d: &Dev, compute_major: i32) -> bool {
    d.experts == 1 && covers_matrix(d, compute_major)
}

/// Whether the grouped kernels cover an expert weight of this shape.
pub(super) fn covers_experts(d: &Dev, compute_major: i32) -> bool {
    d.experts <= MAX_EXPERTS && covers_matrix(d, compute_major)
}

fn covers_matrix(d: &Dev, compute_major: i32) -> bool {
    compute_major >= 8
        && d.fmt == FMT_Q4
        && matches!(d.gs, 32 | 64 | 128)
        && d.n.is_multiple_of(16)
        && d.k.is_multiple_of(d.gs.max(64))
}

/// Dynamic shared memory of a grouped launch: `QMM_XD` (4) staged x steps of
/// `8 nt` rows, `QMM_XROWW` (36) words each (`QmmStage` in qmm.cu).
fn staged_x_bytes(nt: usize) -> usize {
    4 * 8 * nt * 36 * 4
}

/// Dynamic shared memory where `ksw` warps split a row tile's k and meet in
/// shared memory (`red` in qmm.cu: 8 warps x `2 nt` values x 32 lanes).
fn ksplit_bytes(nt: usize, ksw: usize) -> usize {
    if ksw > 1 {
        WARPS * nt * 2 * 32 * 4
    } else {
        0
    }
}

/// Warps that split a row tile's k: as few as fill the device (about 16 warps
/// an SM), at most 8 and no more than the k units. From the shape alone.
fn k_split(d: &Dev, sms: usize) -> usize {
    let tiles = d.n / 16;
    let units = d.k / d.gs.max(64);
    let mut ksw = 1;
    while ksw < WARPS && tiles * ksw < sms * 16 && units >= ksw * 2 * 4 {
        ksw *= 2;
    }
    ksw
}

impl CudaBackend {
    /// Whether `matmul` of `d` takes the tensor-core kernel: the site is on
    /// and the kernel covers the weight. The fused sites that embed a GEMV
    /// of such a weight step aside, so that one row and many compute alike.
    pub(super) fn qmm_serves(&self, d: &Dev) -> bool {
        crate::backend::Backend::fused(self, Site::TcMatmul) && covers(d, self.info.compute_capability.0)
    }

    /// Whether `expert_matmul` of `d` over `m` input rows takes the grouped
    /// kernels: always past `ROW_EXACT_MAX` rows (prefill: each expert's
    /// weight read once per 32 of its pairs instead of once per pair), and
    /// at every row count while site `tc_matmul` is on (one row as many).
    /// `FUSEBOX_GROUPED_MOE=0` keeps the per-pair GEMVs past `ROW_EXACT_MAX`
    /// rows (A/B runs).
    pub(super) fn qmm_serves_experts(&self, d: &Dev, m: usize) -> bool {
        let tc = crate::backend::Backend::fused(self, Site::TcMatmul);
        ((grouped_moe() && m > crate::backend::ROW_EXACT_MAX) || tc)
            && covers_experts(d, self.info.compute_capability.0)
    }

    /// `qmm_prep`: x (rows gathered through `order` when it is not null) into
    /// the kernels' bf16 fragment order and group sums.
    fn qmm_prep(&self, p: Prep) -> Result<()> {
        let blocks = (p.mp * p.k / 8).div_ceil(THREADS as usize).min(self.sm_count as usize * 8);
        self.launch(
            FILE,
            "qmm_prep",
            ((blocks as u32, 1, 1), (THREADS, 1, 1), 0),
            &[
                Arg::P(p.x),
                Arg::P(p.xb),
                Arg::P(p.xs),
                Arg::I(p.m as i32),
                Arg::I(p.mp as i32),
                Arg::I(p.k as i32),
                Arg::I(p.gs as i32),
                Arg::P(p.order),
                Arg::I(p.x_div as i32),
            ],
        )
    }

    /// `out[m, n] = x[m, k] @ w^T` for `1 <= m <= QMM_MAX_ROWS`.
    pub(super) fn qmm(&self, d: &Dev, x: u64, out: u64, m: usize) -> Result<()> {
        ensure!((1..=QMM_MAX_ROWS).contains(&m), "cuda qmm: {m} input rows (1 to {QMM_MAX_ROWS})");
        ensure!(x.is_multiple_of(16), "cuda qmm: input rows at {x:#x} are not 16-byte aligned");
        let (n, k, gs) = (d.n, d.k, d.gs);
        let nt = m.div_ceil(4).next_power_of_two();
        let mp = nt * 4;
        // sized for the most rows and the smallest groups, so a captured graph's
        // buffers never move when another row count comes
        let xb = self.scratch(XB_SLOT, QMM_MAX_ROWS * 2 * k * 2)?;
        let xs = self.scratch(XS_SLOT, QMM_MAX_ROWS * (k / 32) * 4)?;
        self.qmm_prep(Prep { x, xb, xs, m, mp, k, gs, order: 0, x_div: 1 })?;
        let sms = self.sm_count as usize;
        let ksw = k_split(d, sms);
        let tiles = n / 16;
        let gi = group_index(gs);
        let ti = nt.trailing_zeros() as usize;
        // staged (`qmms4_*`): one block per 8 row tiles and k slice (the slices of
        // `k_split`), x in shared memory; with several slices their partial sums
        // meet in `qmm_ksum`, in slice order. Else `qmm4_*`: the k slices are warps.
        let staged = m >= staged_rows();
        let (name, grid, smem, dst) = if staged {
            // k_split keeps ksw * n under 512 per SM; sized for that and the most rows,
            // so a captured graph's partials never move
            let dst = if ksw > 1 { self.scratch(PART_SLOT, QMM_MAX_ROWS * 512 * sms * 4)? } else { out };
            ensure!(
                ksw * n * m <= QMM_MAX_ROWS * 512 * sms,
                "cuda qmm: {ksw} k slices of {n} outputs overflow the partials"
            );
            (STAGED[gi][ti], (tiles.div_ceil(WARPS) as u32, ksw as u32, 1), staged_x_bytes(nt), dst)
        } else {
            (KERNELS[gi][ti], (tiles.div_ceil(WARPS / ksw) as u32, 1, 1), ksplit_bytes(nt, ksw), out)
        };
        self.launch(
            FILE,
            name,
            (grid, (THREADS, 1, 1), smem as u32),
            &[
                Arg::P(d.w),
                Arg::P(d.sc),
                Arg::P(d.bi),
                Arg::P(xb),
                Arg::P(xs),
                Arg::P(dst),
                Arg::I(n as i32),
                Arg::I(k as i32),
                Arg::I(m as i32),
                Arg::I(d.sdt),
                Arg::I(ksw as i32),
            ],
        )?;
        if staged && ksw > 1 {
            let total = m * n;
            let blocks = total.div_ceil(THREADS as usize).min(sms * 4);
            self.launch(
                FILE,
                "qmm_ksum",
                ((blocks as u32, 1, 1), (THREADS, 1, 1), 0),
                &[Arg::P(dst), Arg::P(out), Arg::I(ksw as i32), Arg::I(total as i32)],
            )?;
        }
        Ok(())
    }

    /// The expert products of `pairs = m * slots` (row, slot) pairs, grouped by
    /// expert (`ids` I32 [pairs]): `out[p, :] = w[ids[p]] @ x_p`, x_p row
    /// `p / x_div` of x (x_div = slots for a shared input, 1 for one input
    /// per pair). Each expert's weight is read once per 32 of its pairs.
    pub(super) fn qmm_experts(&self, d: &Dev, x: u64, out: u64, ids: u64, pairs: usize, x_div: usize) -> Result<()> {
        ensure!(x.is_multiple_of(16), "cuda qmm: input rows at {x:#x} are not 16-byte aligned");
        ensure!(pairs < (1 << 24), "cuda qmm: {pairs} expert pairs is too many for one launch");
        let (n, k, gs) = (d.n, d.k, d.gs);
        let chunks = pairs.div_ceil(CHUNK_ROWS) + d.experts.min(pairs);
        ensure!(chunks <= 65535, "cuda qmm: {pairs} expert pairs need {chunks} chunks (at most 65535)");
        let order = self.scratch(ORDER_SLOT, pairs * 4)?;
        let table = self.scratch(TABLE_SLOT, (1 + 4 * chunks) * 4)?;
        self.launch(
            FILE,
            "qmm_group",
            ((1, 1, 1), (1024, 1, 1), 0),
            &[
                Arg::P(ids),
                Arg::I(pairs as i32),
                Arg::I(d.experts as i32),
                Arg::P(order),
                Arg::P(table),
                Arg::P(out),
                Arg::I(n as i32),
            ],
        )?;
        // padded by one chunk of zero rows, which the last chunk's tiles read
        let mp = pairs + CHUNK_ROWS;
        let xb = self.scratch(GXB_SLOT, mp * 2 * k * 2)?;
        let xs = self.scratch(GXS_SLOT, mp * (k / 32) * 4)?;
        self.qmm_prep(Prep { x, xb, xs, m: pairs, mp, k, gs, order, x_div })?;
        // the tile width from the most pairs a chunk can hold, the k split from the
        // shape (staged: none, the block's 8 row tiles share each x step and the
        // chunks fill the GPU): a pair's product is the same at every pair count
        let nt = pairs.min(CHUNK_ROWS).div_ceil(4).next_power_of_two();
        let staged = grouped_staged();
        let ksw = if staged { 1 } else { k_split(d, self.sm_count as usize) };
        let blocks = (n / 16).div_ceil(WARPS / ksw);
        let smem = if staged { staged_x_bytes(nt) } else { ksplit_bytes(nt, ksw) };
        let names = if staged { &GROUPED_STAGED } else { &GROUPED };
        let name = names[group_index(gs)][nt.trailing_zeros() as usize];
        self.launch(
            FILE,
            name,
            ((blocks as u32, chunks as u32, 1), (THREADS, 1, 1), smem as u32),
            &[
                Arg::P(d.w),
                Arg::P(d.sc),
                Arg::P(d.bi),
                Arg::P(xb),
                Arg::P(xs),
                Arg::I(mp as i32),
                Arg::P(out),
                Arg::P(order),
                Arg::P(table),
                Arg::I(n as i32),
                Arg::I(k as i32),
                Arg::I(d.sdt),
                Arg::I(ksw as i32),
                Arg::L(d.w_estride() / 4),
                Arg::L(d.sb_estride()),
            ],
        )
    }
}
