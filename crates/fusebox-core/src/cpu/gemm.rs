//! The prefill product on f32 rows: every input row against a block of at
//! most [`NR`] weight rows (already dequantized to f32 by the caller).
//!
//! With AVX2 the block is packed k-major (`panel[kk * NR + j]`) and a
//! micro-kernel keeps a 6 x 16 tile of outputs in 12 registers: per `kk`,
//! two panel loads and six broadcast input values feed 12 FMAs, so loads
//! stay under the FMA rate and the panel streams from L2 at 64 bytes per
//! 12 FMAs. The tile restarts every [`KC`] values and adds into the totals,
//! which keeps the f32 sums short. The previous kernel (3 input rows x 4
//! weight rows of dot products over the whole `k`) loaded 7 vectors per 12
//! FMAs from rows that did not fit L1.

use super::kernels::dot_f32;

/// Weight rows per block: the micro-kernel's width (two 8-lane vectors).
pub const NR: usize = 16;
/// Input rows per micro-kernel call.
pub const MR: usize = 6;
/// Values of `k` per pass of the tile before it adds into the totals.
const KC: usize = 256;

/// `put(r, o)` with `o[j] = x_r . w_j` for every input row `r < m` of `x`
/// (`m * k`) and weight row `j < nb` of `w` (`nb * k`, `nb <= NR`); `panel`
/// is scratch of `NR * k` values. The order of the additions depends only on
/// `k`, so results are deterministic.
pub fn block_product(
    x: &[f32],
    m: usize,
    w: &[f32],
    nb: usize,
    k: usize,
    panel: &mut [f32],
    mut put: impl FnMut(usize, &[f32]),
) {
    assert!(nb <= NR && w.len() >= nb * k && x.len() >= m * k && panel.len() >= NR * k);
    #[cfg(target_arch = "x86_64")]
    if super::kernels::has_avx2_fma() {
        // SAFETY: AVX2 is present; the lengths were checked above.
        unsafe { x86::pack(w, nb, k, panel) };
        let mut r = 0;
        while r < m {
            let rows = MR.min(m - r);
            let mut out = [[0f32; NR]; MR];
            // SAFETY: AVX2/FMA are present; rows r..r+rows of x and the panel hold k values each.
            unsafe { x86::tile_rows(x, r, rows, k, panel, NR, &mut out) };
            for (i, o) in out[..rows].iter().enumerate() {
                put(r + i, &o[..nb]);
            }
            r += rows;
        }
        return;
    }
    let mut o = [0f32; NR];
    for i in 0..m {
        for (j, oj) in o[..nb].iter_mut().enumerate() {
            *oj = dot_f32(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
        }
        put(i, &o[..nb]);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use crate::cpu::avx2::hsum8 as hsum;

    use super::{KC, MR, NR};

    /// `panel[kk * NR + j] = w[j * k + kk]` for `j < nb`, zero for the rest:
    /// 8 x 8 transposes in registers.
    ///
    /// # Safety
    /// AVX2 is present, `w` holds `nb * k` values and `panel` `NR * k`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn pack(w: &[f32], nb: usize, k: usize, panel: &mut [f32]) {
        let (wp, pp) = (w.as_ptr(), panel.as_mut_ptr());
        let body = k / 8 * 8;
        for j0 in [0, 8] {
            let mut kk = 0;
            while kk < body {
                let r: [__m256; 8] = std::array::from_fn(|i| {
                    if j0 + i < nb {
                        _mm256_loadu_ps(wp.add((j0 + i) * k + kk))
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                let t = [
                    _mm256_unpacklo_ps(r[0], r[1]),
                    _mm256_unpackhi_ps(r[0], r[1]),
                    _mm256_unpacklo_ps(r[2], r[3]),
                    _mm256_unpackhi_ps(r[2], r[3]),
                    _mm256_unpacklo_ps(r[4], r[5]),
                    _mm256_unpackhi_ps(r[4], r[5]),
                    _mm256_unpacklo_ps(r[6], r[7]),
                    _mm256_unpackhi_ps(r[6], r[7]),
                ];
                let u = [
                    _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    _mm256_shuffle_ps::<0xee>(t[0], t[2]),
                    _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    _mm256_shuffle_ps::<0xee>(t[1], t[3]),
                    _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    _mm256_shuffle_ps::<0xee>(t[4], t[6]),
                    _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    _mm256_shuffle_ps::<0xee>(t[5], t[7]),
                ];
                for i in 0..4 {
                    _mm256_storeu_ps(pp.add((kk + i) * NR + j0), _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]));
                    _mm256_storeu_ps(pp.add((kk + i + 4) * NR + j0), _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]));
                }
                kk += 8;
            }
        }
        for kk in body..k {
            for j in 0..NR {
                *pp.add(kk * NR + j) = if j < nb { *wp.add(j * k + kk) } else { 0.0 };
            }
        }
    }

    /// [`panel_tile`] on `rows` (at most [`MR`]) rows from `r0`.
    ///
    /// # Safety
    /// As for [`panel_tile`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_rows(
        x: &[f32],
        r0: usize,
        rows: usize,
        k: usize,
        panel: &[f32],
        ps: usize,
        out: &mut [[f32; NR]; MR],
    ) {
        match rows {
            6 => panel_tile::<6>(x, r0, k, panel, ps, out),
            5 => panel_tile::<5>(x, r0, k, panel, ps, out),
            4 => panel_tile::<4>(x, r0, k, panel, ps, out),
            3 => panel_tile::<3>(x, r0, k, panel, ps, out),
            2 => panel_tile::<2>(x, r0, k, panel, ps, out),
            _ => panel_tile::<1>(x, r0, k, panel, ps, out),
        }
    }

    /// `out[i][j] = x_{r0+i} . w_j` for `i < R` over `k` values, the
    /// weights packed k-major in `panel` (`w_j[kk]` at `panel[kk * ps + j]`;
    /// `ps` is `NR` for a packed block, or a row length: the prefill
    /// attention's values are their own panel).
    ///
    /// # Safety
    /// AVX2 and FMA are present (the bounds are checked).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel_tile<const R: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        panel: &[f32],
        ps: usize,
        out: &mut [[f32; NR]; MR],
    ) {
        assert!(R <= MR && (r0 + R) * k <= x.len() && ps >= NR && (k == 0 || (k - 1) * ps + NR <= panel.len()));
        let xp = x.as_ptr().add(r0 * k);
        let pp = panel.as_ptr();
        let mut total = [[_mm256_setzero_ps(); 2]; R];
        let mut k0 = 0;
        while k0 < k {
            let end = (k0 + KC).min(k);
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for kk in k0..end {
                let b0 = _mm256_loadu_ps(pp.add(kk * ps));
                let b1 = _mm256_loadu_ps(pp.add(kk * ps + 8));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xp.add(i * k + kk));
                    a[0] = _mm256_fmadd_ps(xv, b0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, b1, a[1]);
                }
            }
            for (t, a) in total.iter_mut().zip(&acc) {
                t[0] = _mm256_add_ps(t[0], a[0]);
                t[1] = _mm256_add_ps(t[1], a[1]);
            }
            k0 = end;
        }
        for (o, t) in out.iter_mut().zip(&total) {
            _mm256_storeu_ps(o.as_mut_ptr(), t[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), t[1]);
        }
    }

    /// Dot products over `k` values of input rows `r0..r0+R` (row i at
    /// `x[i * xs..]`) with weight rows `j0..j0+4` (row j at `w[j * ws..]`).
    ///
    /// # Safety
    /// AVX2 and FMA are present (the row bounds are checked).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize>(
        x: &[f32],
        xs: usize,
        r0: usize,
        w: &[f32],
        ws: usize,
        j0: usize,
        k: usize,
    ) -> [[f32; 4]; R] {
        assert!((r0 + R - 1) * xs + k <= x.len() && (j0 + 3) * ws + k <= w.len());
        let xp: [*const f32; R] = std::array::from_fn(|i| x.as_ptr().add((r0 + i) * xs));
        let wp: [*const f32; 4] = std::array::from_fn(|c| w.as_ptr().add((j0 + c) * ws));
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let body = k / 8 * 8;
        let mut i = 0;
        while i < body {
            let xv: [__m256; R] = std::array::from_fn(|r| _mm256_loadu_ps(xp[r].add(i)));
            for c in 0..4 {
                let wv = _mm256_loadu_ps(wp[c].add(i));
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
                }
            }
            i += 8;
        }
        let mut out = [[0f32; 4]; R];
        for r in 0..R {
            for c in 0..4 {
                let mut s = hsum(acc[r][c]);
                for t in body..k {
                    s = (*xp[r].add(t)).mul_add(*wp[c].add(t), s);
                }
                out[r][c] = s;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::block_product;

    #[test]
    fn block_product_matches_f64_at_every_edge() {
        let mut seed = 7u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for (m, nb, k) in [(7, 6, 37), (3, 4, 8), (33, 16, 1024), (2, 3, 5), (6, 9, 64), (13, 16, 3072), (1, 1, 1)] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..nb * k).map(|_| rnd()).collect();
            let mut got = vec![f32::NAN; m * nb];
            let mut panel = vec![0f32; super::NR * k];
            block_product(&x, m, &w, nb, k, &mut panel, |r, o| got[r * nb..(r + 1) * nb].copy_from_slice(o));
            for r in 0..m {
                for j in 0..nb {
                    let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
                    let g = got[r * nb + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "m {m} nb {nb} k {k} ({r}, {j}): {g} vs {want}"
                    );
                }
            }
        }
    }
}
