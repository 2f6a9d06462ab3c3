//! The decode integer dot product eight weight rows at a time, for Q4_0,
//! Q4_1 and MLX affine 4-bit: the per-block float work (scale, conversion,
//! FMA), which the one-row kernel ([`super::intdot`]) spends on every block
//! of every row, happens once per block for eight rows, one row per lane.
//!
//! Per row and block of 32 the nibbles go in as bytes, unwidened: `vpmaddubsw`
//! meets them with the input's signed high and unsigned low bytes
//! ([`IntRow::hi`], `lo`), and two `vpmaddwd` join the halves as
//! `256 * hi + lo` in i32: the exact integer sum the one-row kernel forms
//! with int16 multiply-adds. Eight rows' i32 lanes then fold into one vector
//! (row `r` in lane `r`), which meets the eight rows' scales in one FMA.
//! MLX 4-bit bytes hold values `2i` and `2i + 1` in their low and high
//! nibbles, so its kernel meets the input's bytes in that order
//! ([`IntRow::hi_mlx`], `lo_mlx`) and takes the weights as they are.
//!
//! The eight rows are `8 * rb` bytes back to back; while reading them the
//! kernels prefetch the next eight rows as one stream, as many lines per
//! block as the eight rows' block takes (three for Q4_0's `8 * 18` bytes and
//! Q4_1's `8 * 20`, two for MLX's `8 * 16`). Prefetching each row 4096 bytes
//! ahead, as the one-row kernel does, gave 31-34 G values/s on two threads
//! streaming Q4_0 from memory, the one stream 38 (development machine,
//! interleaved in one process).

use super::intdot::IntRow;
use super::quant::Floats;
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
    let blocks = check_ggml(ty, rows, rb, std::slice::from_ref(y));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA/F16C are present (supported) and rows, y hold what is read.
    unsafe {
        // one input stays on AVX2: VNNI measured 1.13x on the kernel alone but no gain in
        // decode (docs/benchmark_results/cpu-int-dot-rows-2026-12-08.md)
        *out = x86::q4(rows.as_ptr(), rb, blocks, y, ty == GgmlType::Q4_1)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// What the GGUF kernels read is there: returns the blocks a row has.
fn check_ggml(ty: GgmlType, rows: &[u8], rb: usize, ys: &[IntRow]) -> usize {
    assert!(supported(ty), "int dot: {} has no eight-row kernel here", ty.name());
    assert!(rows.len() >= ROWS * rb, "int dot: {} bytes for eight rows of {rb}", rows.len());
    assert!(ys.len() <= MAX_INPUTS, "int dot: {} inputs", ys.len());
    let blocks = rb / ty.type_size();
    for y in ys {
        assert!(
            y.d.len() >= blocks && y.hi.len() >= 32 * blocks,
            "int dot: input shorter than a row of {blocks} blocks"
        );
    }
    blocks
}

/// What the MLX kernels read is there: returns the blocks a row has.
fn check_affine(words: &[u32], wpr: usize, group: usize, scales: Floats, biases: Floats, ys: &[IntRow]) -> usize {
    assert!(affine_supported(4), "int dot: no eight-row affine kernel here");
    assert!(
        words.len() >= ROWS * wpr && group.is_multiple_of(32),
        "int dot: {} words for eight rows of {wpr}",
        words.len()
    );
    assert!(ys.len() <= MAX_INPUTS, "int dot: {} inputs", ys.len());
    let (blocks, gpr) = (wpr / 4, wpr * 8 / group);
    assert!(scales.len() >= ROWS * gpr && biases.len() >= ROWS * gpr, "int dot: scales for fewer than eight rows");
    for y in ys {
        assert!(
            y.d.len() >= blocks && y.hi_mlx.len() >= 32 * blocks,
            "int dot: input shorter than a row of {blocks} blocks"
        );
    }
    blocks
}

/// Inputs one call of [`ggml_dot8_rows`] or [`affine_dot8_rows`] takes.
pub const MAX_INPUTS: usize = crate::backend::ROW_EXACT_MAX;

/// [`ggml_dot8`] of rows `0..8` against each input of `ys` (at most
/// [`MAX_INPUTS`]) into `out[i]`, bitwise the values [`ggml_dot8`] gives for
/// each: the same operations in the same order, with the eight rows'
/// nibbles of a block unpacked once for every input (a batched decode step,
/// a speculative verify pass).
///
/// # Panics
/// As [`ggml_dot8`], or if `out` is shorter than `ys` or `ys` longer than
/// [`MAX_INPUTS`].
pub fn ggml_dot8_rows(ty: GgmlType, rows: &[u8], rb: usize, ys: &[IntRow], out: &mut [[f32; ROWS]]) {
    let blocks = check_ggml(ty, rows, rb, ys);
    assert!(out.len() >= ys.len(), "int dot: {} outputs for {} inputs", out.len(), ys.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA/F16C are present (supported), AVX-512 VNNI/VL where
    // `vnni` says so, and rows, ys hold what is read.
    unsafe {
        let (p, q4_1) = (rows.as_ptr(), ty == GgmlType::Q4_1);
        if vnni() {
            x86::q4_rows_vnni(p, rb, blocks, ys, q4_1, out)
        } else {
            x86::q4_rows(p, rb, blocks, ys, q4_1, out)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// Whether this processor has AVX-512 VNNI and VL (`vpdpbusd` on 256-bit
/// registers), which the multi-row kernels use for their integer sums
/// (`FUSEBOX_CPU_VNNI=0` keeps them on AVX2; the sums are exact either way,
/// so the outputs are the same bits).
pub fn vnni() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var("FUSEBOX_CPU_VNNI").map_or(true, |v| v != "0")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether [`affine_dot8`] takes this bit width (on this processor).
pub fn affine_supported(bits: u32) -> bool {
    bits == 4 && super::intdot::affine_supported(bits)
}

/// Rows `0..8` of MLX affine 4-bit `words` (`wpr` words a row, back to back)
/// against `y`, into `out`, with groups of `group` values (a multiple of 32)
/// whose scales and biases are `scales` and `biases` (eight rows of `gpr`
/// groups back to back).
///
/// # Panics
/// If [`affine_supported`] is false for 4 bits, the scales, biases or
/// `words` hold fewer than eight rows, or `y` is shorter than a row.
pub fn affine_dot8(
    words: &[u32],
    wpr: usize,
    group: usize,
    scales: Floats,
    biases: Floats,
    y: &IntRow,
    out: &mut [f32; ROWS],
) {
    let blocks = check_affine(words, wpr, group, scales, biases, std::slice::from_ref(y));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA/F16C are present (affine_supported) and words, scales, biases, y hold what is read.
    unsafe {
        *out = x86::affine4(words.as_ptr() as *const u8, 4 * wpr, blocks, group / 32, scales, biases, y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// [`affine_dot8`] against each input of `ys` (at most [`MAX_INPUTS`])
/// into `out[i]`, bitwise the values [`affine_dot8`] gives for each, the
/// nibbles of a block unpacked once for every input.
///
/// # Panics
/// As [`affine_dot8`], or if `out` is shorter than `ys` or `ys` longer than
/// [`MAX_INPUTS`].
pub fn affine_dot8_rows(
    words: &[u32],
    wpr: usize,
    group: usize,
    scales: Floats,
    biases: Floats,
    ys: &[IntRow],
    out: &mut [[f32; ROWS]],
) {
    let blocks = check_affine(words, wpr, group, scales, biases, ys);
    assert!(out.len() >= ys.len(), "int dot: {} outputs for {} inputs", out.len(), ys.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA/F16C are present (affine_supported), AVX-512 VNNI/VL
    // where `vnni` says so, and words, scales, biases, ys hold what is read.
    unsafe {
        let (p, per_group) = (words.as_ptr() as *const u8, group / 32);
        if vnni() {
            x86::affine4_rows_vnni(p, 4 * wpr, blocks, per_group, scales, biases, ys, out)
        } else {
            x86::affine4_rows(p, 4 * wpr, blocks, per_group, scales, biases, ys, out)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Floats, IntRow, ROWS};

    /// Lane `r` of the result: the sum of the eight i32 lanes of `s[r]`.
    #[inline(always)]
    unsafe fn fold(s: [__m256i; ROWS]) -> __m256i {
        let pair = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        let quad = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
        let lo = quad(pair(s[0], s[1]), pair(s[2], s[3]));
        let hi = quad(pair(s[4], s[5]), pair(s[6], s[7]));
        _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31))
    }

    /// The 32 nibbles at `p` as bytes: the low nibbles of its 16 bytes
    /// first, then the high ones.
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> __m256i {
        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
        _mm256_and_si256(_mm256_blend_epi32::<0xf0>(v, _mm256_srli_epi16(v, 4)), _mm256_set1_epi8(0x0f))
    }

    /// The 8 i32 lanes of `sum(q * y)` over 32 weights `q` ([`unpack`])
    /// against the input's bytes `yh`, `yl` in that order.
    #[inline(always)]
    unsafe fn qdot(q: __m256i, yh: __m256i, yl: __m256i) -> __m256i {
        let (ph, pl) = (_mm256_maddubs_epi16(q, yh), _mm256_maddubs_epi16(yl, q));
        _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(256)), _mm256_madd_epi16(pl, _mm256_set1_epi16(1)))
    }

    /// [`qdot`] with AVX-512 VNNI: `vpdpbusd` sums four byte products into
    /// each i32 lane, the lanes `vpmaddubsw` then `vpmaddwd` form, exactly
    /// (no i16 step to saturate).
    #[inline(always)]
    unsafe fn qdot_vnni(q: __m256i, yh: __m256i, yl: __m256i) -> __m256i {
        let h = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, yh);
        _mm256_dpbusd_epi32(_mm256_slli_epi32::<8>(h), yl, q)
    }

    /// Q4_0 / Q4_1 (`q4_1`) rows against each of `ys`: per block the eight
    /// rows' nibbles are unpacked once, then each input's products, the fold
    /// of the eight rows' lanes, the conversion and the scale FMAs, in that
    /// order (a row's value depends on its input alone: [`q4`] is this with
    /// one input).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_rows(p: *const u8, rb: usize, blocks: usize, ys: &[IntRow], q4_1: bool, out: &mut [[f32; ROWS]]) {
        q4_rows_body::<false>(p, rb, blocks, ys, q4_1, out)
    }

    /// [`q4_rows`] with the products on AVX-512 VNNI ([`qdot_vnni`]), and
    /// the 32 vector registers AVX-512 gives.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn q4_rows_vnni(
        p: *const u8,
        rb: usize,
        blocks: usize,
        ys: &[IntRow],
        q4_1: bool,
        out: &mut [[f32; ROWS]],
    ) {
        q4_rows_body::<true>(p, rb, blocks, ys, q4_1, out)
    }

    #[inline(always)]
    unsafe fn q4_rows_body<const VNNI: bool>(
        p: *const u8,
        rb: usize,
        blocks: usize,
        ys: &[IntRow],
        q4_1: bool,
        out: &mut [[f32; ROWS]],
    ) {
        let (ts, qo) = if q4_1 { (20, 4) } else { (18, 2) };
        let mut acc = [_mm256_setzero_ps(); super::MAX_INPUTS];
        for b in 0..blocks {
            let mut q = [_mm256_setzero_si256(); ROWS];
            for (r, q) in q.iter_mut().enumerate() {
                if r < 3 {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ROWS * (rb + b * ts) + 64 * r) as *const i8);
                }
                *q = unpack(p.add(r * rb + b * ts + qo));
            }
            let d = f16x8(p, rb, b * ts);
            let m = if q4_1 { f16x8(p, rb, b * ts + 2) } else { _mm256_setzero_ps() };
            for (y, acc) in ys.iter().zip(acc.iter_mut()) {
                let yh = _mm256_loadu_si256(y.hi.as_ptr().add(32 * b) as *const __m256i);
                let yl = _mm256_loadu_si256(y.lo.as_ptr().add(32 * b) as *const __m256i);
                let mut s = [_mm256_setzero_si256(); ROWS];
                for (s, &q) in s.iter_mut().zip(&q) {
                    *s = if VNNI { qdot_vnni(q, yh, yl) } else { qdot(q, yh, yl) };
                }
                let dot = _mm256_cvtepi32_ps(fold(s));
                let (dy, ysum) = (*y.d.get_unchecked(b), *y.sum.get_unchecked(b));
                if q4_1 {
                    *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(dy)), dot, *acc);
                    *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(ysum), *acc);
                } else {
                    let v = _mm256_fmadd_ps(dot, _mm256_set1_ps(dy), _mm256_set1_ps(-8.0 * ysum));
                    *acc = _mm256_fmadd_ps(d, v, *acc);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc[..ys.len()]) {
            _mm256_storeu_ps(o.as_mut_ptr(), *a);
        }
    }

    /// MLX affine 4-bit: `rb` bytes a row, `per_group` blocks of 32 a
    /// group, `s * dy * dot + b * ysum` per block with the group's `s`, `b`
    /// ([`affine4_rows`] with one input).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn affine4(
        p: *const u8,
        rb: usize,
        blocks: usize,
        per_group: usize,
        scales: Floats,
        biases: Floats,
        y: &IntRow,
    ) -> [f32; ROWS] {
        let mut out = [[0f32; ROWS]];
        affine4_rows_body::<false>(p, rb, blocks, per_group, scales, biases, std::slice::from_ref(y), &mut out);
        out[0]
    }

    /// [`affine4`] against each of `ys`, the nibbles unpacked once per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn affine4_rows(
        p: *const u8,
        rb: usize,
        blocks: usize,
        per_group: usize,
        scales: Floats,
        biases: Floats,
        ys: &[IntRow],
        out: &mut [[f32; ROWS]],
    ) {
        affine4_rows_body::<false>(p, rb, blocks, per_group, scales, biases, ys, out)
    }

    /// [`affine4_rows`] with the products on AVX-512 VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn affine4_rows_vnni(
        p: *const u8,
        rb: usize,
        blocks: usize,
        per_group: usize,
        scales: Floats,
        biases: Floats,
        ys: &[IntRow],
        out: &mut [[f32; ROWS]],
    ) {
        affine4_rows_body::<true>(p, rb, blocks, per_group, scales, biases, ys, out)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn affine4_rows_body<const VNNI: bool>(
        p: *const u8,
        rb: usize,
        blocks: usize,
        per_group: usize,
        scales: Floats,
        biases: Floats,
        ys: &[IntRow],
        out: &mut [[f32; ROWS]],
    ) {
        let gpr = blocks / per_group;
        let mut acc = [_mm256_setzero_ps(); super::MAX_INPUTS];
        for g in 0..gpr {
            let (sc, bi) = (lanes(scales, g, gpr), lanes(biases, g, gpr));
            for b in g * per_group..(g + 1) * per_group {
                let mut q = [_mm256_setzero_si256(); ROWS];
                for (r, q) in q.iter_mut().enumerate() {
                    if r < 2 {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ROWS * (rb + b * 16) + 64 * r) as *const i8);
                    }
                    *q = unpack(p.add(r * rb + b * 16));
                }
                for (y, acc) in ys.iter().zip(acc.iter_mut()) {
                    let yh = _mm256_loadu_si256(y.hi_mlx.as_ptr().add(32 * b) as *const __m256i);
                    let yl = _mm256_loadu_si256(y.lo_mlx.as_ptr().add(32 * b) as *const __m256i);
                    let mut s = [_mm256_setzero_si256(); ROWS];
                    for (s, &q) in s.iter_mut().zip(&q) {
                        *s = if VNNI { qdot_vnni(q, yh, yl) } else { qdot(q, yh, yl) };
                    }
                    let dot = _mm256_cvtepi32_ps(fold(s));
                    let (dy, ysum) = (*y.d.get_unchecked(b), *y.sum.get_unchecked(b));
                    *acc = _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(dy)), dot, *acc);
                    *acc = _mm256_fmadd_ps(bi, _mm256_set1_ps(ysum), *acc);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc[..ys.len()]) {
            _mm256_storeu_ps(o.as_mut_ptr(), *a);
        }
    }

    /// Element `g` of each of the eight rows of `v` (`stride` apart), as f32 lanes.
    #[inline(always)]
    unsafe fn lanes(v: Floats, g: usize, stride: usize) -> __m256 {
        match v {
            Floats::F32(v) => {
                let e = |r: usize| *v.get_unchecked(r * stride + g);
                _mm256_set_ps(e(7), e(6), e(5), e(4), e(3), e(2), e(1), e(0))
            }
            Floats::Bf16(v) => {
                let h = halves(v, g, stride);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
            Floats::F16(v) => _mm256_cvtph_ps(halves(v, g, stride)),
        }
    }

    #[inline(always)]
    unsafe fn halves(v: &[u16], g: usize, stride: usize) -> __m128i {
        let e = |r: usize| *v.get_unchecked(r * stride + g) as i16;
        _mm_set_epi16(e(7), e(6), e(5), e(4), e(3), e(2), e(1), e(0))
    }

    /// The f16 at byte `at` of each of the eight rows, as f32 lanes.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8, rb: usize, at: usize) -> __m256 {
        let h = |r: usize| (p.add(r * rb + at) as *const i16).read_unaligned();
        _mm256_cvtph_ps(_mm_set_epi16(h(7), h(6), h(5), h(4), h(3), h(2), h(1), h(0)))
    }

    /// One input's [`q4_rows`] (the decode step).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4(p: *const u8, rb: usize, blocks: usize, y: &IntRow, q4_1: bool) -> [f32; ROWS] {
        let mut out = [[0f32; ROWS]];
        q4_rows_body::<false>(p, rb, blocks, std::slice::from_ref(y), q4_1, &mut out);
        out[0]
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Random bytes and inputs: the VNNI kernels give the AVX2 kernels' bits
    /// (the integer sums are exact both ways), for one input and several.
    #[test]
    fn vnni_kernels_give_the_avx2_bits() {
        if !(supported(GgmlType::Q4_0)
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl"))
        {
            eprintln!("skipped: this processor has no AVX-512 VNNI");
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let cols = 256;
        let ys: Vec<IntRow> = (0..5)
            .map(|_| {
                let x: Vec<f32> = (0..cols).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                let mut y = IntRow::default();
                y.quantize(&x, 32);
                y
            })
            .collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let rb = ty.row_bytes(cols);
            // random bytes with small f16 scales (0x2000-0x27ff: about 0.008-0.03)
            let mut rows: Vec<u8> = (0..ROWS * rb).map(|_| next() as u8).collect();
            for r in 0..ROWS {
                for b in 0..rb / ty.type_size() {
                    let at = r * rb + b * ty.type_size();
                    let n = if ty == GgmlType::Q4_1 { 2 } else { 1 };
                    for h in 0..n {
                        rows[at + 2 * h + 1] = 0x20 | (rows[at + 2 * h + 1] & 0x07);
                    }
                }
            }
            let mut multi = [[0f32; ROWS]; 5];
            // SAFETY: the processor has AVX2/FMA/F16C (supported) and AVX-512 VNNI/VL (checked above).
            unsafe { x86::q4_rows_vnni(rows.as_ptr(), rb, cols / 32, &ys, ty == GgmlType::Q4_1, &mut multi) };
            for (y, m) in ys.iter().zip(&multi) {
                // SAFETY: as above.
                let one = unsafe { x86::q4(rows.as_ptr(), rb, cols / 32, y, ty == GgmlType::Q4_1) };
                assert_eq!(one.map(f32::to_bits), m.map(f32::to_bits), "{}", ty.name());
                assert!(one.iter().all(|v| v.is_finite()));
            }
        }
    }
}
