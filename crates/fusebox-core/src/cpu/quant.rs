//! CPU dot products over packed weights (MLX affine, ggml blocks).
//!
//! Each row is processed in chunks of 32 values: the chunk is unpacked into
//! registers (a `[f32; 32]` the compiler keeps in vector registers), then
//! multiplied with the input. Row kernels are generic over the bit width, and
//! each has a copy compiled for AVX2+FMA that is picked at run time.

use anyhow::{bail, Result};

use super::intdot::IntRow;
use crate::dtype::{bf16_to_f32, f16_to_f32, DType};
use crate::quant::{ggml, GgmlType, Weight};
use crate::tensor::Tensor;

/// Scales or biases in their stored dtype.
#[derive(Clone, Copy)]
pub(super) enum Floats<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl<'a> Floats<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        Ok(match t.dtype() {
            DType::F32 => Floats::F32(t.as_f32()?),
            DType::BF16 => Floats::Bf16(t.as_u16()?),
            DType::F16 => Floats::F16(t.as_u16()?),
            d => bail!("scales/biases must be F32, F16 or BF16, got {d}"),
        })
    }
    pub(super) fn len(&self) -> usize {
        match self {
            Floats::F32(v) => v.len(),
            Floats::Bf16(v) | Floats::F16(v) => v.len(),
        }
    }

    /// Elements `r` of `self`.
    fn slice(self, r: std::ops::Range<usize>) -> Self {
        match self {
            Floats::F32(v) => Floats::F32(&v[r]),
            Floats::Bf16(v) => Floats::Bf16(&v[r]),
            Floats::F16(v) => Floats::F16(&v[r]),
        }
    }

    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        match self {
            Floats::F32(v) => v[i],
            Floats::Bf16(v) => bf16_to_f32(v[i]),
            Floats::F16(v) => f16_to_f32(v[i]),
        }
    }
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `acc += (q * s + b) * x` over 32 values: dequantize and multiply in
/// registers, with 32 independent lanes so nothing waits on a reduction.
#[inline(always)]
fn accum32<const FMA: bool>(acc: &mut [f32; 32], x: &[f32], q: &[f32; 32], s: f32, b: f32) {
    let x = &x[..32];
    for i in 0..32 {
        acc[i] = madd::<FMA>(madd::<FMA>(q[i], s, b), x[i], acc[i]);
    }
}

#[inline(always)]
fn reduce32(acc: &[f32; 32]) -> f32 {
    let mut a = [0f32; 8];
    for c in 0..4 {
        for j in 0..8 {
            a[j] += acc[8 * c + j];
        }
    }
    (a[0] + a[4]) + (a[1] + a[5]) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Unpack 32 `B`-bit values (exactly `B` words) from a little-end-first stream.
#[inline(always)]
fn unpack32<const B: u32>(w: &[u32], out: &mut [f32; 32]) {
    if 32 % B == 0 {
        let per = (32 / B) as usize;
        let mask = (1u32 << B) - 1;
        for (wi, &word) in w[..B as usize].iter().enumerate() {
            for j in 0..per {
                out[wi * per + j] = ((word >> (j as u32 * B)) & mask) as f32;
            }
        }
    } else {
        let mask = (1u64 << B) - 1;
        let (mut buf, mut have, mut wi) = (0u64, 0u32, 0usize);
        for o in out.iter_mut() {
            if have < B {
                buf |= (w[wi] as u64) << have;
                wi += 1;
                have += 32;
            }
            *o = (buf & mask) as f32;
            buf >>= B;
            have -= B;
        }
    }
}

/// Rows of an MLX affine weight.
pub struct AffineRows<'a> {
    words: &'a [u32],
    scales: Floats<'a>,
    biases: Floats<'a>,
    bits: u32,
    group: usize,
    cols: usize,
}

#[inline(always)]
fn affine_dot<const B: u32, const FMA: bool>(a: &AffineRows, j: usize, x: &[f32]) -> f32 {
    let wpr = a.cols * B as usize / 32;
    let gpr = a.cols / a.group;
    let cpg = a.group / 32;
    let w = &a.words[j * wpr..(j + 1) * wpr];
    let mut acc = [0f32; 32];
    let mut t = [0f32; 32];
    for g in 0..gpr {
        let (s, b) = (a.scales.get(j * gpr + g), a.biases.get(j * gpr + g));
        for c in 0..cpg {
            let ci = g * cpg + c;
            unpack32::<B>(&w[ci * B as usize..], &mut t);
            accum32::<FMA>(&mut acc, &x[ci * 32..], &t, s, b);
        }
    }
    reduce32(&acc)
}

macro_rules! dispatch_bits {
    ($name:ident, $fma_name:ident, $kernel:ident, $self:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $fma_name<const B: u32>(a: &$self, j: usize, x: &[f32]) -> f32 {
            $kernel::<B, true>(a, j, x)
        }
        fn $name<const B: u32>(a: &$self, j: usize, x: &[f32]) -> f32 {
            #[cfg(target_arch = "x86_64")]
            if super::kernels::has_avx2_fma() {
                // SAFETY: the processor supports the features the function was compiled for.
                return unsafe { $fma_name::<B>(a, j, x) };
            }
            $kernel::<B, false>(a, j, x)
        }
    };
}

dispatch_bits!(affine_dot_any, affine_dot_avx2, affine_dot, AffineRows);

impl<'a> AffineRows<'a> {
    pub fn new(w: &'a Weight) -> Result<Self> {
        let Weight::Affine { q, scales, biases, bits, group_size, cols, .. } = w else { bail!("not an affine weight") };
        Ok(AffineRows {
            words: bytemuck::cast_slice(q.host_bytes()?),
            scales: Floats::new(scales)?,
            biases: Floats::new(biases)?,
            bits: *bits,
            group: *group_size,
            cols: *cols,
        })
    }

    pub fn dot(&self, j: usize, x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.bits, 4 | 8) && super::kernels::has_avx2_fma() {
            let wpr = self.cols * self.bits as usize / 32;
            let gpr = self.cols / self.group;
            let words = &self.words[j * wpr..(j + 1) * wpr];
            let sb = |g: usize| (self.scales.get(j * gpr + g), self.biases.get(j * gpr + g));
            // SAFETY: AVX2/FMA/F16C are present; the row and x hold `cols` values.
            return unsafe { super::avx2::affine_row(words, &x[..self.cols], self.bits, self.group, sb) };
        }
        match self.bits {
            2 => affine_dot_any::<2>(self, j, x),
            3 => affine_dot_any::<3>(self, j, x),
            4 => affine_dot_any::<4>(self, j, x),
            5 => affine_dot_any::<5>(self, j, x),
            6 => affine_dot_any::<6>(self, j, x),
            _ => affine_dot_any::<8>(self, j, x),
        }
    }

    /// Whether [`Self::dot_int`] takes this weight.
    pub fn int_supported(&self) -> bool {
        super::intdot::affine_supported(self.bits) && self.group.is_multiple_of(32)
    }

    /// Row `j` against an integer-quantized input ([`Self::int_supported`] only).
    pub fn dot_int(&self, j: usize, y: &IntRow) -> f32 {
        let wpr = self.cols * self.bits as usize / 32;
        let gpr = self.cols / self.group;
        let sb = |g: usize| (self.scales.get(j * gpr + g), self.biases.get(j * gpr + g));
        super::intdot::affine_dot(&self.words[j * wpr..(j + 1) * wpr], self.bits, self.group, sb, y)
    }

    /// Whether [`Self::dot_int8`] takes this weight.
    pub fn int8_supported(&self) -> bool {
        super::intdot_rows8::affine_supported(self.bits) && self.group.is_multiple_of(32)
    }

    /// Rows `j..j + 8` against an integer-quantized input
    /// ([`Self::int8_supported`] only).
    pub fn dot_int8(&self, j: usize, y: &IntRow, out: &mut [f32; 8]) {
        let wpr = self.cols * self.bits as usize / 32;
        let gpr = self.cols / self.group;
        let at = j * gpr..(j + 8) * gpr;
        let (s, b) = (self.scales.slice(at.clone()), self.biases.slice(at));
        super::intdot_rows8::affine_dot8(&self.words[j * wpr..(j + 8) * wpr], wpr, self.group, s, b, y, out)
    }

    /// [`Self::dot_int8`] against each of `ys`, bitwise the same values.
    pub fn dot_int8_rows(&self, j: usize, ys: &[IntRow], out: &mut [[f32; 8]]) {
        let wpr = self.cols * self.bits as usize / 32;
        let gpr = self.cols / self.group;
        let at = j * gpr..(j + 8) * gpr;
        let (s, b) = (self.scales.slice(at.clone()), self.biases.slice(at));
        super::intdot_rows8::affine_dot8_rows(&self.words[j * wpr..(j + 8) * wpr], wpr, self.group, s, b, ys, out)
    }

    /// Row `j` as small integers with a scale and bias per block of 32
    /// ([`super::int_weights::affine_row`]; [`Self::int_supported`] only).
    pub fn int_row(&self, j: usize, q: &mut [i16], s: &mut [f32], b: &mut [f32], stride: usize) {
        let wpr = self.cols * self.bits as usize / 32;
        let gpr = self.cols / self.group;
        let sb = |g: usize| (self.scales.get(j * gpr + g), self.biases.get(j * gpr + g));
        let words = &self.words[j * wpr..(j + 1) * wpr];
        super::int_weights::affine_row(words, self.bits, self.group, sb, &mut q[..self.cols], s, b, stride);
    }

    /// [`Self::dot`] of row `j` with each of `xs` (bitwise the same values),
    /// dequantizing the row once into `buf` (`cols` values).
    pub fn dot_rows(&self, j: usize, xs: &[&[f32]], buf: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.bits, 4 | 8) && super::kernels::has_avx2_fma() {
            let wpr = self.cols * self.bits as usize / 32;
            let gpr = self.cols / self.group;
            let words = &self.words[j * wpr..(j + 1) * wpr];
            let sb = |g: usize| (self.scales.get(j * gpr + g), self.biases.get(j * gpr + g));
            let w = &mut buf[..self.cols];
            assert!(xs.iter().all(|x| x.len() >= self.cols), "dot_rows: inputs shorter than a row");
            // SAFETY: AVX2/FMA/F16C are present; the row, w and every x hold `cols` values.
            unsafe { super::avx2::affine_dequant(words, self.bits, self.group, sb, w) };
            // SAFETY: as above
            unsafe { super::avx2::dot_blocks_all(w, xs, out) };
            return;
        }
        for (x, o) in xs.iter().zip(out) {
            *o = self.dot(j, x);
        }
    }

    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        let b = self.bits as usize;
        let wpr = self.cols * b / 32;
        let gpr = self.cols / self.group;
        let w = &self.words[j * wpr..(j + 1) * wpr];
        let mut t = [0f32; 32];
        for (ci, o) in out.chunks_exact_mut(32).enumerate() {
            match self.bits {
                2 => unpack32::<2>(&w[ci * b..], &mut t),
                3 => unpack32::<3>(&w[ci * b..], &mut t),
                4 => unpack32::<4>(&w[ci * b..], &mut t),
                5 => unpack32::<5>(&w[ci * b..], &mut t),
                6 => unpack32::<6>(&w[ci * b..], &mut t),
                _ => unpack32::<8>(&w[ci * b..], &mut t),
            }
            let g = j * gpr + ci * 32 / self.group;
            let (s, bias) = (self.scales.get(g), self.biases.get(g));
            for (oi, &q) in o.iter_mut().zip(&t) {
                *oi = s * q + bias;
            }
        }
    }
}

/// Rows of a ggml block-quantized weight.
pub struct GgmlRows<'a> {
    bytes: &'a [u8],
    pub(super) ty: GgmlType,
    cols: usize,
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

#[inline(always)]
fn ggml_dot<const T: u32, const FMA: bool>(g: &GgmlRows, j: usize, x: &[f32]) -> f32 {
    let ty = g.ty;
    let rb = ty.row_bytes(g.cols);
    let row = &g.bytes[j * rb..(j + 1) * rb];
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let mut acc = [0f32; 32];
    let mut t = [0f32; 32];
    if T == GgmlType::Q4_0 as u32 || T == GgmlType::Q4_1 as u32 {
        let off = if T == GgmlType::Q4_1 as u32 { 4 } else { 2 };
        for (blk, xc) in row.chunks_exact(ts).zip(x.chunks_exact(32)) {
            let qs = &blk[off..off + 16];
            for i in 0..16 {
                t[i] = (qs[i] & 0xF) as f32;
                t[i + 16] = (qs[i] >> 4) as f32;
            }
            let d = f16_at(blk, 0);
            let bias = if T == GgmlType::Q4_1 as u32 { f16_at(blk, 2) } else { -8.0 * d };
            accum32::<FMA>(&mut acc, xc, &t, d, bias);
        }
    } else if T == GgmlType::Q8_0 as u32 {
        for (blk, xc) in row.chunks_exact(ts).zip(x.chunks_exact(32)) {
            for i in 0..32 {
                t[i] = (blk[2 + i] as i8) as f32;
            }
            accum32::<FMA>(&mut acc, xc, &t, f16_at(blk, 0), 0.0);
        }
    } else {
        let mut big = [0f32; 256];
        for (blk, xc) in row.chunks_exact(ts).zip(x.chunks_exact(bs)) {
            ggml::dequant_block(ty, blk, &mut big[..bs]);
            for (c, xcc) in xc.chunks_exact(32).enumerate() {
                t.copy_from_slice(&big[32 * c..32 * c + 32]);
                accum32::<FMA>(&mut acc, xcc, &t, 1.0, 0.0);
            }
        }
    }
    reduce32(&acc)
}

dispatch_bits!(ggml_dot_any, ggml_dot_avx2, ggml_dot, GgmlRows);

impl<'a> GgmlRows<'a> {
    pub fn new(w: &'a Weight) -> Result<Self> {
        let Weight::Gguf { data, ty, cols, .. } = w else { bail!("not a ggml weight") };
        if ty.block_size() == 1 {
            bail!("{} tensors are dense weights, not block-quantized ones", ty.name());
        }
        Ok(GgmlRows { bytes: data.host_bytes()?, ty: *ty, cols: *cols })
    }

    pub fn dot(&self, j: usize, x: &[f32]) -> f32 {
        const Q40: u32 = GgmlType::Q4_0 as u32;
        const Q41: u32 = GgmlType::Q4_1 as u32;
        const Q80: u32 = GgmlType::Q8_0 as u32;
        #[cfg(target_arch = "x86_64")]
        if super::kernels::has_avx2_fma() {
            let rb = self.ty.row_bytes(self.cols);
            let row = &self.bytes[j * rb..(j + 1) * rb];
            let x = &x[..self.cols];
            // SAFETY: AVX2/FMA/F16C are present; the row and x hold `cols` values.
            match self.ty {
                GgmlType::Q4_0 => return unsafe { super::avx2::q4_row(row, x, false) },
                GgmlType::Q4_1 => return unsafe { super::avx2::q4_row(row, x, true) },
                GgmlType::Q8_0 => return unsafe { super::avx2::q8_0_row(row, x) },
                _ => {}
            }
        }
        match self.ty {
            GgmlType::Q4_0 => ggml_dot_any::<Q40>(self, j, x),
            GgmlType::Q4_1 => ggml_dot_any::<Q41>(self, j, x),
            GgmlType::Q8_0 => ggml_dot_any::<Q80>(self, j, x),
            _ => ggml_dot_any::<0>(self, j, x),
        }
    }

    /// Whether [`Self::dot_int`] takes this weight.
    pub fn int_supported(&self) -> bool {
        super::intdot::ggml_supported(self.ty)
    }

    /// Row `j` against an integer-quantized input ([`Self::int_supported`] only).
    pub fn dot_int(&self, j: usize, y: &IntRow) -> f32 {
        let rb = self.ty.row_bytes(self.cols);
        super::intdot::ggml_dot(self.ty, &self.bytes[j * rb..(j + 1) * rb], y)
    }

    /// Whether [`Self::dot_int8`] takes this weight.
    pub fn int8_supported(&self) -> bool {
        super::intdot_rows8::supported(self.ty)
    }

    /// Rows `j..j + 8` against an integer-quantized input
    /// ([`Self::int8_supported`] only).
    pub fn dot_int8(&self, j: usize, y: &IntRow, out: &mut [f32; 8]) {
        let rb = self.ty.row_bytes(self.cols);
        super::intdot_rows8::ggml_dot8(self.ty, &self.bytes[j * rb..(j + 8) * rb], rb, y, out)
    }

    /// [`Self::dot_int8`] against each of `ys`, bitwise the same values.
    pub fn dot_int8_rows(&self, j: usize, ys: &[IntRow], out: &mut [[f32; 8]]) {
        let rb = self.ty.row_bytes(self.cols);
        super::intdot_rows8::ggml_dot8_rows(self.ty, &self.bytes[j * rb..(j + 8) * rb], rb, ys, out)
    }

    /// Row `j` as small integers with a scale and bias per block of 32
    /// ([`super::int_weights::ggml_row`]; [`Self::int_supported`] only).
    pub fn int_row(&self, j: usize, q: &mut [i16], s: &mut [f32], b: &mut [f32], stride: usize) {
        let rb = self.ty.row_bytes(self.cols);
        super::int_weights::ggml_row(self.ty, &self.bytes[j * rb..(j + 1) * rb], &mut q[..self.cols], s, b, stride);
    }

    /// [`Self::dot`] of row `j` with each of `xs` (bitwise the same values),
    /// dequantizing the row once into `buf` (`cols` values).
    pub fn dot_rows(&self, j: usize, xs: &[&[f32]], buf: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) && super::kernels::has_avx2_fma() {
            let rb = self.ty.row_bytes(self.cols);
            let row = &self.bytes[j * rb..(j + 1) * rb];
            let w = &mut buf[..self.cols];
            assert!(xs.iter().all(|x| x.len() >= self.cols), "dot_rows: inputs shorter than a row");
            // SAFETY: AVX2/FMA/F16C are present; the row, w and every x hold `cols` values.
            unsafe {
                match self.ty {
                    GgmlType::Q8_0 => super::avx2::q8_0_dequant(row, w),
                    t => super::avx2::q4_dequant(row, t == GgmlType::Q4_1, w),
                }
            }
            // SAFETY: as above
            unsafe { super::avx2::dot_blocks_all(w, xs, out) };
            return;
        }
        for (x, o) in xs.iter().zip(out) {
            *o = self.dot(j, x);
        }
    }

    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        let rb = self.ty.row_bytes(self.cols);
        ggml::dequant_row(self.ty, &self.bytes[j * rb..(j + 1) * rb], out);
    }
}
