//! Prefill attention on the CPU (more than [`super::ROW_EXACT_MAX`] query
//! rows): up to [`QB`] query vectors of one kv head at a time (the heads of
//! a group at a few consecutive positions), against keys and values widened
//! to f32 once for a chunk of such blocks, meeting them in the prefill
//! product's micro-kernel ([`super::gemm`]) instead of one query at a time
//! (four f16 rows loaded and widened per query vector, 17% of a Qwen3-0.6B
//! pp512's samples).
//!
//! Per block: scores `S^T = K Q^T` with the queries packed as the panel,
//! then a softmax per query over its own keys (later keys get weight 0),
//! then `O = P V` with 16 value columns at a time as the panel (the values,
//! widened to f32 rows, are their own panel at a stride of `d`). The sums run
//! in another order than the one-row path's, so prefill rows are not
//! bitwise the decode step's (the product's rows past `ROW_EXACT_MAX` are
//! not either).

use super::gemm::{MR, NR};

/// Query vectors per block: the micro-kernel's width.
pub const QB: usize = NR;

/// One kv head's cached rows (where each lies: a [`RowMap`]).
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl KvRows<'_> {
    /// Rows `0..len` (`d` values each, laid out as `rows` says) as f32 into `dst`.
    pub fn widen(&self, len: usize, rows: RowMap, d: usize, dst: &mut [f32]) {
        for (t, row) in dst[..len * d].chunks_exact_mut(d).enumerate() {
            let at = rows.off(t);
            match self {
                KvRows::F32(v) => row.copy_from_slice(&v[at..at + d]),
                KvRows::F16(v) => {
                    use half::slice::HalfFloatSliceExt;
                    bytemuck::cast_slice::<u16, half::f16>(&v[at..at + d]).convert_to_f32_slice(row);
                }
            }
        }
    }
}

/// Where row `t` of a sequence's cached keys or values starts, in values
/// from the start of its kv head's slice.
pub trait Rows: Copy {
    fn off(self, t: usize) -> usize;

    /// The largest offset of rows `0..len` (`len > 0`).
    fn max_off(self, len: usize) -> usize;
}

/// A contiguous cache: row `t` at `t * stride`.
#[derive(Clone, Copy)]
pub struct Linear(pub usize);

impl Rows for Linear {
    #[inline(always)]
    fn off(self, t: usize) -> usize {
        t * self.0
    }
    fn max_off(self, len: usize) -> usize {
        (len - 1) * self.0
    }
}

/// A paged cache: row `t` is row `t % bs` of block `table[t / bs]`, blocks
/// of `bs = 1 << shift` rows `stride` values apart.
#[derive(Clone, Copy)]
pub struct Paged<'a> {
    pub stride: usize,
    pub table: &'a [i32],
    pub shift: u32,
}

impl Rows for Paged<'_> {
    #[inline(always)]
    fn off(self, t: usize) -> usize {
        let b = self.table[t >> self.shift] as usize;
        ((b << self.shift) | (t & ((1 << self.shift) - 1))) * self.stride
    }
    fn max_off(self, len: usize) -> usize {
        let bs = 1usize << self.shift;
        let full = (len - 1) >> self.shift;
        // every block but the last is read whole; the last up to row len - 1
        let last = self.off(len - 1);
        self.table[..full].iter().map(|&b| ((b as usize) * bs + bs - 1) * self.stride).fold(last, usize::max)
    }
}

/// [`Linear`] or [`Paged`], for callers that pick at run time.
#[derive(Clone, Copy)]
pub enum RowMap<'a> {
    Linear(Linear),
    Paged(Paged<'a>),
}

impl RowMap<'_> {
    #[inline(always)]
    pub fn off(self, t: usize) -> usize {
        match self {
            RowMap::Linear(m) => m.off(t),
            RowMap::Paged(m) => m.off(t),
        }
    }
}

/// Scratch values [`block`] needs for keys up to `len` and head dim `d`.
pub fn scratch_len(len: usize, d: usize) -> usize {
    QB * d + QB * len
}

/// Whether [`block`] takes head dim `d` on this processor.
pub fn supported(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        d.is_multiple_of(NR) && super::kernels::has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// Attention of the `lens.len() <= QB` query vectors in `q` (`d` each,
/// query `j` seeing keys `0..lens[j]`) into `out` (`d` each), against the
/// widened keys `kf` and values `vf` ([`KvRows::widen`], `d` per row).
///
/// # Panics
/// If [`supported`] is false for `d`, a slice is short, or `scratch` is
/// shorter than [`scratch_len`] for the longest `lens`.
pub fn block(q: &[f32], lens: &[usize], kf: &[f32], vf: &[f32], scale: f32, scratch: &mut [f32], out: &mut [f32]) {
    let nq = lens.len();
    let d = q.len() / nq.max(1);
    let len = lens.iter().copied().max().unwrap_or(0);
    assert!(supported(d) && nq <= QB && q.len() == nq * d && out.len() == nq * d);
    assert!(kf.len() >= len * d && vf.len() >= len * d && lens.iter().all(|&l| l > 0));
    assert!(scratch.len() >= scratch_len(len, d));
    let (qpanel, s) = scratch.split_at_mut(QB * d);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA are present (supported); every slice was sized above.
    unsafe {
        use super::gemm::x86::{pack, tile_rows};
        pack(q, nq, d, qpanel);
        let mut tile = [[0f32; NR]; MR];
        let mut t0 = 0;
        while t0 < len {
            let rows = MR.min(len - t0);
            tile_rows(kf, t0, rows, d, qpanel, NR, &mut tile);
            for (i, r) in tile[..rows].iter().enumerate() {
                for (j, &v) in r[..nq].iter().enumerate() {
                    s[j * len + t0 + i] = v * scale;
                }
            }
            t0 += rows;
        }
        for (j, &l) in lens.iter().enumerate() {
            let row = &mut s[j * len..(j + 1) * len];
            let mx = row[..l].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for st in &mut row[..l] {
                *st = (*st - mx).exp();
                sum += *st;
            }
            let inv = 1.0 / sum;
            row[..l].iter_mut().for_each(|st| *st *= inv);
            row[l..].fill(0.0);
        }
        for c0 in (0..d).step_by(NR) {
            let mut j0 = 0;
            while j0 < nq {
                let rows = MR.min(nq - j0);
                tile_rows(s, j0, rows, len, &vf[c0..], d, &mut tile);
                for (i, r) in tile[..rows].iter().enumerate() {
                    out[(j0 + i) * d + c0..(j0 + i) * d + c0 + NR].copy_from_slice(r);
                }
                j0 += rows;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}
