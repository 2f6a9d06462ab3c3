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

/// `o = sum_t p[t] * v_t` for the rows `v_t = values[t * stride..][..d]`.
pub fn weighted_sum(p: &[f32], values: &[f32], stride: usize, o: &mut [f32]) {
    let d = o.len();
    o.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() && d % 8 == 0 {
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
}
