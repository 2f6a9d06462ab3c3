//! Hand-written AVX2/FMA row kernels for the packed formats that decide CPU
//! decode speed (ggml Q4_0/Q4_1/Q8_0, MLX affine 4- and 8-bit). Each block of
//! 32 weights is widened to f32 in registers, dequantized with one FMA and
//! multiplied into four independent 8-lane accumulators.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// How far ahead of the current block to prefetch (bytes). Prefetching past
/// the end of a row is harmless (it is a hint) and warms the next row.
const PREFETCH: usize = 1024;

/// Horizontal sum of one accumulator's 8 lanes (the CPU kernels' one reduction).
#[inline(always)]
pub(super) unsafe fn hsum8(a: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}

/// Horizontal maximum of 8 lanes.
#[inline(always)]
pub(super) unsafe fn hmax8(a: __m256) -> f32 {
    let h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}

/// Horizontal sum of four accumulators.
#[inline(always)]
unsafe fn hsum(a: [__m256; 4]) -> f32 {
    hsum8(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])))
}

/// 8 bytes at `p` widened to 8 f32 (unsigned).
#[inline(always)]
unsafe fn u8x8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

/// `acc[k] += (q[k] * s + b) * x[8k..8k+8]` for the four 8-value parts of a block.
#[inline(always)]
unsafe fn accum(acc: &mut [__m256; 4], q: [__m256; 4], s: __m256, b: __m256, x: *const f32) {
    for k in 0..4 {
        let w = _mm256_fmadd_ps(q[k], s, b);
        acc[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.add(8 * k)), acc[k]);
    }
}

/// The f16 at byte `i` of a block, converted with F16C.
#[inline(always)]
unsafe fn f16(b: &[u8], i: usize) -> f32 {
    assert!(i + 2 <= b.len());
    f16_at(b.as_ptr().add(i))
}

/// The little-endian f16 at `p`, converted with F16C. In assembly because the
/// compiler turned the obvious intrinsics into a 16-bit insert into whatever
/// vector register it liked (`vpinsrw $0, (p), %xmm0, %xmm3`), so each block's
/// scale waited on the last writer of that register: in the integer dot
/// kernels the previous block's bias FMA, a chain of about 20 cycles a block.
/// `vmovd` from a general register writes the whole vector register.
///
/// # Safety
/// F16C is available and `p` points to two readable bytes.
#[inline(always)]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    let f: f32;
    std::arch::asm!(
        "movzx {t:e}, word ptr [{p}]",
        "vmovd {x}, {t:e}",
        "vcvtph2ps {x}, {x}",
        p = in(reg) p,
        t = out(reg) _,
        x = out(xmm_reg) f,
        options(pure, readonly, nostack, preserves_flags),
    );
    f
}

/// Block `blk` of Q4_0 (`bias = -8 d`) or Q4_1 (`bias = m`): its 32 values as
/// four 8-lane parts (values 8k..8k+8 in part k), the scale and the bias.
#[inline(always)]
unsafe fn q4_block(blk: &[u8], q4_1: bool) -> ([__m256; 4], __m256, __m256) {
    let mask = _mm_set1_epi8(0x0f);
    let d = f16(blk, 0);
    let bias = if q4_1 { f16(blk, 2) } else { -8.0 * d };
    let qs = _mm_loadu_si128(blk.as_ptr().add(if q4_1 { 4 } else { 2 }) as *const __m128i);
    let lo = _mm_and_si128(qs, mask); // values 0..15
    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask); // values 16..31
    let q = [u8x8(lo), u8x8(_mm_srli_si128(lo, 8)), u8x8(hi), u8x8(_mm_srli_si128(hi, 8))];
    (q, _mm256_set1_ps(d), _mm256_set1_ps(bias))
}

/// Block `blk` of Q8_0: its 32 values as four 8-lane parts and the scale.
#[inline(always)]
unsafe fn q8_0_block(blk: &[u8]) -> ([__m256; 4], __m256) {
    let p = blk.as_ptr().add(2);
    let mut q = [_mm256_setzero_ps(); 4];
    for (k, qk) in q.iter_mut().enumerate() {
        let v = _mm_loadl_epi64(p.add(8 * k) as *const __m128i);
        *qk = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    }
    (q, _mm256_set1_ps(f16(blk, 0)))
}

/// Values 32c..32c+32 of an MLX affine 4- or 8-bit row as four 8-lane parts.
#[inline(always)]
unsafe fn affine_chunk(bytes: *const u8, c: usize, bits: u32) -> [__m256; 4] {
    if bits == 4 {
        // byte k holds values 2k (low nibble) and 2k+1 (high nibble)
        let mask = _mm_set1_epi8(0x0f);
        let v = _mm_loadu_si128(bytes.add(16 * c) as *const __m128i);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        let a = _mm_unpacklo_epi8(lo, hi); // values 0..15
        let z = _mm_unpackhi_epi8(lo, hi); // values 16..31
        [u8x8(a), u8x8(_mm_srli_si128(a, 8)), u8x8(z), u8x8(_mm_srli_si128(z, 8))]
    } else {
        let p = bytes.add(32 * c);
        [
            u8x8(_mm_loadl_epi64(p as *const __m128i)),
            u8x8(_mm_loadl_epi64(p.add(8) as *const __m128i)),
            u8x8(_mm_loadl_epi64(p.add(16) as *const __m128i)),
            u8x8(_mm_loadl_epi64(p.add(24) as *const __m128i)),
        ]
    }
}

/// Q4_0 / Q4_1 block size in bytes.
fn q4_block_bytes(q4_1: bool) -> usize {
    if q4_1 {
        20
    } else {
        18
    }
}

/// One row of Q4_0 (`bias = -8 d`) or Q4_1 (`bias = m`) blocks.
///
/// # Safety
/// The processor supports AVX2, FMA and F16C; `x.len() >= 32 * blocks`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_row(row: &[u8], x: &[f32], q4_1: bool) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (bi, blk) in row.chunks_exact(q4_block_bytes(q4_1)).enumerate() {
        // the hardware prefetcher alone leaves these loads waiting on memory
        _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(PREFETCH) as *const i8);
        let (q, d, bias) = q4_block(blk, q4_1);
        accum(&mut acc, q, d, bias, x.as_ptr().add(32 * bi));
    }
    hsum(acc)
}

/// One row of Q8_0 blocks.
///
/// # Safety
/// As [`q4_row`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_0_row(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (bi, blk) in row.chunks_exact(34).enumerate() {
        _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(PREFETCH) as *const i8);
        let (q, d) = q8_0_block(blk);
        accum(&mut acc, q, d, _mm256_setzero_ps(), x.as_ptr().add(32 * bi));
    }
    hsum(acc)
}

/// One row of MLX affine 4-bit (`bits == 4`) or 8-bit (`bits == 8`) words;
/// `sb(g)` gives group g's scale and bias.
///
/// # Safety
/// As [`q4_row`]; `words` holds `cols * bits / 32` words, `group % 32 == 0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn affine_row(words: &[u32], x: &[f32], bits: u32, group: usize, sb: impl Fn(usize) -> (f32, f32)) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let bytes = words.as_ptr() as *const u8;
    let chunks = words.len() * 32 / bits as usize / 32;
    let per_group = group / 32;
    for g in 0..chunks / per_group {
        let (sc, bi) = sb(g);
        let (s, b) = (_mm256_set1_ps(sc), _mm256_set1_ps(bi));
        for c in g * per_group..(g + 1) * per_group {
            _mm_prefetch::<_MM_HINT_T0>(bytes.wrapping_add(bits as usize * 4 * c + PREFETCH) as *const i8);
            accum(&mut acc, affine_chunk(bytes, c, bits), s, b, x.as_ptr().add(32 * c));
        }
    }
    hsum(acc)
}

// Several inputs against one packed row (speculative verify passes): the row
// is dequantized once into f32 with the very FMA the row kernels above use
// (the same block decoders), then [`dot_blocks`] multiplies it into each
// input with their accumulation, so every result is bitwise the row kernel's.

/// `out = q * d + bias` for a row of Q4_0 / Q4_1 blocks, as [`q4_row`] computes it.
///
/// # Safety
/// As [`q4_row`]; `out.len() >= 32 * blocks`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_dequant(row: &[u8], q4_1: bool, out: &mut [f32]) {
    for (bi, blk) in row.chunks_exact(q4_block_bytes(q4_1)).enumerate() {
        let (q, d, bias) = q4_block(blk, q4_1);
        store(q, d, bias, out.as_mut_ptr().add(32 * bi));
    }
}

/// `out = q * d` for a row of Q8_0 blocks, as [`q8_0_row`] computes it.
///
/// # Safety
/// As [`q4_dequant`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_0_dequant(row: &[u8], out: &mut [f32]) {
    for (bi, blk) in row.chunks_exact(34).enumerate() {
        let (q, d) = q8_0_block(blk);
        store(q, d, _mm256_setzero_ps(), out.as_mut_ptr().add(32 * bi));
    }
}

/// `out = q * s + b` for a row of MLX affine 4- or 8-bit words, as [`affine_row`] computes it.
///
/// # Safety
/// As [`affine_row`]; `out.len() >= cols`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn affine_dequant(
    words: &[u32],
    bits: u32,
    group: usize,
    sb: impl Fn(usize) -> (f32, f32),
    out: &mut [f32],
) {
    let bytes = words.as_ptr() as *const u8;
    let chunks = words.len() * 32 / bits as usize / 32;
    let per_group = group / 32;
    for g in 0..chunks / per_group {
        let (sc, bi) = sb(g);
        let (s, b) = (_mm256_set1_ps(sc), _mm256_set1_ps(bi));
        for c in g * per_group..(g + 1) * per_group {
            store(affine_chunk(bytes, c, bits), s, b, out.as_mut_ptr().add(32 * c));
        }
    }
}

/// The dequantized values of one block: `out[8k..8k+8] = q[k] * s + b`.
#[inline(always)]
unsafe fn store(q: [__m256; 4], s: __m256, b: __m256, out: *mut f32) {
    for (k, &qk) in q.iter().enumerate() {
        _mm256_storeu_ps(out.add(8 * k), _mm256_fmadd_ps(qk, s, b));
    }
}

/// The row kernels' accumulation over dequantized values `w` (blocks of 32;
/// part k of every block into accumulator k, then [`hsum`]).
///
/// # Safety
/// AVX2 and FMA are present; `w` and `x` hold at least `w.len() / 32 * 32` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_blocks(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    for bi in 0..w.len() / 32 {
        for (k, a) in acc.iter_mut().enumerate() {
            let o = 32 * bi + 8 * k;
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(o)), _mm256_loadu_ps(xp.add(o)), *a);
        }
    }
    hsum(acc)
}

/// [`dot_blocks`] for two inputs at once: eight independent FMA chains keep
/// both FMA units busy; each result is bitwise [`dot_blocks`]'s.
///
/// # Safety
/// As [`dot_blocks`], for both inputs.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_blocks2(w: &[f32], x0: &[f32], x1: &[f32]) -> (f32, f32) {
    let (mut a, mut b) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
    let (wp, p0, p1) = (w.as_ptr(), x0.as_ptr(), x1.as_ptr());
    for bi in 0..w.len() / 32 {
        for k in 0..4 {
            let o = 32 * bi + 8 * k;
            let wv = _mm256_loadu_ps(wp.add(o));
            a[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p0.add(o)), a[k]);
            b[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p1.add(o)), b[k]);
        }
    }
    (hsum(a), hsum(b))
}

/// `out[i] = dot_blocks(w, xs[i])`, two inputs at a time.
///
/// # Safety
/// As [`dot_blocks`], for every input.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_blocks_all(w: &[f32], xs: &[&[f32]], out: &mut [f32]) {
    let mut i = 0;
    while i + 1 < xs.len() {
        (out[i], out[i + 1]) = dot_blocks2(w, xs[i], xs[i + 1]);
        i += 2;
    }
    if i < xs.len() {
        out[i] = dot_blocks(w, xs[i]);
    }
}
