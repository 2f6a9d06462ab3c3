//! KV-cache writes and attention (kernels: `attention.cu`).
//!
//! The cache is bf16 `[capacity, kv_heads, head_dim]`. Attention is one
//! kernel family for decode and prefill: a block takes `Q` query vectors
//! (the heads of one GQA group, and for prefill several rows) of one kv
//! head, streams the K/V tiles of its key range through shared memory with
//! an online softmax (f32), and either writes the output or, when the key
//! range is split over several blocks (flash-decoding), partials that
//! `attn_combine` merges. The grid comes from the shapes, the capacity and
//! the GPU's size only; the length is read by the kernels from `positions`,
//! so the ops are graph-capturable, and the only buffers they need
//! (partials, scratch slots 2 and 3) are sized from the capacity. Up to
//! `ROW_EXACT_MAX` rows are taken one row at a time, each with exactly the
//! blocks and splits of a one-row (decode) launch, so a speculative verify
//! pass gives every row the decode step's output bit for bit.
//!
//! Packed prefill blocks (64 query vectors) run on the tensor cores by
//! default (`attention_tc.cu`; `FUSEBOX_ATTN_TC=0` / `set_attn_tc` for the
//! scalar blocks): the same grid, splits and partials, so only the kernel name and its shared memory
//! change; decode and the row-by-row verify path never take them.

use std::sync::Mutex;

use anyhow::{ensure, Result};

use super::{Arg, CudaBackend};
use crate::backend::ROW_EXACT_MAX;
use crate::dtype::DType;
use crate::kv::LayerKv;
use crate::tensor::Tensor;

const FILE: &str = "attention.cu";
const FILE_TC: &str = "attention_tc.cu";
const THREADS: u32 = 128;
/// Rows the one-row (decode) call sizes scratch slot 2 for (see `attention_impl`).
const DECODE_ROWS: usize = 4;

/// Kernel names by padded head dim and queries per block.
const KERNELS: &[(usize, usize, &str)] = &[
    (8, 1, "attn_d8_q1"),
    (8, 2, "attn_d8_q2"),
    (8, 4, "attn_d8_q4"),
    (8, 8, "attn_d8_q8"),
    (8, 64, "attn_d8_q64"),
    (16, 1, "attn_d16_q1"),
    (16, 2, "attn_d16_q2"),
    (16, 4, "attn_d16_q4"),
    (16, 8, "attn_d16_q8"),
    (16, 64, "attn_d16_q64"),
    (32, 1, "attn_d32_q1"),
    (32, 2, "attn_d32_q2"),
    (32, 4, "attn_d32_q4"),
    (32, 8, "attn_d32_q8"),
    (32, 64, "attn_d32_q64"),
    (64, 1, "attn_d64_q1"),
    (64, 2, "attn_d64_q2"),
    (64, 4, "attn_d64_q4"),
    (64, 8, "attn_d64_q8"),
    (64, 64, "attn_d64_q64"),
    (128, 1, "attn_d128_q1"),
    (128, 2, "attn_d128_q2"),
    (128, 4, "attn_d128_q4"),
    (128, 8, "attn_d128_q8"),
    (128, 64, "attn_d128_q64"),
    (256, 1, "attn_d256_q1"),
    (256, 2, "attn_d256_q2"),
    (256, 4, "attn_d256_q4"),
    (256, 8, "attn_d256_q8"),
    (256, 32, "attn_d256_q32"),
];

/// Tensor-core prefill kernels (64 query vectors a block, 64-key tiles) by padded head dim.
/// The paged twins of the decode kernels (`Q <= 8`; rows one at a time).
const KERNELS_PG: &[(usize, usize, &str)] = &[
    (8, 1, "attn_d8_q1_pg"),
    (8, 2, "attn_d8_q2_pg"),
    (8, 4, "attn_d8_q4_pg"),
    (8, 8, "attn_d8_q8_pg"),
    (16, 1, "attn_d16_q1_pg"),
    (16, 2, "attn_d16_q2_pg"),
    (16, 4, "attn_d16_q4_pg"),
    (16, 8, "attn_d16_q8_pg"),
    (32, 1, "attn_d32_q1_pg"),
    (32, 2, "attn_d32_q2_pg"),
    (32, 4, "attn_d32_q4_pg"),
    (32, 8, "attn_d32_q8_pg"),
    (64, 1, "attn_d64_q1_pg"),
    (64, 2, "attn_d64_q2_pg"),
    (64, 4, "attn_d64_q4_pg"),
    (64, 8, "attn_d64_q8_pg"),
    (128, 1, "attn_d128_q1_pg"),
    (128, 2, "attn_d128_q2_pg"),
    (128, 4, "attn_d128_q4_pg"),
    (128, 8, "attn_d128_q8_pg"),
    (256, 1, "attn_d256_q1_pg"),
    (256, 2, "attn_d256_q2_pg"),
    (256, 4, "attn_d256_q4_pg"),
    (256, 8, "attn_d256_q8_pg"),
];
const KERNELS_TC: &[(usize, &str)] = &[(64, "attn_tc_d64"), (128, "attn_tc_d128")];
/// Query vectors per tensor-core block (the scalar prefill blocks' `q_max`, so grids and splits agree).
const TC_Q: usize = 64;

/// The block shape of tensor-core kernel `dp`, mirroring `TcCfg` in attention_tc.cu.
fn cfg_tc(dp: usize) -> Cfg {
    let tk = 64;
    Cfg { tk, smem: 2 * 2 * tk * (dp + 8) * 2 + TC_Q * 4 }
}

/// The tensor-core kernel for a launch, if it takes one: packed prefill blocks (`q = TC_Q`, not by row) of a
/// head dim it has, where `allowed` (switched on, sm_80+, q and out 8-byte aligned: it moves them as float2).
fn tc_kernel(dp: usize, q: usize, by_row: bool, allowed: bool) -> Option<&'static str> {
    if !allowed || by_row || q != TC_Q {
        return None;
    }
    KERNELS_TC.iter().find(|&&(a, _)| a == dp).map(|&(_, s)| s)
}

/// The block shape of kernel `(dp, q)`, mirroring `AttnCfg` in attention.cu.
struct Cfg {
    /// keys per tile
    tk: usize,
    /// dynamic shared memory in bytes
    smem: usize,
}

fn cfg(dp: usize, q: usize) -> Cfg {
    let nt = THREADS as usize;
    let dc = dp / 8;
    let tk = if q <= 8 { nt / dc.min(4) } else { 32 };
    let krow = if dp == 8 { 24 } else { dp + 8 };
    let qrow = dp + 4;
    let qp = if q.is_multiple_of(4) { q + 4 } else { q };
    let qpt = q.min(8);
    let qg = q / qpt;
    let ks = nt / (dc * qg);
    let kv_bytes = 2 * 2 * tk * krow * 2;
    let red_bytes = if q <= 8 { 4 * q * dp * 4 + 2 * 4 * q * 4 } else { ks * q * dp * 4 };
    let smem = kv_bytes.max(red_bytes) + q * qrow * 4 + tk * qp * 4 + 4 * q * 4;
    Cfg { tk, smem }
}

/// The largest query block for a padded head dim.
fn q_max(dp: usize) -> usize {
    if dp >= 256 {
        32
    } else {
        64
    }
}

/// Resident blocks per SM of each attention kernel, by (device, kernel).
static OCCUPANCY: Mutex<Vec<(usize, &str, usize)>> = Mutex::new(Vec::new());

impl CudaBackend {
    /// How many blocks of attention kernel `name` (with `smem` bytes of shared memory) fit on one SM at once,
    /// from the driver's occupancy calculator (asked once per kernel; 2 if it cannot answer).
    fn attn_blocks_per_sm(&self, file: &'static str, name: &'static str, smem: usize) -> usize {
        let ord = self.info.ordinal;
        if let Some(&(_, _, n)) = OCCUPANCY.lock().unwrap().iter().find(|e| e.0 == ord && e.1 == name) {
            return n;
        }
        let n = self
            .func(file, name)
            .ok()
            .and_then(|f| {
                super::allow_dynamic_smem(&f, name, smem).ok()?;
                f.occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None).ok()
            })
            .map(|n| n as usize)
            .filter(|&n| n > 0)
            .unwrap_or(2);
        OCCUPANCY.lock().unwrap().push((ord, name, n));
        n
    }

    pub(crate) fn kv_write_impl(&self, k: &Tensor, v: &Tensor, positions: &Tensor, cache: &mut LayerKv) -> Result<()> {
        let cs = cache.k.shape().to_vec();
        ensure!(
            cs.len() == 3 && cache.v.shape() == cs.as_slice(),
            "cuda kv_write: cache k {:?} and v {:?} must both be [capacity, kv_heads, head_dim]",
            cache.k.shape(),
            cache.v.shape()
        );
        check_cache_dtype(cache, "kv_write")?;
        ensure!(
            k.shape() == v.shape() && k.shape().len() == 3 && k.shape()[1..] == cs[1..],
            "cuda kv_write: keys {:?} / values {:?} do not match the cache {:?}",
            k.shape(),
            v.shape(),
            cs
        );
        ensure!(
            k.dtype() == DType::F32 && v.dtype() == DType::F32,
            "cuda kv_write: keys/values must be f32, got {} / {}",
            k.dtype(),
            v.dtype()
        );
        let m = k.shape()[0];
        ensure!(
            positions.dtype() == DType::I32 && positions.numel() >= m,
            "cuda kv_write: positions {:?} {} for {m} rows",
            positions.shape(),
            positions.dtype()
        );
        let (cap, row) = (cs[0], cs[1] * cs[2]);
        ensure!(cap <= i32::MAX as usize && row <= i32::MAX as usize, "cuda kv_write: cache {cs:?} too large");
        if m == 0 || row == 0 {
            return Ok(());
        }
        let (pk, pv, pp) = (Self::ptr(k, "kv_write")?, Self::ptr(v, "kv_write")?, Self::ptr(positions, "kv_write")?);
        let (ck, cv) = (Self::ptr(&cache.k, "kv_write")?, Self::ptr(&cache.v, "kv_write")?);
        if cache.k.dtype() == DType::F32 {
            let args =
                [Arg::P(pk), Arg::P(pv), Arg::P(pp), Arg::P(ck), Arg::P(cv), Arg::I(row as i32), Arg::I(cap as i32)];
            return self.launch(FILE, "kv_write_f32", ((m as u32, 2, 1), (256, 1, 1), 0), &args);
        }
        let vec4 = row % 4 == 0 && pk % 16 == 0 && pv % 16 == 0 && ck % 8 == 0 && cv % 8 == 0;
        let threads = if row >= 1024 { 256 } else { 128 };
        self.launch(
            FILE,
            "kv_write_bf16",
            ((m as u32, 2, 1), (threads, 1, 1), 0),
            &[
                Arg::P(pk),
                Arg::P(pv),
                Arg::P(pp),
                Arg::P(ck),
                Arg::P(cv),
                Arg::I(row as i32),
                Arg::I(cap as i32),
                Arg::I(vec4 as i32),
            ],
        )
    }

    pub(crate) fn attention_impl(
        &self,
        q: &Tensor,
        cache: &LayerKv,
        positions: &Tensor,
        scale: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        self.attention_with(q, cache, positions, scale, out, false, None)
    }

    /// [`Backend::paged_attention`](crate::Backend::paged_attention): the
    /// bf16 kernels with every row taken one at a time (a row's blocks are
    /// those of a one-row launch at its position, so a sequence's rows do
    /// not depend on the batch), each reading its sequence's keys through
    /// its block table. The tables are checked for shape here; their
    /// entries are on the device (the engine's block manager writes them).
    pub(crate) fn paged_attention_impl(
        &self,
        q: &Tensor,
        cache: &LayerKv,
        pages: &crate::kv::Pages,
        scale: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        const OP: &str = "cuda paged attention";
        let m = q.shape().first().copied().unwrap_or(0);
        ensure!(cache.k.dtype() == DType::BF16, "{OP}: the cache must be bf16 (FUSEBOX_KV_DTYPE=f32 is not paged)");
        let cap = cache.k.shape().first().copied().unwrap_or(0);
        let (_, width, shift) = pages.shape(m, cap, OP)?;
        let (heads, kvh) = (q.shape().get(1).copied().unwrap_or(0), cache.k.shape().get(1).copied().unwrap_or(0));
        ensure!(kvh > 0 && heads <= 32 * kvh, "{OP}: {heads} heads over {kvh} kv heads (at most 32 a group)");
        let paged = Paged {
            tables: Self::ptr(pages.tables, "paged attention")?,
            seqs: Self::ptr(pages.seqs, "paged attention")?,
            width: width as i32,
            shift: shift as i32,
        };
        self.attention_with(q, cache, pages.positions, scale, out, false, Some(paged))
    }

    /// [`Backend::attention`](crate::Backend::attention); `pack` takes every
    /// row count as prefill does (all rows' query vectors of a kv head in
    /// one block, the keys read once), where the op keeps up to
    /// `ROW_EXACT_MAX` rows one by one for decode-exact verify rows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_with(
        &self,
        q: &Tensor,
        cache: &LayerKv,
        positions: &Tensor,
        scale: f32,
        out: &mut Tensor,
        pack: bool,
        paged: Option<Paged>,
    ) -> Result<()> {
        ensure!(q.shape().len() == 3, "cuda attention: expected q [rows, heads, head_dim], got {:?}", q.shape());
        let (m, heads, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let cs = cache.k.shape().to_vec();
        ensure!(
            cs.len() == 3 && cache.v.shape() == cs.as_slice() && cs[2] == d,
            "cuda attention: cache k {:?} / v {:?} vs q {:?}",
            cache.k.shape(),
            cache.v.shape(),
            q.shape()
        );
        check_cache_dtype(cache, "attention")?;
        let (cap, kvh) = (cs[0], cs[1]);
        ensure!(kvh > 0 && heads % kvh == 0, "cuda attention: {heads} heads over {kvh} kv heads");
        ensure!(
            d > 0 && d % 8 == 0 && d <= 256,
            "cuda attention: head_dim {d} unsupported (a multiple of 8, at most 256)"
        );
        ensure!(
            q.dtype() == DType::F32 && out.dtype() == DType::F32 && out.shape() == q.shape(),
            "cuda attention: q {:?} {} and out {:?} {} must be f32 of one shape",
            q.shape(),
            q.dtype(),
            out.shape(),
            out.dtype()
        );
        ensure!(
            positions.dtype() == DType::I32 && positions.numel() >= m,
            "cuda attention: positions {:?} {} for {m} rows",
            positions.shape(),
            positions.dtype()
        );
        ensure!(
            cap <= i32::MAX as usize && m * heads <= i32::MAX as usize,
            "cuda attention: q {:?} / cache {cs:?} too large",
            q.shape()
        );
        if m == 0 || heads == 0 {
            return Ok(());
        }
        let (pq, pp, po) =
            (Self::ptr(q, "attention")?, Self::ptr(positions, "attention")?, Self::ptr(out, "attention")?);
        let (ck, cv) = (Self::ptr(&cache.k, "attention")?, Self::ptr(&cache.v, "attention")?);
        if cache.k.dtype() == DType::F32 {
            ensure!(paged.is_none(), "cuda paged attention: the cache must be bf16");
            // the exact path: one block per (query row, head)
            let args = [
                Arg::P(pq),
                Arg::P(ck),
                Arg::P(cv),
                Arg::P(pp),
                Arg::P(po),
                Arg::I(heads as i32),
                Arg::I(kvh as i32),
                Arg::I(d as i32),
                Arg::I(cap as i32),
                Arg::F(scale),
            ];
            return self.launch(FILE, "attn_f32cache", (((m * heads) as u32, 1, 1), (128, 1, 1), 0), &args);
        }
        let aligned = ck % 16 == 0 && cv % 16 == 0;

        let group = heads / kvh;
        let dp = d.next_power_of_two().max(8);
        // Up to ROW_EXACT_MAX rows (decode, speculative verify) are taken one at a time: every row gets
        // the blocks a one-row launch at its position gets (the kernel, the query tiles of its G heads,
        // the key splits and their boundaries, from its own length), so each row is bitwise the decode
        // step's; K/V are read once per row. Longer inputs (prefill) pack m * G query vectors per kv head.
        // (a paged cache: every row, whatever the count)
        let by_row = paged.is_some() || (!pack && m <= ROW_EXACT_MAX);
        let n = if by_row { group } else { m * group }; // query vectors per kv head (and row, by_row)
        let qb = if n <= 8 {
            n.next_power_of_two()
        } else if n <= 32 {
            8
        } else {
            q_max(dp)
        };
        let tc = tc_kernel(
            dp,
            qb,
            by_row,
            self.attn_tc() && self.info.compute_capability.0 >= 8 && pq % 8 == 0 && po % 8 == 0,
        );
        let (file, name, c) = match tc {
            Some(name) => (FILE_TC, name, cfg_tc(dp)),
            None => {
                let table = if paged.is_some() { KERNELS_PG } else { KERNELS };
                let name = table
                    .iter()
                    .find(|&&(a, b, _)| a == dp && b == qb)
                    .map(|&(_, _, s)| s)
                    .expect("a kernel for every (padded head_dim, query block)");
                (FILE, name, cfg(dp, qb))
            }
        };
        let tiles = n.div_ceil(qb);
        let grid_z = if by_row { m * tiles } else { tiles };
        ensure!(grid_z <= 65535 && kvh <= 65535, "cuda attention: {m} rows x {heads} heads is too many");
        // Split the key range so that one full wave of resident blocks covers the GPU, but never into more
        // splits than the capacity has tiles. Depends on shapes only (by_row: those of one row), so scratch
        // sizes stay fixed in a decode loop and every row splits as a decode step does.
        let base = kvh * tiles;
        let target = self.attn_blocks_per_sm(file, name, c.smem) * self.sm_count as usize;
        // (rounded down: a second split of work that already fills the GPU costs a combine pass for nothing)
        let splits = (target / base).clamp(1, cap.div_ceil(c.tk).clamp(1, 256));
        let (pacc, pml) = if splits > 1 {
            // Partials [acc | (max, sum)] in one scratch slot. One row (decode, the graph-captured case) and
            // up to ROW_EXACT_MAX rows (verify, captured too) use slot 2: one row sizes it as before, any
            // other row count for ROW_EXACT_MAX rows, so it never grows between passes (a captured graph
            // keeps the address); prefill uses slot 3, so growing it never moves slot 2.
            let (slot, rows) = if m == 1 {
                (2, DECODE_ROWS * heads * cap.div_ceil(32).clamp(splits, 256))
            } else if by_row && m <= ROW_EXACT_MAX {
                (2, ROW_EXACT_MAX * heads * splits)
            } else {
                (3, m * heads * splits)
            };
            let base = self.scratch(slot, rows * (d + 2) * 4)?;
            (base, base + (m * heads * splits * d * 4) as u64)
        } else {
            (0, 0)
        };
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let mut args = vec![
            Arg::P(pq),
            Arg::P(ck),
            Arg::P(cv),
            Arg::P(pp),
            Arg::P(po),
            Arg::P(pacc),
            Arg::P(pml),
            Arg::I(m as i32),
            Arg::I(heads as i32),
            Arg::I(kvh as i32),
            Arg::I(d as i32),
            Arg::I(cap as i32),
            Arg::F(scale_log2),
            Arg::I(aligned as i32),
            Arg::I(if by_row { tiles as i32 } else { 0 }),
        ];
        if let Some(pg) = paged {
            args.extend([Arg::P(pg.tables), Arg::P(pg.seqs), Arg::I(pg.width), Arg::I(pg.shift)]);
        }
        self.launch(file, name, ((splits as u32, kvh as u32, grid_z as u32), (THREADS, 1, 1), c.smem as u32), &args)?;
        if splits > 1 {
            let rows = m * heads;
            // a warp per four splits (four loads in flight each), 1 to 16 warps
            let combine_threads = (32 * splits.div_ceil(4)).clamp(32, 512) as u32;
            self.launch(
                FILE,
                "attn_combine",
                ((rows as u32, 1, 1), (combine_threads, 1, 1), 0),
                &[Arg::P(pacc), Arg::P(pml), Arg::P(po), Arg::I(splits as i32), Arg::I(d as i32)],
            )?;
        }
        Ok(())
    }
}

/// A paged cache for the attention kernels: device pointers of the block
/// tables (`[sequences, width]` I32) and of each row's sequence, and log2
/// of the block size.
#[derive(Clone, Copy)]
pub(crate) struct Paged {
    tables: u64,
    seqs: u64,
    width: i32,
    shift: i32,
}

/// The cache is bf16 (the fast kernels) or, with `FUSEBOX_KV_DTYPE=f32`, f32
/// (plain kernels, exact against the CPU); keys and values alike.
pub(super) fn check_cache_dtype(cache: &LayerKv, op: &str) -> Result<()> {
    let (k, v) = (cache.k.dtype(), cache.v.dtype());
    ensure!(
        k == v && matches!(k, DType::BF16 | DType::F32),
        "cuda {op}: the cache must be bf16 or f32, got k {k} v {v}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_fits_in_shared_memory() {
        for &(dp, q, _) in KERNELS {
            let c = cfg(dp, q);
            assert!(c.smem <= 227 * 1024, "d{dp} q{q}: {} bytes", c.smem);
            assert!(dp / 8 * (q / q.min(8)) <= THREADS as usize);
        }
        for &(dp, _) in KERNELS_TC {
            assert!(cfg_tc(dp).smem <= 227 * 1024, "tc d{dp}");
            assert_eq!(q_max(dp), TC_Q, "tc d{dp}: the scalar prefill block it replaces");
        }
    }

    #[test]
    fn tensor_core_kernel_only_for_packed_prefill_blocks() {
        // only packed q64 prefill blocks of head dims 64 and 128 (padded), where allowed
        assert_eq!(tc_kernel(128, 64, false, true), Some("attn_tc_d128"));
        assert_eq!(tc_kernel(64, 64, false, true), Some("attn_tc_d64"));
        assert_eq!(tc_kernel(128, 64, false, false), None);
        assert_eq!(tc_kernel(128, 64, true, true), None);
        assert_eq!(tc_kernel(128, 8, false, true), None);
        assert_eq!(tc_kernel(32, 64, false, true), None);
        assert_eq!(tc_kernel(256, 32, false, true), None);
    }
}
