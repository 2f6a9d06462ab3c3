//! Integer dot products for packed weights (the CPU's `int_dot` site): the
//! input row is quantized once per matmul to int16 in blocks of 32 (one f32
//! scale each, plus the block's sum), and each weight block meets it in
//! integer multiply-adds (`vpmaddwd`), then one f32 FMA per 8 lanes of a
//! block. The f32 path (`quant.rs`, `avx2.rs`) widens every weight to f32
//! and spends two FMAs on it; this one about half the instructions per
//! weight. int16 keeps the input's rounding near 1e-5 relative: int8 (what
//! llama.cpp's CPU backend uses, with `vpmaddubsw`) was measured first and
//! failed the parity gate (relative RMS 2e-2 on the tiny 4-bit fixture, and
//! SmolLM2's greedy tokens diverged at token 43).
//!
//! Every weight format here is `s * q + b` per block of 32 with integer `q`
//! (Q4_0: s = d, b = -8d; Q4_1: b = m; Q8_0: q signed, b = 0; Q4_K/Q5_K:
//! s = d * sc, b = -dmin * m per sub-block; Q6_K: q - 32 signed with a scale
//! per 16 values; MLX affine 4/8-bit: the group's scale and bias), so a
//! block contributes `s * dy * sum(q * yq) + b * ysum` with
//! `ysum = dy * sum(yq)`.
//!
//! K-quant rows (Q4_K, Q5_K, Q6_K) take an input quantized with one scale per
//! super-block of 256 ([`span`]), so that the integer products of a whole
//! super-block add up in i32 and meet the floats once per 256 values instead
//! of once per 32. Their kernels split the int16 input into a signed high
//! and an unsigned low byte ([`IntRow::hi`], `lo`): the weights, bytes of
//! 0..63, meet each in `vpmaddubsw` (32 products per instruction, no
//! widening) and their sub-block scale in `vpmaddwd`; the two sums meet as
//! `256 * hi + lo` once per super-block. Same products, same exact integer
//! sums as int16 multiply-adds, about half the instructions.

use crate::quant::GgmlType;

/// An input row quantized in blocks of 32: `x[i] ~ d[i / 32] * q[i]`.
#[derive(Default)]
pub struct IntRow {
    pub q: Vec<i16>,
    /// Per block: the scale `d`.
    pub d: Vec<f32>,
    /// Per block: `d * sum(q)`, the block's sum as the integer dot sees it.
    pub sum: Vec<f32>,
    /// `q` split into bytes, `q = 256 * hi + lo` (`hi` in -64..63, `lo`
    /// in 0..255): the K-quant kernels meet 8-bit weights with them in
    /// `vpmaddubsw`, 32 products per instruction, without widening the
    /// weights, and still see the exact int16 input.
    pub hi: Vec<i8>,
    pub lo: Vec<u8>,
    /// Per 16 values: `d * sum(q)` (Q6_K's `- 32` offset meets it).
    pub sum16: Vec<f32>,
    /// `hi` and `lo` in MLX 4-bit's nibble order, per block of 32: values
    /// 0, 2, ..., 30 then 1, 3, ..., 31 (a block's 16 bytes hold the even
    /// values in their low nibbles and the odd ones in the high), for
    /// [`super::intdot_rows8`]'s affine kernel.
    pub hi_mlx: Vec<i8>,
    pub lo_mlx: Vec<u8>,
}

/// The largest quantized magnitude: 2^14 - 1, so that the sum of two 8-bit
/// products (255 * 16383 * 2) and of four 4-bit ones stay far inside i32.
pub(super) const QMAX: f32 = 16383.0;

impl IntRow {
    /// Quantize `x` into `self` with one scale per `span` values (32 or 256;
    /// `x.len()` a multiple of it), reusing its buffers. `d` and `sum` stay
    /// per block of 32 (a span's scale repeated).
    pub fn quantize(&mut self, x: &[f32], span: usize) {
        assert!(
            span.is_multiple_of(32) && x.len().is_multiple_of(span),
            "int dot: {} values in spans of {span}",
            x.len()
        );
        self.q.resize(x.len(), 0);
        self.d.resize(x.len() / 32, 0.0);
        self.sum.resize(x.len() / 32, 0.0);
        self.hi.resize(x.len(), 0);
        self.lo.resize(x.len(), 0);
        self.sum16.resize(x.len() / 16, 0.0);
        self.hi_mlx.resize(x.len(), 0);
        self.lo_mlx.resize(x.len(), 0);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            for (si, xs) in x.chunks_exact(span).enumerate() {
                // SAFETY: AVX2 is present; every buffer holds x.len() values (or their per-32 and per-16 entries).
                unsafe { x86::quantize_span(self, xs, si * span / 32) };
            }
            return;
        }
        for (si, xs) in x.chunks_exact(span).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / QMAX;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (bj, xb) in xs.chunks_exact(32).enumerate() {
                let b = si * span / 32 + bj;
                let mut s = [0i32; 2];
                for (i, &v) in xb.iter().enumerate() {
                    let r = (v * inv).round_ties_even().clamp(-QMAX, QMAX) as i32;
                    let at = 32 * b + i;
                    self.q[at] = r as i16;
                    self.hi[at] = (r >> 8) as i8;
                    self.lo[at] = (r & 0xff) as u8;
                    let m = 32 * b + i / 2 + 16 * (i % 2);
                    self.hi_mlx[m] = (r >> 8) as i8;
                    self.lo_mlx[m] = (r & 0xff) as u8;
                    s[i / 16] += r;
                }
                self.d[b] = d;
                self.sum[b] = d * (s[0] + s[1]) as f32;
                self.sum16[2 * b] = d * s[0] as f32;
                self.sum16[2 * b + 1] = d * s[1] as f32;
            }
        }
    }
}

/// Values per input scale that the integer kernels of `ty` expect: 256 for
/// the K-quants (their super-block), 32 for the rest.
pub fn span(ty: GgmlType) -> usize {
    if matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K) {
        256
    } else {
        32
    }
}

/// Whether [`ggml_dot`] handles this block type.
pub fn ggml_supported(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
        && has_avx2()
}

/// Whether [`affine_dot`] handles this bit width.
pub fn affine_supported(bits: u32) -> bool {
    matches!(bits, 4 | 8) && has_avx2()
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::kernels::has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One row of Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K blocks against `y`.
///
/// # Panics
/// If [`ggml_supported`] is false for `ty` or `y` is shorter than the row.
pub fn ggml_dot(ty: GgmlType, row: &[u8], y: &IntRow) -> f32 {
    assert!(ggml_supported(ty), "int dot: {} is not supported here", ty.name());
    let blocks = row.len() / ty.type_size();
    assert!(y.d.len() >= blocks, "int dot: input of {} blocks for a row of {blocks}", y.d.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA/F16C are present (ggml_supported) and y holds the row's blocks.
    unsafe {
        match ty {
            GgmlType::Q8_0 => x86::q8_0(row, y),
            GgmlType::Q4_K => x86::q45_k(row, y, false),
            GgmlType::Q5_K => x86::q45_k(row, y, true),
            GgmlType::Q6_K => x86::q6_k(row, y),
            t => x86::q4(row, y, t == GgmlType::Q4_1),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// One row of MLX affine 4- or 8-bit words against `y`; `sb(g)` gives group
/// g's scale and bias (`group` a multiple of 32).
///
/// # Panics
/// If [`affine_supported`] is false for `bits` or `y` is shorter than the row.
pub fn affine_dot(words: &[u32], bits: u32, group: usize, sb: impl Fn(usize) -> (f32, f32), y: &IntRow) -> f32 {
    assert!(affine_supported(bits), "int dot: {bits}-bit affine is not supported here");
    let cols = words.len() * 32 / bits as usize;
    assert!(
        y.q.len() >= cols && group.is_multiple_of(32),
        "int dot: input of {} values for a row of {cols}",
        y.q.len()
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA are present (affine_supported) and y holds the row's values.
    unsafe {
        x86::affine(words, bits, group, sb, y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::IntRow;
    use crate::cpu::avx2::hsum8 as hsum;

    /// How far ahead of the block being read to prefetch. Decode streams
    /// the weights from memory once per token; 4096 bytes ahead (prefetching
    /// every line of a K-quant block) against 1024 (one line per block) took
    /// Qwen3-0.6B Q4_K_M decode on two threads from 25.5 / 15.6 / 29.1 to
    /// 30.5 / 25.3 / 32.7 tok/s, interleaved on the development machine.
    const PREFETCH: usize = 4096;

    /// Prefetch the `LINES` cache lines at `p + PREFETCH` (a block of up to
    /// `64 * LINES` bytes; the next block's covers a line it shares).
    #[inline(always)]
    unsafe fn pf<const LINES: usize>(p: *const u8) {
        for l in 0..LINES {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64 * l) as *const i8);
        }
    }

    /// 8 lanes of `sum(q * y)` over a block of 32: `lo` and `hi` hold values
    /// 0..15 and 16..31 as i16.
    #[inline(always)]
    unsafe fn dot16(lo: __m256i, hi: __m256i, y: &IntRow, b: usize) -> __m256 {
        let yp = y.q.as_ptr().add(32 * b) as *const __m256i;
        let p = _mm256_add_epi32(
            _mm256_madd_epi16(lo, _mm256_loadu_si256(yp)),
            _mm256_madd_epi16(hi, _mm256_loadu_si256(yp.add(1))),
        );
        _mm256_cvtepi32_ps(p)
    }

    #[inline(always)]
    unsafe fn f16(b: *const u8) -> f32 {
        crate::cpu::avx2::f16_at(b)
    }

    /// 16 bytes of nibbles as values 0..15 and 16..31 (i16): ggml's order
    /// (low nibbles first) or, `interleaved`, MLX's (byte k holds values 2k
    /// and 2k+1).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8, interleaved: bool) -> (__m256i, __m256i) {
        let v = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0f);
        let (lo, hi) = (_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
        let (a, z) = if interleaved { (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)) } else { (lo, hi) };
        (_mm256_cvtepu8_epi16(a), _mm256_cvtepu8_epi16(z))
    }

    /// [`IntRow::quantize`] of one span `xs` (a multiple of 32 values) whose
    /// first block is block `b0` of `y`: the same values as the scalar loop
    /// (`vcvtps2dq` rounds to nearest even, as `round_ties_even`).
    ///
    /// # Safety
    /// AVX2 is present and `y`'s buffers hold blocks `b0..b0 + xs.len() / 32`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_span(y: &mut IntRow, xs: &[f32], b0: usize) {
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        for c in xs.chunks_exact(8) {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(c.as_ptr())));
        }
        let d = crate::cpu::avx2::hmax8(m) / super::QMAX;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let (lo, hi) = (_mm256_set1_epi32(-(super::QMAX as i32)), _mm256_set1_epi32(super::QMAX as i32));
        // bytes 0, 2, ..., 14, 1, 3, ..., 15 of each 128-bit lane (MLX nibble order, with a permute)
        let evens_odds = _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
        );
        let isum = |v: __m256i| {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)))
        };
        for (bj, xb) in xs.chunks_exact(32).enumerate() {
            let b = b0 + bj;
            let r: [__m256i; 4] = std::array::from_fn(|i| {
                let v = _mm256_mul_ps(_mm256_loadu_ps(xb.as_ptr().add(8 * i)), inv);
                _mm256_max_epi32(lo, _mm256_min_epi32(hi, _mm256_cvtps_epi32(v)))
            });
            let (s0, s1) = (isum(_mm256_add_epi32(r[0], r[1])), isum(_mm256_add_epi32(r[2], r[3])));
            // packs interleaves the 128-bit lanes: a permute restores the order
            let q0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(r[0], r[1]), 0xd8);
            let q1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(r[2], r[3]), 0xd8);
            let at = 32 * b;
            _mm256_storeu_si256(y.q.as_mut_ptr().add(at) as *mut __m256i, q0);
            _mm256_storeu_si256(y.q.as_mut_ptr().add(at + 16) as *mut __m256i, q1);
            let m8 = _mm256_set1_epi16(0xff);
            let hb =
                _mm256_permute4x64_epi64(_mm256_packs_epi16(_mm256_srai_epi16(q0, 8), _mm256_srai_epi16(q1, 8)), 0xd8);
            let lb =
                _mm256_permute4x64_epi64(_mm256_packus_epi16(_mm256_and_si256(q0, m8), _mm256_and_si256(q1, m8)), 0xd8);
            _mm256_storeu_si256(y.hi.as_mut_ptr().add(at) as *mut __m256i, hb);
            _mm256_storeu_si256(y.lo.as_mut_ptr().add(at) as *mut __m256i, lb);
            let mlx = |v: __m256i| _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, evens_odds), 0xd8);
            _mm256_storeu_si256(y.hi_mlx.as_mut_ptr().add(at) as *mut __m256i, mlx(hb));
            _mm256_storeu_si256(y.lo_mlx.as_mut_ptr().add(at) as *mut __m256i, mlx(lb));
            *y.d.get_unchecked_mut(b) = d;
            *y.sum.get_unchecked_mut(b) = d * (s0 + s1) as f32;
            *y.sum16.get_unchecked_mut(2 * b) = d * s0 as f32;
            *y.sum16.get_unchecked_mut(2 * b + 1) = d * s1 as f32;
        }
    }

    /// `a += s * v`. One accumulator: indexing a pair by block parity put
    /// the pair on the stack (a store and a load per block, 19% of the
    /// affine kernel's samples), and the integer work between two FMAs
    /// covers the FMA's latency.
    #[inline(always)]
    unsafe fn acc(a: &mut __m256, s: f32, v: __m256) {
        *a = _mm256_fmadd_ps(_mm256_set1_ps(s), v, *a);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4(row: &[u8], y: &IntRow, q4_1: bool) -> f32 {
        let ts = if q4_1 { 20 } else { 18 };
        let mut a = _mm256_setzero_ps();
        let mut bias = 0f32;
        let p = row.as_ptr();
        for b in 0..row.len() / ts {
            let blk = p.add(b * ts);
            pf::<1>(blk);
            let d = f16(blk);
            let (lo, hi) = nibbles(blk.add(if q4_1 { 4 } else { 2 }), false);
            acc(&mut a, d * *y.d.get_unchecked(b), dot16(lo, hi, y, b));
            let bb = if q4_1 { f16(blk.add(2)) } else { -8.0 * d };
            bias = bb.mul_add(*y.sum.get_unchecked(b), bias);
        }
        hsum(a) + bias
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0(row: &[u8], y: &IntRow) -> f32 {
        let mut a = _mm256_setzero_ps();
        let p = row.as_ptr();
        for b in 0..row.len() / 34 {
            let blk = p.add(b * 34);
            pf::<1>(blk);
            let lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(2) as *const __m128i));
            let hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(18) as *const __m128i));
            acc(&mut a, f16(blk) * *y.d.get_unchecked(b), dot16(lo, hi, y, b));
        }
        hsum(a)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn affine(words: &[u32], bits: u32, group: usize, sb: impl Fn(usize) -> (f32, f32), y: &IntRow) -> f32 {
        let bytes = words.as_ptr() as *const u8;
        let chunks = words.len() * 32 / bits as usize / 32;
        let per_group = group / 32;
        let mut a = _mm256_setzero_ps();
        let mut bias = 0f32;
        for g in 0..chunks / per_group {
            let (sc, bi) = sb(g);
            for c in g * per_group..(g + 1) * per_group {
                let at = bytes.add(bits as usize * 4 * c);
                pf::<1>(at);
                let (lo, hi) = if bits == 4 {
                    nibbles(at, true)
                } else {
                    (
                        _mm256_cvtepu8_epi16(_mm_loadu_si128(at as *const __m128i)),
                        _mm256_cvtepu8_epi16(_mm_loadu_si128(at.add(16) as *const __m128i)),
                    )
                };
                acc(&mut a, sc * *y.d.get_unchecked(c), dot16(lo, hi, y, c));
                bias = bi.mul_add(*y.sum.get_unchecked(c), bias);
            }
        }
        hsum(a) + bias
    }

    /// Q4_K/Q5_K's 8 six-bit scales and 8 six-bit mins from the 12 packed
    /// bytes, as two little-endian u64s (byte j: sub-block j's).
    #[inline(always)]
    fn k4_scales(s: &[u8]) -> (u64, u64) {
        let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        let (a, b, c) = (w(0), w(4), w(8));
        let (k6, k4, k2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
        let sc_hi = (c & k4) | (((a >> 6) & k2) << 4);
        let m_hi = ((c >> 4) & k4) | (((b >> 6) & k2) << 4);
        ((a & k6) as u64 | (sc_hi as u64) << 32, (b & k6) as u64 | (m_hi as u64) << 32)
    }

    /// `vpshufb` controls that spread word `j` of a 128-bit lane over all
    /// of it (both lanes alike).
    const WORD: [[u8; 32]; 8] = {
        let mut t = [[0u8; 32]; 8];
        let mut j = 0;
        while j < 8 {
            let mut i = 0;
            while i < 32 {
                t[j][i] = (2 * j + i % 2) as u8;
                i += 1;
            }
            j += 1;
        }
        t
    };

    /// Controls that put word `2b` of a lane over the low lane and word
    /// `2b + 1` over the high one (Q6_K: a scale per 16 values).
    const WORD_PAIR: [[u8; 32]; 4] = {
        let mut t = [[0u8; 32]; 4];
        let mut b = 0;
        while b < 4 {
            let mut i = 0;
            while i < 32 {
                t[b][i] = (2 * (2 * b + i / 16) + i % 2) as u8;
                i += 1;
            }
            b += 1;
        }
        t
    };

    #[inline(always)]
    unsafe fn ctrl(c: &[u8; 32]) -> __m256i {
        _mm256_loadu_si256(c.as_ptr() as *const __m256i)
    }

    /// The i32 lanes of `sum(sc * q * y)` over 32 values whose weights `q`
    /// (bytes 0..63) sit in `q`, split as in [`IntRow::hi`]: `acc.0` takes the
    /// products with `hi`, `acc.1` those with `lo`.
    #[inline(always)]
    unsafe fn dot32(acc: &mut (__m256i, __m256i), q: __m256i, sc: __m256i, y: &IntRow, at: usize) {
        let yh = _mm256_loadu_si256(y.hi.as_ptr().add(at) as *const __m256i);
        let yl = _mm256_loadu_si256(y.lo.as_ptr().add(at) as *const __m256i);
        acc.0 = _mm256_add_epi32(acc.0, _mm256_madd_epi16(_mm256_maddubs_epi16(q, yh), sc));
        acc.1 = _mm256_add_epi32(acc.1, _mm256_madd_epi16(_mm256_maddubs_epi16(yl, q), sc));
    }

    /// `a += s * (256 * acc.0 + acc.1)` (a super-block's split sums).
    #[inline(always)]
    unsafe fn acc_split(a: &mut __m256, s: f32, acc: (__m256i, __m256i)) {
        let v = _mm256_fmadd_ps(_mm256_set1_ps(256.0), _mm256_cvtepi32_ps(acc.0), _mm256_cvtepi32_ps(acc.1));
        *a = _mm256_fmadd_ps(_mm256_set1_ps(s), v, *a);
    }

    /// Q4_K (or Q5_K, `q5`): super-blocks of 256 values in 8 sub-blocks of
    /// 32, each `d * sc * q - dmin * m` with 6-bit `sc` and `m`. `y` has one
    /// scale per super-block ([`super::span`]); the weights (0..31) meet its
    /// bytes in `vpmaddubsw` and the sub-block scale in `vpmaddwd`, and the
    /// super-block sums in i32 (per lane at most 32 * 31 * 255 * 63).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q45_k(row: &[u8], y: &IntRow, q5: bool) -> f32 {
        let ts = if q5 { 176 } else { 144 };
        let m4 = _mm256_set1_epi8(0x0f);
        let one = _mm256_set1_epi8(1);
        let mut a = _mm256_setzero_ps();
        for (bi, blk) in row.chunks_exact(ts).enumerate() {
            let p = blk.as_ptr();
            pf::<3>(p);
            let (d, dmin) = (f16(p), f16(p.add(2)));
            let (sc, m) = k4_scales(&blk[4..16]);
            let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(m as i64)));
            let ys = _mm256_loadu_ps(y.sum.as_ptr().add(8 * bi));
            a = _mm256_fmadd_ps(_mm256_set1_ps(-dmin), _mm256_mul_ps(mins, ys), a);
            let qs = p.add(if q5 { 48 } else { 16 });
            let qh = if q5 { _mm256_loadu_si256(p.add(16) as *const __m256i) } else { _mm256_setzero_si256() };
            let mut acc = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for c in 0..4 {
                let v = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                let mut lo = _mm256_and_si256(v, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                if q5 {
                    let bit = |s: i32| {
                        let b = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(s)), one);
                        _mm256_slli_epi16(b, 4)
                    };
                    lo = _mm256_or_si256(lo, bit(2 * c as i32));
                    hi = _mm256_or_si256(hi, bit(2 * c as i32 + 1));
                }
                for (sub, q) in [(2 * c, lo), (2 * c + 1, hi)] {
                    let s = _mm256_shuffle_epi8(scales, ctrl(&WORD[sub]));
                    dot32(&mut acc, q, s, y, 256 * bi + 32 * sub);
                }
            }
            acc_split(&mut a, d * *y.d.get_unchecked(8 * bi), acc);
        }
        hsum(a)
    }

    /// Q6_K: super-blocks of 256 values, `d * sc * (q - 32)` with an i8 `sc`
    /// per 16 values; `y` as for [`q45_k`]. The weights go in as `q`
    /// (0..63; `vpmaddubsw` of `lo` and `q` peaks at 2 * 255 * 63, inside
    /// i16) and the `- 32` meets `y`'s sums per 16 ([`IntRow::sum16`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6_k(row: &[u8], y: &IntRow) -> f32 {
        let (m4, m3) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3));
        let mut a = _mm256_setzero_ps();
        for (bi, blk) in row.chunks_exact(210).enumerate() {
            let p = blk.as_ptr();
            pf::<4>(p);
            let d = f16(p.add(208));
            let sc8 = _mm_loadu_si128(p.add(192) as *const __m128i);
            let sc16 = _mm256_cvtepi8_epi16(sc8);
            let halves = [_mm256_permute2x128_si256(sc16, sc16, 0x00), _mm256_permute2x128_si256(sc16, sc16, 0x11)];
            let s16 = y.sum16.as_ptr().add(16 * bi);
            let off = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8))),
                _mm256_loadu_ps(s16.add(8)),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)), _mm256_loadu_ps(s16)),
            );
            a = _mm256_fmadd_ps(_mm256_set1_ps(-32.0 * d), off, a);
            let mut acc = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (n, &half) in halves.iter().enumerate() {
                let ql_a = _mm256_loadu_si256(p.add(64 * n) as *const __m256i);
                let ql_b = _mm256_loadu_si256(p.add(64 * n + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                let high = |v: __m256i| _mm256_slli_epi16(_mm256_and_si256(v, m3), 4);
                let groups = [
                    _mm256_or_si256(_mm256_and_si256(ql_a, m4), high(qh)),
                    _mm256_or_si256(_mm256_and_si256(ql_b, m4), high(_mm256_srli_epi16(qh, 2))),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql_a, 4), m4), high(_mm256_srli_epi16(qh, 4))),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql_b, 4), m4), high(_mm256_srli_epi16(qh, 6))),
                ];
                for (g, q) in groups.into_iter().enumerate() {
                    let s = _mm256_shuffle_epi8(half, ctrl(&WORD_PAIR[g]));
                    dot32(&mut acc, q, s, y, 256 * bi + 32 * (4 * n + g));
                }
            }
            acc_split(&mut a, d * *y.d.get_unchecked(8 * bi), acc);
        }
        hsum(a)
    }
}
