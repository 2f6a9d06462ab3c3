//! Packed weight rows as small integers for the int16 prefill GEMM
//! ([`super::gemm_i16`]): every value is `s * q + b` with an integer `q`
//! and one float `s` and `b` per block of 32 values.
//!
//! Per format: Q4_0 `q` = nibble - 8, `s` = d, `b` = 0; Q4_1 `q` = nibble,
//! `b` = m; Q8_0 `q` = the i8; Q4_K/Q5_K `q` = the 4/5-bit value, `s` = d *
//! sc and `b` = -dmin * m of its sub-block (the 6-bit sub-scale goes into the
//! float scale); Q6_K `q` = sc * (q6 - 32) with its i8 scale per 16 folded
//! in (|q| <= 4096), `s` = d, `b` = 0; MLX affine 4/8-bit: the value, and
//! the group's scale and bias. The formats and layouts are those of
//! [`super::intdot`] (which reads them in registers for one input row) and
//! [`crate::quant::ggml`] (the reference dequantization).

use crate::dtype::f16_to_f32;
use crate::quant::ggml::scale_min_k4;
use crate::quant::GgmlType;

/// The largest |q| any format here produces (Q6_K's 128 * 32): with int16
/// inputs of at most 16383, 32 products sum inside i32 (32 * 4096 * 16383 <
/// 2^31).
pub const QMAX: i32 = 4096;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Whether [`ggml_row`] takes this block type.
pub fn ggml_supported(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
}

/// One row of ggml blocks (`row`, `q.len()` values) into `q`, with block
/// `g`'s scale and bias at `s[g * stride]` and `b[g * stride]`.
pub fn ggml_row(ty: GgmlType, row: &[u8], q: &mut [i16], s: &mut [f32], b: &mut [f32], stride: usize) {
    assert!(ggml_supported(ty), "int weights: {} is not supported", ty.name());
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let blocks = q.len() / bs;
    assert!(row.len() >= blocks * ts && q.len().is_multiple_of(bs));
    let per = bs / 32;
    assert!(s.len() > (blocks * per - 1) * stride && b.len() > (blocks * per - 1) * stride);
    for (bi, (blk, q)) in row.chunks_exact(ts).zip(q.chunks_exact_mut(bs)).enumerate() {
        let mut put = |sub: usize, sv: f32, bv: f32| {
            s[(bi * per + sub) * stride] = sv;
            b[(bi * per + sub) * stride] = bv;
        };
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let q4_1 = ty == GgmlType::Q4_1;
                let d = f16_at(blk, 0);
                let (off, sub) = if q4_1 { (4, 0) } else { (2, 8) };
                let qs = &blk[off..off + 16];
                for j in 0..16 {
                    q[j] = (qs[j] & 0xf) as i16 - sub;
                    q[j + 16] = (qs[j] >> 4) as i16 - sub;
                }
                put(0, d, if q4_1 { f16_at(blk, 2) } else { 0.0 });
            }
            GgmlType::Q8_0 => {
                for j in 0..32 {
                    q[j] = blk[2 + j] as i8 as i16;
                }
                put(0, f16_at(blk, 0), 0.0);
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let q5 = ty == GgmlType::Q5_K;
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                let qh = &blk[16..48];
                let qs = &blk[if q5 { 48 } else { 16 }..][..128];
                for c in 0..4 {
                    for h in 0..2 {
                        let (sc, m) = scale_min_k4(2 * c + h, scales);
                        put(2 * c + h, d * sc as f32, -dmin * m as f32);
                    }
                    let (v, o) = (&qs[32 * c..32 * c + 32], &mut q[64 * c..64 * c + 64]);
                    for l in 0..32 {
                        let (mut lo, mut hi) = ((v[l] & 0xf) as i16, (v[l] >> 4) as i16);
                        if q5 {
                            lo |= (((qh[l] >> (2 * c)) & 1) as i16) << 4;
                            hi |= (((qh[l] >> (2 * c + 1)) & 1) as i16) << 4;
                        }
                        o[l] = lo;
                        o[l + 32] = hi;
                    }
                }
            }
            GgmlType::Q6_K => {
                let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                let d = f16_at(blk, 208);
                for sub in 0..8 {
                    put(sub, d, 0.0);
                }
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    let o = &mut q[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let v = [
                            (ql[l] & 0xf) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (t, &v) in v.iter().enumerate() {
                            o[l + 32 * t] = (sc[is + 2 * t] as i8 as i16) * (v as i16 - 32);
                        }
                    }
                }
            }
            _ => unreachable!(),
        }
    }
}

/// One row of MLX affine 4- or 8-bit words (`q.len()` values) into `q`;
/// `sb(g)` gives group g's scale and bias (`group` a multiple of 32), put
/// at every 32-block of the group (`s[c * stride]`, `b[c * stride]`).
#[allow(clippy::too_many_arguments)]
pub fn affine_row(
    words: &[u32],
    bits: u32,
    group: usize,
    sb: impl Fn(usize) -> (f32, f32),
    q: &mut [i16],
    s: &mut [f32],
    b: &mut [f32],
    stride: usize,
) {
    assert!(matches!(bits, 4 | 8) && group.is_multiple_of(32) && q.len().is_multiple_of(group));
    let bytes: &[u8] = bytemuck::cast_slice(words);
    assert!(bytes.len() * 8 >= q.len() * bits as usize);
    let per = group / 32;
    for (c, q) in q.chunks_exact_mut(32).enumerate() {
        let (sv, bv) = sb(c / per);
        s[c * stride] = sv;
        b[c * stride] = bv;
        if bits == 4 {
            let v = &bytes[16 * c..16 * c + 16];
            for i in 0..16 {
                q[2 * i] = (v[i] & 0xf) as i16;
                q[2 * i + 1] = (v[i] >> 4) as i16;
            }
        } else {
            for (o, &v) in q.iter_mut().zip(&bytes[32 * c..32 * c + 32]) {
                *o = v as i16;
            }
        }
    }
}
