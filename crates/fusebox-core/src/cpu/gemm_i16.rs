//! The prefill product of packed weights on int16 inputs (the CPU's
//! `int_dot` site past the one-row path): every input row is quantized to
//! int16 per block of 32 ([`IntRows`]), a block of at most [`NR`] weight
//! rows comes as small integers with a float scale and bias per block of 32
//! ([`super::int_weights`]), and a 6 x 16 micro-kernel multiplies them in
//! `vpmaddwd` (16 multiply-adds per instruction, two a cycle on Zen 3,
//! where the f32 path's [`super::gemm`] does 8 per FMA) into i32 lanes.
//!
//! The weights are packed in k-pairs (`panel[(kk / 2) * 32 + 2 * j + kk %
//! 2]`), so that one broadcast 32-bit pair of an input row meets two loads
//! of the panel in 12 `vpmaddwd`. Per block of 32 the 12 i32 lanes become
//! f32 and add into the totals as `dx * s * acc + b * xsum`, with `xsum =
//! dx * sum(xq)` (the block's sum as the integers see it, as in
//! [`super::intdot::IntRow`]). The i32 lanes hold 32 products each: at most
//! 32 * 4096 * 16383 < 2^31 ([`super::int_weights::QMAX`]).

use rayon::prelude::*;

/// Weight rows per block: the micro-kernel's width (two 8-lane vectors).
pub const NR: usize = super::gemm::NR;
/// Input rows per micro-kernel call.
pub const MR: usize = super::gemm::MR;
/// The largest quantized input magnitude: the decode path's 2^14 - 1.
const XMAX: f32 = super::intdot::QMAX;
/// Input rows per quantization task.
const QUANT_ROWS: usize = 8;

// 32 products of the largest weight and input fit an i32 lane.
const _: () = assert!(32 * super::int_weights::QMAX as i64 * XMAX as i64 <= i32::MAX as i64);

/// `m` input rows of `k` values quantized in blocks of 32: value `i` of row
/// `r` is about `d[r * k / 32 + i / 32] * q[r * k + i]`.
pub struct IntRows {
    /// The int16 values in pairs (`k / 2` per row), as the kernel broadcasts them.
    pub q: Vec<i32>,
    /// Per block: the scale.
    pub d: Vec<f32>,
    /// Per block: `d * sum(q)`.
    pub sum: Vec<f32>,
    pub k: usize,
}

impl IntRows {
    /// Quantize the rows of `x` (`k` values each, `k` a multiple of 32) on
    /// the current rayon pool.
    pub fn new(x: &[f32], k: usize) -> Self {
        assert!(k.is_multiple_of(32) && x.len().is_multiple_of(k));
        let (m, g) = (x.len() / k, k / 32);
        let mut out = IntRows { q: vec![0; m * k / 2], d: vec![0.0; m * g], sum: vec![0.0; m * g], k };
        let n = QUANT_ROWS;
        x.par_chunks(n * k)
            .zip(out.q.par_chunks_mut(n * k / 2))
            .zip(out.d.par_chunks_mut(n * g).zip(out.sum.par_chunks_mut(n * g)))
            .for_each(|((x, q), (d, sum))| quantize(x, bytemuck::cast_slice_mut(q), d, sum));
        out
    }
}

/// Quantize `x` in blocks of 32 into `q` (int16), the blocks' scales `d`
/// and sums `sum` (`d * sum(q)`).
fn quantize(x: &[f32], q: &mut [i16], d: &mut [f32], sum: &mut [f32]) {
    assert!(q.len() == x.len() && d.len() * 32 == x.len() && sum.len() == d.len());
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() {
        for (b, xb) in x.chunks_exact(32).enumerate() {
            // SAFETY: AVX2 is present; xb and q[32b..] hold 32 values.
            let (db, s) = unsafe { x86::quantize32(xb, &mut q[32 * b..32 * b + 32]) };
            d[b] = db;
            sum[b] = db * s as f32;
        }
        return;
    }
    for (b, xb) in x.chunks_exact(32).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let db = amax / XMAX;
        let inv = if db > 0.0 { 1.0 / db } else { 0.0 };
        let mut s = 0i32;
        for (o, &v) in q[32 * b..32 * b + 32].iter_mut().zip(xb) {
            let r = (v * inv).round_ties_even().clamp(-XMAX, XMAX) as i32;
            *o = r as i16;
            s += r;
        }
        d[b] = db;
        sum[b] = db * s as f32;
    }
}

/// `put(r, o)` with `o[j] = x_r . w_j` for every input row `r < m` of `x`
/// and weight row `j < nb` (`nb <= NR`) given as small integers `w` (`nb *
/// k`) with the scale and bias of block `g` of row `j` at `ws[g * NR + j]`
/// and `wb[g * NR + j]` (zero for `j >= nb`); `panel` is scratch of `NR * k
/// / 2` pairs. Needs AVX2 ([`supported`]).
#[allow(clippy::too_many_arguments)]
pub fn block_product(
    x: &IntRows,
    m: usize,
    w: &[i16],
    ws: &[f32],
    wb: &[f32],
    nb: usize,
    panel: &mut [i32],
    mut put: impl FnMut(usize, &[f32]),
) {
    let k = x.k;
    let g = k / 32;
    assert!(nb <= NR && w.len() >= nb * k && x.q.len() >= m * k / 2 && panel.len() >= NR * k / 2);
    assert!(ws.len() >= g * NR && wb.len() >= g * NR && x.d.len() >= m * g && x.sum.len() >= m * g);
    assert!(supported(), "int16 GEMM without AVX2");
    #[cfg(target_arch = "x86_64")]
    {
        // the k-pairs are 32-bit elements: the f32 panel's 8 x 8 transposes move them
        let (wf, pf): (&[f32], &mut [f32]) =
            (bytemuck::cast_slice(&w[..nb * k]), bytemuck::cast_slice_mut(&mut panel[..NR * k / 2]));
        // SAFETY: AVX2 is present; w holds nb rows of k / 2 pairs, the panel NR.
        unsafe { super::gemm::x86::pack(wf, nb, k / 2, pf) };
        let bias = wb[..g * NR].iter().any(|&b| b != 0.0);
        let mut r = 0;
        while r < m {
            let rows = MR.min(m - r);
            let mut out = [[0f32; NR]; MR];
            // SAFETY: AVX2/FMA are present; the lengths were checked above.
            unsafe { x86::tile_rows(x, r, rows, panel, ws, wb, bias, &mut out) };
            for (i, o) in out[..rows].iter().enumerate() {
                put(r + i, &o[..nb]);
            }
            r += rows;
        }
    }
}

/// Whether [`block_product`] runs on this processor.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::kernels::has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{IntRows, MR, NR, XMAX};

    /// Quantize 32 values into `q`; returns the scale and `sum(q)`.
    ///
    /// # Safety
    /// AVX2 is present (the lengths are checked).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize32(x: &[f32], q: &mut [i16]) -> (f32, i32) {
        assert!(x.len() >= 32 && q.len() >= 32);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
        let sign = _mm256_set1_ps(-0.0);
        let a = v.map(|v| _mm256_andnot_ps(sign, v));
        let a = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let d = crate::cpu::avx2::hmax8(a) / XMAX;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let (lo, hi) = (_mm256_set1_epi32(-(XMAX as i32)), _mm256_set1_epi32(XMAX as i32));
        let r = v.map(|v| _mm256_max_epi32(lo, _mm256_min_epi32(hi, _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)))));
        let s = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
        // packs interleaves the 128-bit lanes: restore the order with a permute
        let p0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(r[0], r[1]), 0xd8);
        let p1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(r[2], r[3]), 0xd8);
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p0);
        _mm256_storeu_si256(q.as_mut_ptr().add(16) as *mut __m256i, p1);
        (d, _mm_cvtsi128_si32(s))
    }

    /// [`tile`] on `rows` (at most [`MR`]) rows from `r0`.
    ///
    /// # Safety
    /// As for [`tile`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_rows(
        x: &IntRows,
        r0: usize,
        rows: usize,
        panel: &[i32],
        ws: &[f32],
        wb: &[f32],
        bias: bool,
        out: &mut [[f32; NR]; MR],
    ) {
        macro_rules! go {
            ($r:literal) => {
                if bias {
                    tile::<$r, true>(x, r0, panel, ws, wb, out)
                } else {
                    tile::<$r, false>(x, r0, panel, ws, wb, out)
                }
            };
        }
        match rows {
            6 => go!(6),
            5 => go!(5),
            4 => go!(4),
            3 => go!(3),
            2 => go!(2),
            _ => go!(1),
        }
    }

    /// `out[i][j] = x_{r0+i} . w_j` for `i < R`: per block of 32, 16
    /// k-pairs of `vpmaddwd` into i32 lanes, then `dx * ws * acc (+ wb *
    /// xsum)` into the f32 totals.
    ///
    /// # Safety
    /// AVX2 and FMA are present (the bounds are checked).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const BIAS: bool>(
        x: &IntRows,
        r0: usize,
        panel: &[i32],
        ws: &[f32],
        wb: &[f32],
        out: &mut [[f32; NR]; MR],
    ) {
        let (k2, g) = (x.k / 2, x.k / 32);
        assert!(R <= MR && (r0 + R) * k2 <= x.q.len() && (r0 + R) * g <= x.d.len() && (r0 + R) * g <= x.sum.len());
        assert!(panel.len() >= k2 * NR && ws.len() >= g * NR && wb.len() >= g * NR);
        let xq = x.q.as_ptr().add(r0 * k2);
        let (xd, xs) = (x.d.as_ptr().add(r0 * g), x.sum.as_ptr().add(r0 * g));
        let pp = panel.as_ptr();
        let mut total = [[_mm256_setzero_ps(); 2]; R];
        for gi in 0..g {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for p in 16 * gi..16 * gi + 16 {
                let b0 = _mm256_loadu_si256(pp.add(p * NR) as *const __m256i);
                let b1 = _mm256_loadu_si256(pp.add(p * NR + 8) as *const __m256i);
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_set1_epi32(*xq.add(i * k2 + p));
                    a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(xv, b0));
                    a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(xv, b1));
                }
            }
            let s0 = _mm256_loadu_ps(ws.as_ptr().add(gi * NR));
            let s1 = _mm256_loadu_ps(ws.as_ptr().add(gi * NR + 8));
            for (i, (t, a)) in total.iter_mut().zip(&acc).enumerate() {
                let d = _mm256_set1_ps(*xd.add(i * g + gi));
                t[0] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a[0]), s0), d, t[0]);
                t[1] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a[1]), s1), d, t[1]);
            }
            if BIAS {
                let c0 = _mm256_loadu_ps(wb.as_ptr().add(gi * NR));
                let c1 = _mm256_loadu_ps(wb.as_ptr().add(gi * NR + 8));
                for (i, t) in total.iter_mut().enumerate() {
                    let s = _mm256_set1_ps(*xs.add(i * g + gi));
                    t[0] = _mm256_fmadd_ps(c0, s, t[0]);
                    t[1] = _mm256_fmadd_ps(c1, s, t[1]);
                }
            }
        }
        for (o, t) in out.iter_mut().zip(&total) {
            _mm256_storeu_ps(o.as_mut_ptr(), t[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), t[1]);
        }
    }
}
