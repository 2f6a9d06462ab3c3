//! The CPU attention's inner loops over the cached keys and values of one
//! head: scores (the prefill product's tile, one query against four keys) and
//! the weighted sum of values, four cache rows at a time, so
//! that each loaded vector of the query (or of the output) serves four rows
//! instead of one (one `dot_f32` / `axpy` call per row reloaded it and
//! reduced each score across lanes separately).

use super::kernels::{axpy, dot_f32};

/// `s[t] = q . k_t * scale` for the rows `k_t = keys[t * stride..][..d]`.
pub fn scores(q: &[f32], keys: &[f32], stride: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() {
        let n = s.len();
        let mut t = 0;
        while t + 4 <= n {
            // SAFETY: AVX2/FMA are present (the tile checks its rows' bounds).
            let [v] = unsafe { super::gemm::x86::tile::<1>(q, d, 0, &keys[t * stride..], stride, 0, d) };
            for (i, x) in v.iter().enumerate() {
                s[t + i] = x * scale;
            }
            t += 4;
        }
        for (i, st) in s.iter_mut().enumerate().skip(t) {
            *st = dot_f32(q, &keys[i * stride..i * stride + d]) * scale;
        }
        return;
    }
    for (t, st) in s.iter_mut().enumerate() {
        *st = dot_f32(q, &keys[t * stride..t * stride + d]) * scale;
    }
}

/// `o += sum_t p[t] * v_t` for the rows `v_t = values[t * stride..][..d]`,
/// rows four at a time from the first, then one at a time.
pub fn weighted_sum_acc(p: &[f32], values: &[f32], stride: usize, o: &mut [f32]) {
    let d = o.len();
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() && d.is_multiple_of(8) {
        let n = p.len();
        assert!(n == 0 || (n - 1) * stride + d <= values.len(), "attention values: rows past the cache");
        let mut t = 0;
        while t + 4 <= n {
            // SAFETY: AVX2/FMA are present; rows t..t+4 lie inside `values`; d % 8 == 0.
            unsafe { x86::axpy4(&p[t..t + 4], values.as_ptr().add(t * stride), stride, o) };
            t += 4;
        }
        for (i, &pi) in p.iter().enumerate().skip(t) {
            axpy(pi, &values[i * stride..i * stride + d], o);
        }
        return;
    }
    for (t, &pt) in p.iter().enumerate() {
        axpy(pt, &values[t * stride..t * stride + d], o);
    }
}

/// [`scores`] against keys stored as f16 (`FUSEBOX_KV_DTYPE=f16`): bitwise
/// what [`scores`] gives on the same values widened to f32.
pub fn scores_f16(q: &[f32], keys: &[u16], stride: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    let n = s.len();
    assert!(n == 0 || (n - 1) * stride + d <= keys.len(), "attention keys: rows past the cache");
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() {
        while t + 4 <= n {
            prefetch_rows(keys, (t + AHEAD) * stride, stride, 4, d);
            // SAFETY: AVX2/FMA/F16C are present (has_avx2_fma checks all three); rows t..t+4 lie inside `keys` (asserted above).
            let v = unsafe { x86::dot4_f16(q, keys.as_ptr().add(t * stride), stride) };
            for (i, x) in v.iter().enumerate() {
                s[t + i] = x * scale;
            }
            t += 4;
        }
    }
    let mut row = [0f32; super::MAX_HEAD_DIM];
    let wide = &mut row[..d];
    for (i, st) in s.iter_mut().enumerate().skip(t) {
        widen(&keys[i * stride..i * stride + d], wide);
        *st = dot_f32(q, wide) * scale;
    }
}

/// [`weighted_sum_acc`] of values stored as f16: bitwise what it gives on
/// the same values widened to f32.
pub fn weighted_sum_f16_acc(p: &[f32], values: &[u16], stride: usize, o: &mut [f32]) {
    let d = o.len();
    let n = p.len();
    assert!(n == 0 || (n - 1) * stride + d <= values.len(), "attention values: rows past the cache");
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() && d.is_multiple_of(8) {
        while t + 4 <= n {
            prefetch_rows(values, (t + AHEAD) * stride, stride, 4, d);
            // SAFETY: AVX2/FMA/F16C are present (has_avx2_fma checks all three); rows t..t+4 lie inside `values`; d % 8 == 0.
            unsafe { x86::axpy4_f16(&p[t..t + 4], values.as_ptr().add(t * stride), stride, o) };
            t += 4;
        }
    }
    let mut row = [0f32; super::MAX_HEAD_DIM];
    let wide = &mut row[..d];
    for (i, &pi) in p.iter().enumerate().skip(t) {
        widen(&values[i * stride..i * stride + d], wide);
        axpy(pi, wide, o);
    }
}

/// Rows ahead of the one being read that the f16 loops ask the cache for:
/// a head's rows sit `stride` apart (all kv heads of a position between
/// them), a few to a 4 KB page, where the hardware prefetcher stops. A small
/// gain on the 2-core EPYC: a layer's decode attention 2-12% faster at 512
/// positions, -2 to 8% at 1024 (docs/benchmark_results/cpu-attention-prefetch-2026-12-07.md);
/// 4 rows ahead measured the same, 16 worse, and the same prefetch in the f32
/// loops (rows twice as long) measured a loss at 1024 positions, so they go
/// without.
const AHEAD: usize = 8;

/// Prefetch `rows` rows of `d` f16 values starting at `at` (`stride`
/// apart), a 64-byte line at a time; rows past the slice are skipped.
#[inline(always)]
fn prefetch_rows(src: &[u16], at: usize, stride: usize, rows: usize, d: usize) {
    #[cfg(target_arch = "x86_64")]
    for r in 0..rows {
        let start = at + r * stride;
        if start + d > src.len() {
            return;
        }
        for off in (0..d).step_by(32) {
            // SAFETY: prefetching never faults; start + off lies inside `src`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    src.as_ptr().add(start + off) as *const i8
                )
            };
        }
    }
}

/// f16 words to f32 (exact), through the `half` crate's slice conversion.
fn widen(src: &[u16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    bytemuck::cast_slice::<u16, half::f16>(src).convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `o += sum_c p[c] * row_c` for the four rows at `v + c * stride`.
    ///
    /// # Safety
    /// AVX2/FMA; the four rows of `o.len()` (a multiple of 8) values are readable.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy4(p: &[f32], v: *const f32, stride: usize, o: &mut [f32]) {
        let w: [__m256; 4] = std::array::from_fn(|c| _mm256_set1_ps(p[c]));
        for i in (0..o.len()).step_by(8) {
            let op = o.as_mut_ptr().add(i);
            let mut a = _mm256_loadu_ps(op);
            for (c, wc) in w.iter().enumerate() {
                a = _mm256_fmadd_ps(*wc, _mm256_loadu_ps(v.add(c * stride + i)), a);
            }
            _mm256_storeu_ps(op, a);
        }
    }

    /// `q . row_c` for the four f16 rows at `k + c * stride`, in the order of
    /// `gemm::x86::tile::<1>` (so the same bits on the same values).
    ///
    /// # Safety
    /// AVX2/FMA/F16C; the four rows of `q.len()` values are readable.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_f16(q: &[f32], k: *const u16, stride: usize) -> [f32; 4] {
        let d = q.len();
        let mut acc = [_mm256_setzero_ps(); 4];
        let body = d / 8 * 8;
        let mut i = 0;
        while i < body {
            let xv = _mm256_loadu_ps(q.as_ptr().add(i));
            for (c, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(k.add(c * stride + i) as *const __m128i));
                *a = _mm256_fmadd_ps(xv, wv, *a);
            }
            i += 8;
        }
        let mut out = [0f32; 4];
        for c in 0..4 {
            let mut s = crate::cpu::avx2::hsum8(acc[c]);
            for (t, &qt) in q.iter().enumerate().skip(body) {
                s = qt.mul_add(crate::dtype::f16_to_f32(*k.add(c * stride + t)), s);
            }
            out[c] = s;
        }
        out
    }

    /// [`axpy4`] over four f16 rows.
    ///
    /// # Safety
    /// AVX2/FMA/F16C; the four rows of `o.len()` (a multiple of 8) values are readable.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy4_f16(p: &[f32], v: *const u16, stride: usize, o: &mut [f32]) {
        let w: [__m256; 4] = std::array::from_fn(|c| _mm256_set1_ps(p[c]));
        for i in (0..o.len()).step_by(8) {
            let op = o.as_mut_ptr().add(i);
            let mut a = _mm256_loadu_ps(op);
            for (c, wc) in w.iter().enumerate() {
                let row = _mm256_cvtph_ps(_mm_loadu_si128(v.add(c * stride + i) as *const __m128i));
                a = _mm256_fmadd_ps(*wc, row, a);
            }
            _mm256_storeu_ps(op, a);
        }
    }
}
