//! Site `tc_matmul`: a 4-bit affine weight's matmul for 1 to [`QMM_MAX_ROWS`]
//! input rows on the tensor cores (kernels/qmm.cu). `qmm_prep` splits x into
//! two bf16 parts (in the kernel's fragment order) with each group's sum, then one
//! `qmm4_g{GS}_n{NT}` launch reads the weight once for all rows.
//!
//! The k split is planned from the weight's shape and the device alone, never
//! from the row count, so a row's product is bitwise the same at every row
//! count (tests/cuda_qmm.rs checks it).

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
/// The affine 4-bit format in gemv.rs' table.
const FMT_Q4: usize = 5;

/// `qmm4_g{32,64,128}_n{1,2,4,8}`.
const KERNELS: [[&str; 4]; 3] = [
    ["qmm4_g32_n1", "qmm4_g32_n2", "qmm4_g32_n4", "qmm4_g32_n8"],
    ["qmm4_g64_n1", "qmm4_g64_n2", "qmm4_g64_n4", "qmm4_g64_n8"],
    ["qmm4_g128_n1", "qmm4_g128_n2", "qmm4_g128_n4", "qmm4_g128_n8"],
];

/// Whether the kernel covers a weight of this shape (whatever the switch says).
pub(super) fn covers(d: &Dev, compute_major: i32) -> bool {
    compute_major >= 8
        && d.fmt == FMT_Q4
        && d.experts == 1
        && matches!(d.gs, 32 | 64 | 128)
        && d.n % 16 == 0
        && d.k % d.gs.max(64) == 0
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

    /// `out[m, n] = x[m, k] @ w^T` for `1 <= m <= QMM_MAX_ROWS`.
    pub(super) fn qmm(&self, d: &Dev, x: u64, out: u64, m: usize) -> Result<()> {
        ensure!((1..=QMM_MAX_ROWS).contains(&m), "cuda qmm: {m} input rows (1 to {QMM_MAX_ROWS})");
        ensure!(x % 16 == 0, "cuda qmm: input rows at {x:#x} are not 16-byte aligned");
        let (n, k, gs) = (d.n, d.k, d.gs);
        let nt = m.div_ceil(4).next_power_of_two();
        let mp = nt * 4;
        // sized for the most rows and the smallest groups, so a captured graph's
        // buffers never move when another row count comes
        let xb = self.scratch(XB_SLOT, QMM_MAX_ROWS * 2 * k * 2)?;
        let xs = self.scratch(XS_SLOT, QMM_MAX_ROWS * (k / 32) * 4)?;
        let threads = mp * k / 8;
        let blocks = threads.div_ceil(THREADS as usize).min(self.sm_count as usize * 8);
        self.launch(
            FILE,
            "qmm_prep",
            ((blocks as u32, 1, 1), (THREADS, 1, 1), 0),
            &[
                Arg::P(x),
                Arg::P(xb),
                Arg::P(xs),
                Arg::I(m as i32),
                Arg::I(mp as i32),
                Arg::I(k as i32),
                Arg::I(gs as i32),
            ],
        )?;
        let ksw = k_split(d, self.sm_count as usize);
        let tiles = n / 16;
        let blocks = tiles.div_ceil(WARPS / ksw);
        let smem = if ksw > 1 { WARPS * nt * 2 * 32 * 4 } else { 0 };
        let g = match gs {
            32 => 0,
            64 => 1,
            _ => 2,
        };
        let name = KERNELS[g][nt.trailing_zeros() as usize];
        self.launch(
            FILE,
            name,
            ((blocks as u32, 1, 1), (THREADS, 1, 1), smem as u32),
            &[
                Arg::P(d.w),
                Arg::P(d.sc),
                Arg::P(d.bi),
                Arg::P(xb),
                Arg::P(xs),
                Arg::P(out),
                Arg::I(n as i32),
                Arg::I(k as i32),
                Arg::I(m as i32),
                Arg::I(d.sdt),
                Arg::I(ksw as i32),
            ],
        )
    }
}
