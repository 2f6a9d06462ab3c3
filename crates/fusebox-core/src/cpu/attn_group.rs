//! Decode attention on the CPU for the heads of one query row that share a
//! kv head (a GQA group): each cached key and value row is read and widened
//! once for the whole group instead of once per head, the scores of two heads
//! against four keys are accumulated together, the softmax runs eight lanes
//! at a time, and the weighted sum keeps 32 output columns of two heads in
//! registers while it walks the rows (each row's 32 columns are one 64-byte
//! line of an f16 cache).
//!
//! The arithmetic depends only on the widened values, so attention over an
//! f16 cache is bitwise attention over an f32 cache of the same values, and a
//! row's result does not depend on how many rows a call has (decode steps and
//! speculative verify rows agree).

use super::attn_block::{KvRows, RowMap};

/// Whether [`attend`] takes head dim `d` on this processor.
pub fn supported(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        d.is_multiple_of(32) && d <= super::MAX_HEAD_DIM && super::kernels::has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// Scratch values [`attend`] needs for `g` heads over `len` keys.
pub fn scratch_len(g: usize, len: usize) -> usize {
    g * len
}

/// Attention of the `g = q.len() / d` query heads in `q` (one row, `d` values
/// each) over the first `len` rows of one kv head (`keys`, `values`: row `t`
/// at `rows.off(t)`, contiguous or paged), into `out` (`g * d`). The
/// arithmetic does not depend on where the rows lie.
///
/// # Panics
/// If [`supported`] is false for `d`, `len` is 0, or a slice is short.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    d: usize,
    keys: KvRows,
    values: KvRows,
    rows: RowMap,
    len: usize,
    scale: f32,
    scratch: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match (keys, values, rows) {
        (KvRows::F32(k), KvRows::F32(v), RowMap::Linear(m)) => {
            x86::attend_rows(q, d, k, v, m, len, scale, scratch, out)
        }
        (KvRows::F16(k), KvRows::F16(v), RowMap::Linear(m)) => {
            x86::attend_rows(q, d, k, v, m, len, scale, scratch, out)
        }
        (KvRows::F32(k), KvRows::F32(v), RowMap::Paged(m)) => x86::attend_rows(q, d, k, v, m, len, scale, scratch, out),
        (KvRows::F16(k), KvRows::F16(v), RowMap::Paged(m)) => x86::attend_rows(q, d, k, v, m, len, scale, scratch, out),
        _ => panic!("attention: keys and values of different types"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, d, keys, values, rows, len, scale, scratch, out);
        unreachable!("attend without AVX2 (supported is false)")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::cpu::attn_block::Rows;

    /// A cache element: eight of them as f32 lanes.
    pub trait Elem: Copy {
        /// # Safety
        /// AVX2/F16C; eight elements at `p` are readable.
        unsafe fn load8(p: *const Self) -> __m256;
        /// Bytes of one element (for the prefetch distance).
        const BYTES: usize;
    }
    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        const BYTES: usize = 4;
    }
    impl Elem for u16 {
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        const BYTES: usize = 2;
    }

    /// Rows ahead of the one being read that are asked of the cache (a head's
    /// rows lie `stride` apart, a few to a 4 KB page, where the hardware
    /// prefetcher stops).
    const AHEAD: usize = 16;

    #[inline(always)]
    unsafe fn prefetch<T: Elem>(p: *const T) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }
    #[inline(always)]
    unsafe fn prefetch_l2<T: Elem>(p: *const T) {
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
    }

    /// [`super::attend`] over the rows of one element type: checks every
    /// bound, then runs the kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_rows<T: Elem, M: Rows>(
        q: &[f32],
        d: usize,
        k: &[T],
        v: &[T],
        rows: M,
        len: usize,
        scale: f32,
        scratch: &mut [f32],
        out: &mut [f32],
    ) {
        let g = q.len() / d;
        assert!(super::supported(d) && len > 0 && q.len() == g * d && out.len() == g * d);
        assert!(scratch.len() >= super::scratch_len(g, len));
        let rows_end = rows.max_off(len) + d;
        assert!(rows_end <= k.len() && rows_end <= v.len(), "attention: rows past the cache");
        // SAFETY: AVX2/FMA/F16C are present (supported); rows 0..len of k and v lie inside them (asserted).
        unsafe { attend(q, d, k.as_ptr(), v.as_ptr(), rows, len, scale, &mut scratch[..g * len], out) }
    }

    /// # Safety
    /// AVX2/FMA/F16C; the bounds [`attend_rows`] checks.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend<T: Elem, M: Rows>(
        q: &[f32],
        d: usize,
        k: *const T,
        v: *const T,
        rows: M,
        len: usize,
        scale: f32,
        s: &mut [f32],
        out: &mut [f32],
    ) {
        let g = q.len() / d;
        let mut h = 0;
        while h < g {
            let two = h + 1 < g;
            scores(q.as_ptr().add(h * d), two, d, k, v, h == 0, rows, len, scale, s.as_mut_ptr().add(h * len), len);
            h += 2;
        }
        for row in s.chunks_exact_mut(len) {
            softmax(row);
        }
        let mut h = 0;
        while h < g {
            let two = h + 1 < g;
            weighted_sum(s.as_ptr().add(h * len), len, two, v, rows, d, out.as_mut_ptr().add(h * d));
            h += 2;
        }
    }

    /// Scores of head `q` (and `q + d` when `two`) against rows 0..len of `k`,
    /// times `scale`, into `s` (and `s + sstride`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores<T: Elem, M: Rows>(
        q: *const f32,
        two: bool,
        d: usize,
        k: *const T,
        v: *const T,
        prefetch_v: bool,
        rows: M,
        len: usize,
        scale: f32,
        s: *mut f32,
        sstride: usize,
    ) {
        // the first pass also asks L2 for the values' rows, which the weighted sum reads next
        let q1 = if two { q.add(d) } else { q };
        let mut t = 0;
        while t + 4 <= len {
            let mut a0 = [_mm256_setzero_ps(); 4];
            let mut a1 = [_mm256_setzero_ps(); 4];
            for c in 0..4 {
                if t + c + AHEAD < len {
                    let at = rows.off(t + c + AHEAD);
                    for off in (0..d).step_by(64 / T::BYTES) {
                        prefetch(k.add(at + off));
                        if prefetch_v {
                            prefetch_l2(v.add(at + off));
                        }
                    }
                }
            }
            let kr = [k.add(rows.off(t)), k.add(rows.off(t + 1)), k.add(rows.off(t + 2)), k.add(rows.off(t + 3))];
            let mut i = 0;
            while i < d {
                let x0 = _mm256_loadu_ps(q.add(i));
                let x1 = _mm256_loadu_ps(q1.add(i));
                for c in 0..4 {
                    let kv = T::load8(kr[c].add(i));
                    a0[c] = _mm256_fmadd_ps(x0, kv, a0[c]);
                    a1[c] = _mm256_fmadd_ps(x1, kv, a1[c]);
                }
                i += 8;
            }
            for c in 0..4 {
                *s.add(t + c) = crate::cpu::avx2::hsum8(a0[c]) * scale;
                if two {
                    *s.add(sstride + t + c) = crate::cpu::avx2::hsum8(a1[c]) * scale;
                }
            }
            t += 4;
        }
        while t < len {
            let mut a0 = _mm256_setzero_ps();
            let mut a1 = _mm256_setzero_ps();
            let kr = k.add(rows.off(t));
            let mut i = 0;
            while i < d {
                let kv = T::load8(kr.add(i));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), kv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1.add(i)), kv, a1);
                i += 8;
            }
            *s.add(t) = crate::cpu::avx2::hsum8(a0) * scale;
            if two {
                *s.add(sstride + t) = crate::cpu::avx2::hsum8(a1) * scale;
            }
            t += 1;
        }
    }

    /// `row = exp(row - max) / sum`, eight lanes at a time.
    #[inline(always)]
    unsafe fn softmax(row: &mut [f32]) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let body = n / 8 * 8;
        let mut m8 = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < body {
            m8 = _mm256_max_ps(m8, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let mut mx = crate::cpu::avx2::hmax8(m8);
        for &x in &row[body..] {
            mx = mx.max(x);
        }
        let mxv = _mm256_set1_ps(mx);
        let mut s8 = _mm256_setzero_ps();
        let mut i = 0;
        while i < body {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mxv));
            _mm256_storeu_ps(p.add(i), e);
            s8 = _mm256_add_ps(s8, e);
            i += 8;
        }
        let mut sum = crate::cpu::avx2::hsum8(s8);
        if body < n {
            // the tail through the same exp, lanes past the row set to -inf (exp 0)
            let mut tail = [f32::NEG_INFINITY; 8];
            tail[..n - body].copy_from_slice(&row[body..]);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mxv));
            _mm256_storeu_ps(tail.as_mut_ptr(), e);
            row[body..].copy_from_slice(&tail[..n - body]);
            sum += tail[..n - body].iter().sum::<f32>();
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        let mut i = 0;
        while i < body {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
            i += 8;
        }
        let inv = 1.0 / sum;
        row[body..].iter_mut().for_each(|x| *x *= inv);
    }

    /// e^x for x <= 0 (softmax arguments; -inf gives 0), eight lanes: 2^n
    /// times a degree-6 polynomial of the remainder (relative error ~2e-7).
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        // r = x - n ln 2 in two steps (Cody-Waite)
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_mul_ps(p, scale)
    }

    /// `out[j] = sum_t p[t] v_t[j]` for head p (and p + len into out + d when
    /// `two`), 32 columns of both heads in registers per pass over the rows.
    #[inline(always)]
    unsafe fn weighted_sum<T: Elem, M: Rows>(
        p: *const f32,
        len: usize,
        two: bool,
        v: *const T,
        rows: M,
        d: usize,
        out: *mut f32,
    ) {
        let p1 = if two { p.add(len) } else { p };
        let mut c0 = 0;
        while c0 < d {
            let mut a0 = [_mm256_setzero_ps(); 4];
            let mut a1 = [_mm256_setzero_ps(); 4];
            let base = v.add(c0);
            for t in 0..len {
                if t + AHEAD < len {
                    prefetch(base.add(rows.off(t + AHEAD)));
                }
                let w0 = _mm256_broadcast_ss(&*p.add(t));
                let w1 = _mm256_broadcast_ss(&*p1.add(t));
                let row = base.add(rows.off(t));
                for j in 0..4 {
                    let x = T::load8(row.add(8 * j));
                    a0[j] = _mm256_fmadd_ps(w0, x, a0[j]);
                    a1[j] = _mm256_fmadd_ps(w1, x, a1[j]);
                }
            }
            for j in 0..4 {
                _mm256_storeu_ps(out.add(c0 + 8 * j), a0[j]);
                if two {
                    _mm256_storeu_ps(out.add(d + c0 + 8 * j), a1[j]);
                }
            }
            c0 += 32;
        }
    }
}
