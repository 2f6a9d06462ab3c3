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
//! super-block, each pre-multiplied by its sub-block's integer scale, add up
//! in i32 and meet the floats once per 256 values instead of once per 32
//! (the worst case, Q6_K's 32 * 128 * 16383 * 32, stays below 2^31).

use crate::quant::GgmlType;

/// An input row quantized in blocks of 32: `x[i] ~ d[i / 32] * q[i]`.
#[derive(Default)]
pub struct IntRow {
    pub q: Vec<i16>,
    /// Per block: the scale `d`.
    pub d: Vec<f32>,
    /// Per block: `d * sum(q)`, the block's sum as the integer dot sees it.
    pub sum: Vec<f32>,
}

/// The largest quantized magnitude: 2^14 - 1, so that the sum of two 8-bit
/// products (255 * 16383 * 2) and of four 4-bit ones stay far inside i32.
const QMAX: f32 = 16383.0;

impl IntRow {
    /// Quantize `x` into `self` with one scale per `span` values (32 or 256;
    /// `x.len()` a multiple of it), reusing its buffers. `d` and `sum` stay
    /// per block of 32 (a span's scale repeated).
    pub fn quantize(&mut self, x: &[f32], span: usize) {
        debug_assert!(span % 32 == 0 && x.len() % span == 0);
        self.q.resize(x.len(), 0);
        self.d.resize(x.len() / 32, 0.0);
        self.sum.resize(x.len() / 32, 0.0);
        for (si, xs) in x.chunks_exact(span).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / QMAX;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (bj, xb) in xs.chunks_exact(32).enumerate() {
                let b = si * span / 32 + bj;
                let mut s = 0i32;
                for (q, &v) in self.q[32 * b..32 * b + 32].iter_mut().zip(xb) {
                    let r = (v * inv).round().clamp(-QMAX, QMAX) as i32;
                    *q = r as i16;
                    s += r;
                }
                self.d[b] = d;
                self.sum[b] = d * s as f32;
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
    assert!(y.q.len() >= cols && group % 32 == 0, "int dot: input of {} values for a row of {cols}", y.q.len());
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
    use crate::quant::ggml::scale_min_k4;

    const PREFETCH: usize = 1024;

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
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
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
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
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
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH) as *const i8);
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

    /// 32 bytes of values (one per byte, below 128) as two i16 halves.
    #[inline(always)]
    unsafe fn widen(v: __m256i) -> (__m256i, __m256i) {
        (_mm256_cvtepu8_epi16(_mm256_castsi256_si128(v)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1)))
    }

    /// Q4_K (or Q5_K, `q5`): super-blocks of 256 values in 8 sub-blocks of
    /// 32, each `d * sc * q - dmin * m` with 6-bit `sc` and `m`. `y` has one
    /// scale per super-block ([`super::span`]): each sub-block's `q * sc`
    /// (at most 31 * 63) meets `yq` in i16 multiply-adds and the super-block
    /// sums in i32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q45_k(row: &[u8], y: &IntRow, q5: bool) -> f32 {
        let ts = if q5 { 176 } else { 144 };
        let m4 = _mm256_set1_epi8(0x0f);
        let one = _mm256_set1_epi8(1);
        let mut a = _mm256_setzero_ps();
        let mut bias = 0f32;
        for (bi, blk) in row.chunks_exact(ts).enumerate() {
            let p = blk.as_ptr();
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            let (d, dmin) = (f16(p), f16(p.add(2)));
            let scales = &blk[4..16];
            let qs = p.add(if q5 { 48 } else { 16 });
            let qh = if q5 { _mm256_loadu_si256(p.add(16) as *const __m256i) } else { _mm256_setzero_si256() };
            let yq = y.q.as_ptr().add(256 * bi) as *const __m256i;
            let ys = y.sum.as_ptr().add(8 * bi);
            let mut acc = _mm256_setzero_si256();
            let mut mins = 0f32;
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
                for (sub, v) in [(2 * c, lo), (2 * c + 1, hi)] {
                    let (sc, m) = scale_min_k4(sub, scales);
                    let s = _mm256_set1_epi16(sc as i16);
                    let (l, h) = widen(v);
                    let p = _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_mullo_epi16(l, s), _mm256_loadu_si256(yq.add(2 * sub))),
                        _mm256_madd_epi16(_mm256_mullo_epi16(h, s), _mm256_loadu_si256(yq.add(2 * sub + 1))),
                    );
                    acc = _mm256_add_epi32(acc, p);
                    mins = (m as f32).mul_add(*ys.add(sub), mins);
                }
            }
            acc_sb(&mut a, d * *y.d.get_unchecked(8 * bi), acc);
            bias = (-dmin).mul_add(mins, bias);
        }
        hsum(a) + bias
    }

    /// `a += s * acc` (a super-block's i32 sums).
    #[inline(always)]
    unsafe fn acc_sb(a: &mut __m256, s: f32, acc: __m256i) {
        *a = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(acc), *a);
    }

    /// Q6_K: super-blocks of 256 values, `d * sc * (q - 32)` with an i8 `sc`
    /// per 16 values; `y` as for [`q45_k`], `(q - 32) * sc` at most 4096.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6_k(row: &[u8], y: &IntRow) -> f32 {
        let (m4, m3, k32) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3), _mm256_set1_epi16(32));
        let mut a = _mm256_setzero_ps();
        for (bi, blk) in row.chunks_exact(210).enumerate() {
            let p = blk.as_ptr();
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            let d = f16(p.add(208));
            let yq = y.q.as_ptr().add(256 * bi) as *const __m256i;
            let mut acc = _mm256_setzero_si256();
            for n in 0..2 {
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
                for (g, v) in groups.into_iter().enumerate() {
                    let b = 4 * n + g;
                    let (l, h) = widen(v);
                    let sc = p.add(192 + 2 * b) as *const i8;
                    let (sl, sh) = (_mm256_set1_epi16(*sc as i16), _mm256_set1_epi16(*sc.add(1) as i16));
                    let pl = _mm256_madd_epi16(
                        _mm256_mullo_epi16(_mm256_sub_epi16(l, k32), sl),
                        _mm256_loadu_si256(yq.add(2 * b)),
                    );
                    let ph = _mm256_madd_epi16(
                        _mm256_mullo_epi16(_mm256_sub_epi16(h, k32), sh),
                        _mm256_loadu_si256(yq.add(2 * b + 1)),
                    );
                    acc = _mm256_add_epi32(acc, _mm256_add_epi32(pl, ph));
                }
            }
            acc_sb(&mut a, d * *y.d.get_unchecked(8 * bi), acc);
        }
        hsum(a)
    }
}
