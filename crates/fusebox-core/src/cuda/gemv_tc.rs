//! The int_dot GEMV's products for 5 to 32 input rows on the tensor cores
//! (kernels: `gemv_tc.cu`): speculative verify passes and short prompts over
//! 4-bit affine weights, each row bitwise what the one-row decode GEMV
//! computes for it (the kernel file says how).
//!
//! On by default while the `int_dot` site is on (`FUSEBOX_GEMV_TC=0` or
//! [`CudaBackend::set_gemv_tc`] turns it off): launches of up to 16 or 8 rows
//! ([`next_launch`]), the rest (1 to 4 rows) through the GEMV's own kernels,
//! which win there. Measured in
//! docs/benchmark_results/gemv-tc-h100-2026-12-07.md.

use std::sync::OnceLock;

use anyhow::{ensure, Result};

use super::gemv::Dev;
use super::ops::grid_1d;
use super::{Arg, CudaBackend};

const FILE: &str = "gemv_tc.cu";
/// Scratch slots: the x rows' B fragments and their per-unit (scale, sum).
const XQ_SLOT: usize = 14;
const XS_SLOT: usize = 15;
/// The most input rows one launch takes (two tiles of 8).
const TC_ROWS: usize = 16;
/// The fewest rows worth a launch (fewer run the GEMV's 1-, 2- and 4-row kernels).
const TC_MIN_ROWS: usize = 5;
/// Weight rows a block owns, in tiles of 16 (`NT` in the kernel), for `mx`
/// tiles of 8 input rows: 16 for up to 8 rows, 32 for more (H100, 4096 x 4096
/// at 8 rows: 19.2 us against 25.4; at 16 rows: 33.6 against 30.0; the record
/// has every shape). `FUSEBOX_GEMV_TC_NT=1|2` fixes it (tuning).
fn tiles(mx: usize) -> usize {
    static NT: OnceLock<Option<usize>> = OnceLock::new();
    let forced = *NT.get_or_init(|| {
        std::env::var("FUSEBOX_GEMV_TC_NT").ok().and_then(|v| v.parse().ok()).filter(|&t| t == 1 || t == 2)
    });
    forced.unwrap_or(if mx == 1 { 1 } else { 2 })
}

/// Rows the next `gemv_tc` launch takes with `left` rows to go: up to 16
/// while 12 or more are left, up to 8 while [`TC_MIN_ROWS`] or more are;
/// `None` leaves the rest to the GEMV.
fn next_launch(left: usize) -> Option<usize> {
    match left {
        l if l >= 12 => Some(l.min(TC_ROWS)),
        l if l >= TC_MIN_ROWS => Some(l.min(8)),
        _ => None,
    }
}

impl CudaBackend {
    /// Whether `m` rows of `d` at `x` go through [`CudaBackend::gemv_tc_rows`]:
    /// the switch is on ([`CudaBackend::set_gemv_tc`]), [`TC_MIN_ROWS`] or more rows, the int_dot 4-bit kernel (format 10)
    /// would compute one row, the device has int8 MMAs (sm_80+), and the x
    /// rows are 16-byte aligned (the one-row GEMV's vector plan).
    pub(super) fn gemv_tc_serves(&self, d: &Dev, x: u64, m: usize) -> bool {
        self.gemv_tc()
            && m >= TC_MIN_ROWS
            && self.kernel_fmt(d) == 10
            && d.experts == 1
            && self.info.compute_capability.0 >= 8
            && x.is_multiple_of(16)
            && d.k.is_multiple_of(32)
    }

    /// `out[r] = x[r] @ w^T` for the leading rows of `m`, each row as the
    /// one-row GEMV computes it (its plan's k split and x window): launches of
    /// up to 16 rows while 12 or more are left, of up to 8 while
    /// [`TC_MIN_ROWS`] or more are left (H100, Qwen3-8B 4-bit: a launch costs
    /// about the same for 2 to 8 rows, 2.8x a one-row GEMV's decode step in
    /// the verify curve, and 4.8x for 9 to 16, where the GEMV's own kernels
    /// take 1.5x for 2 rows, 2.3x for 4, 5.4x for 8 and 10.6x for 16). Returns
    /// how many rows it took; the caller runs the rest (fewer than
    /// [`TC_MIN_ROWS`]) through the GEMV.
    pub(super) fn gemv_tc_rows(&self, d: &Dev, x: u64, out: u64, m: usize) -> Result<usize> {
        let plan = self.plan_gemv(d, x, 1, 1)?;
        ensure!(plan.vector, "cuda gemv_tc: the one-row plan is not the vector kernel");
        let (n, k) = (d.n, d.k);
        let nunits = k / 32;
        let mut r = 0;
        while let Some(rows) = next_launch(m - r) {
            let mx = rows.div_ceil(8);
            let xq = self.scratch(XQ_SLOT, nunits * 2 * 32 * 16)?;
            let xs = self.scratch(XS_SLOT, nunits * 16 * 8)?;
            let xr = x + (r * k * 4) as u64;
            self.launch(
                FILE,
                "gemv_tc_x",
                grid_1d(nunits * 8 * mx, self.sm_count),
                &[Arg::P(xr), Arg::I(rows as i32), Arg::I(k as i32), Arg::I(mx as i32), Arg::P(xq), Arg::P(xs)],
            )?;
            let nt = tiles(mx);
            let name = match (mx, nt) {
                (1, 1) => "gemv_tc_q4_x8n1",
                (_, 1) => "gemv_tc_q4_x16n1",
                (1, _) => "gemv_tc_q4_x8",
                _ => "gemv_tc_q4_x16",
            };
            let block_rows = 16 * nt;
            let smem = 32 * block_rows * 8 * mx * 4;
            self.launch(
                FILE,
                name,
                ((n.div_ceil(block_rows) as u32, 1, 1), (256, 1, 1), smem as u32),
                &[
                    Arg::P(d.w),
                    Arg::P(d.sc),
                    Arg::P(d.bi),
                    Arg::P(xq),
                    Arg::P(xs),
                    Arg::P(out + (r * n * 4) as u64),
                    Arg::I(n as i32),
                    Arg::I(k as i32),
                    Arg::I(rows as i32),
                    Arg::I(d.gs as i32),
                    Arg::I(d.sdt),
                    Arg::I(plan.ks as i32),
                    Arg::I(plan.kw as i32),
                ],
            )?;
            r += rows;
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count splits into launches of 5 to 16 rows and a GEMV
    /// remainder of at most 4, as the verify curve says is cheapest.
    #[test]
    fn row_counts_split_into_launches_and_a_short_remainder() {
        let split = |m: usize| {
            let (mut left, mut launches) = (m, vec![]);
            while let Some(rows) = next_launch(left) {
                launches.push(rows);
                left -= rows;
            }
            (launches, left)
        };
        assert_eq!(split(4), (vec![], 4));
        assert_eq!(split(5), (vec![5], 0));
        assert_eq!(split(9), (vec![8], 1));
        assert_eq!(split(11), (vec![8], 3));
        assert_eq!(split(12), (vec![12], 0));
        assert_eq!(split(17), (vec![16], 1));
        assert_eq!(split(21), (vec![16, 5], 0));
        assert_eq!(split(32), (vec![16, 16], 0));
        for m in 1..=64 {
            let (launches, left) = split(m);
            assert_eq!(launches.iter().sum::<usize>() + left, m);
            assert!(left < TC_MIN_ROWS && launches.iter().all(|&r| (TC_MIN_ROWS..=TC_ROWS).contains(&r)));
        }
    }
}
