//! ggml block formats: dequantization of one row (the reference path).
//!
//! Block layouts (little-endian), as ggml defines them:
//! * Q4_0 (32 values, 18 bytes): f16 d, 16 bytes of nibbles; value j is
//!   `d * (lo_nibble(qs[j]) - 8)`, value j+16 is `d * (hi_nibble(qs[j]) - 8)`.
//! * Q4_1 (32, 20): f16 d, f16 m, 16 bytes; `d * q + m`, same nibble order.
//! * Q8_0 (32, 34): f16 d, 32 × i8; `d * q`.
//! * Q4_K (256, 144): f16 d, f16 dmin, 12 bytes of packed 6-bit sub-block
//!   scales and mins, 128 bytes of nibbles; 8 sub-blocks of 32.
//! * Q5_K (256, 176): as Q4_K plus 32 bytes holding each value's fifth bit.
//! * Q6_K (256, 210): 128 bytes low nibbles, 64 bytes of high 2-bit pairs,
//!   16 × i8 sub-block scales, then f16 d.

use crate::dtype::{bf16_to_f32, f16_to_f32};
use crate::quant::GgmlType;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Scale and min of sub-block `j` (0..8) from a K-quant's 12 packed bytes.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Dequantize one block of `ty` into `out` (`ty.block_size()` values).
pub fn dequant_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => out[0] = f16_at(b, 0),
        GgmlType::BF16 => out[0] = bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for j in 0..16 {
                out[j] = d * ((b[2 + j] & 0xF) as i32 - 8) as f32;
                out[j + 16] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                out[j] = d * (b[4 + j] & 0xF) as f32 + m;
                out[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                out[j] = d * (b[2 + j] as i8) as f32;
            }
        }
        GgmlType::Q4_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                let (d1, mn1, d2, mn2) = (d * sc1 as f32, dmin * m1 as f32, d * sc2 as f32, dmin * m2 as f32);
                let q = &qs[32 * c..32 * c + 32];
                for l in 0..32 {
                    out[64 * c + l] = d1 * (q[l] & 0xF) as f32 - mn1;
                    out[64 * c + 32 + l] = d2 * (q[l] >> 4) as f32 - mn2;
                }
            }
        }
        GgmlType::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                let (d1, mn1, d2, mn2) = (d * sc1 as f32, dmin * m1 as f32, d * sc2 as f32, dmin * m2 as f32);
                let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                let q = &qs[32 * c..32 * c + 32];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    out[64 * c + l] = d1 * ((q[l] & 0xF) + h1) as f32 - mn1;
                    out[64 * c + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - mn2;
                }
            }
        }
        GgmlType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                let y = &mut out[128 * n..128 * n + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// Dequantize a row (`out.len()` values, a multiple of the block size).
pub fn dequant_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    for (blk, o) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
        dequant_block(ty, blk, o);
    }
}
