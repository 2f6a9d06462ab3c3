//! The decode integer dot product eight weight rows at a time, for Q4_0 and
//! Q4_1: the per-block float work (scale, conversion, FMA), which the
//! one-row kernel ([`super::intdot`]) spends on every block of every row,
//! happens once per block for eight rows, one row per lane.
//!
//! Per row and block of 32 the nibbles go in as bytes, unwidened: `vpmaddubsw`
//! meets them with the input's signed high and unsigned low bytes
//! ([`IntRow::hi`], `lo`), and two `vpmaddwd` join the halves as
//! `256 * hi + lo` in i32: the exact integer sum the one-row kernel forms
//! with int16 multiply-adds. Eight rows' i32 lanes then fold into one vector
//! (row `r` in lane `r`), which meets the eight rows' scales in one FMA.
//!
//! The eight rows are `8 * rb` bytes back to back; while reading them the
//! kernel prefetches the next eight rows as one stream, three lines per
//! block (each block reads `8 * 18` bytes). Prefetching each row 4096 bytes
//! ahead, as the one-row kernel does, gave 31-34 G values/s on two threads
//! streaming Q4_0 from memory, the one stream 38 (development machine,
//! interleaved in one process).

use super::intdot::IntRow;
use crate::quant::GgmlType;

/// Rows per call of [`ggml_dot8`].
pub const ROWS: usize = 8;

/// Whether [`ggml_dot8`] takes this block type (on this processor).
pub fn supported(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1) && super::intdot::ggml_supported(ty)
}

/// Rows `0..8` of `rows` (each `rb` bytes of `ty` blocks, back to back)
/// against `y`, into `out`.
///
/// # Panics
/// If [`supported`] is false for `ty`, `rows` holds fewer than eight rows
/// or `y` is shorter than a row.
pub fn ggml_dot8(ty: GgmlType, rows: &[u8], rb: usize, y: &IntRow, out: &mut [f32; ROWS]) {
    assert!(supported(ty), "int dot: {} has no eight-row kernel here", ty.name());
    assert!(rows.len() >= ROWS * rb, "int dot: {} bytes for eight rows of {rb}", rows.len());
    let blocks = rb / ty.type_size();
    assert!(y.d.len() >= blocks && y.hi.len() >= 32 * blocks, "int dot: input shorter than a row of {blocks} blocks");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA/F16C are present (supported) and rows, y hold what is read.
    unsafe {
        *out = x86::q4(rows.as_ptr(), rb, blocks, y, ty == GgmlType::Q4_1)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{IntRow, ROWS};

    /// Lane `r` of the result: the sum of the eight i32 lanes of `s[r]`.
    #[inline(always)]
    unsafe fn fold(s: [__m256i; ROWS]) -> __m256i {
        let pair = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        let quad = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
        let lo = quad(pair(s[0], s[1]), pair(s[2], s[3]));
        let hi = quad(pair(s[4], s[5]), pair(s[6], s[7]));
        _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31))
    }

    /// The f16 at byte `at` of each of the eight rows, as f32 lanes.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8, rb: usize, at: usize) -> __m256 {
        let h = |r: usize| (p.add(r * rb + at) as *const i16).read_unaligned();
        _mm256_cvtph_ps(_mm_set_epi16(h(7), h(6), h(5), h(4), h(3), h(2), h(1), h(0)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4(p: *const u8, rb: usize, blocks: usize, y: &IntRow, q4_1: bool) -> [f32; ROWS] {
        let (ts, qo) = if q4_1 { (20, 4) } else { (18, 2) };
        let m4 = _mm256_set1_epi8(0x0f);
        let (k256, k1) = (_mm256_set1_epi16(256), _mm256_set1_epi16(1));
        let mut acc = _mm256_setzero_ps();
        for b in 0..blocks {
            let yh = _mm256_loadu_si256(y.hi.as_ptr().add(32 * b) as *const __m256i);
            let yl = _mm256_loadu_si256(y.lo.as_ptr().add(32 * b) as *const __m256i);
            let mut s = [_mm256_setzero_si256(); ROWS];
            for (r, s) in s.iter_mut().enumerate() {
                let blk = p.add(r * rb + b * ts);
                if r < 3 {
                    // block b of the eight rows spans 8 * ts bytes of the next eight rows' 8 * rb
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ROWS * (rb + b * ts) + 64 * r) as *const i8);
                }
                let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(qo) as *const __m128i));
                // values 0..15 (low nibbles) in the low lane, 16..31 in the high one
                let q = _mm256_and_si256(_mm256_blend_epi32::<0xf0>(v, _mm256_srli_epi16(v, 4)), m4);
                let (ph, pl) = (_mm256_maddubs_epi16(q, yh), _mm256_maddubs_epi16(yl, q));
                *s = _mm256_add_epi32(_mm256_madd_epi16(ph, k256), _mm256_madd_epi16(pl, k1));
            }
            let dot = _mm256_cvtepi32_ps(fold(s));
            let d = f16x8(p, rb, b * ts);
            let (dy, ys) = (*y.d.get_unchecked(b), *y.sum.get_unchecked(b));
            if q4_1 {
                // d * dy * dot + m * ysum
                let m = f16x8(p, rb, b * ts + 2);
                acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(dy)), dot, acc);
                acc = _mm256_fmadd_ps(m, _mm256_set1_ps(ys), acc);
            } else {
                // d * (dy * dot - 8 * ysum)
                let v = _mm256_fmadd_ps(dot, _mm256_set1_ps(dy), _mm256_set1_ps(-8.0 * ys));
                acc = _mm256_fmadd_ps(d, v, acc);
            }
        }
        let mut out = [0f32; ROWS];
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
        out
    }
}
