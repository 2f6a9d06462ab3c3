//! Packed (quantized) weight formats and the [`Weight`] type the matmul and
//! embedding ops take.
//!
//! Weights stay packed in memory; the ops dequantize inside their inner
//! loops. Layouts:
//!
//! * **MLX affine** (`mx.quantize`, mode `affine`): each row of `k` inputs is
//!   split into groups of `group_size`; element `i` of a row is
//!   `scales[g] * q_i + biases[g]` with `g = i / group_size`. The `q_i` are
//!   `bits`-bit unsigned integers packed little-end first into a stream of
//!   `u32` words per row (`k * bits / 32` words): value `i` occupies bits
//!   `[i*bits, (i+1)*bits)` of the row's bit stream, where bit `j` of the
//!   stream is bit `j % 32` of word `j / 32`. For 3, 5 and 6 bits a value can
//!   straddle two words.
//! * **GGUF blocks** ([`GgmlType`]): each row is a sequence of fixed-size
//!   blocks (see `block_size` / `type_size`), as in ggml.

use anyhow::{bail, ensure, Result};

use crate::dtype::{f16_to_f32, DType};
use crate::tensor::Tensor;

/// ggml tensor types fusebox reads (the numeric values are ggml's type ids).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q8_0 = 8,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    BF16 = 30,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            8 => Q8_0,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            30 => BF16,
            _ => return None,
        })
    }

    /// ggml's name for a type id, including the ones fusebox cannot read.
    pub fn name_of_id(id: u32) -> &'static str {
        const NAMES: [&str; 40] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    pub fn name(self) -> &'static str {
        Self::name_of_id(self as u32)
    }

    /// Elements per block.
    pub const fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 => 1,
            Q4_0 | Q4_1 | Q8_0 => 32,
            Q4_K | Q5_K | Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 => 18,
            Q4_1 => 20,
            Q8_0 => 34,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
        }
    }

    /// Bytes of a row of `n` elements (`n` must be a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }
}

/// A linear layer's (or embedding table's) weight: `[experts?, rows, cols]`,
/// rows = output features, cols = input features. `experts` is 1 except for
/// stacked MoE expert weights.
#[derive(Clone, Debug)]
pub enum Weight {
    /// A float tensor `[rows, cols]` or `[experts, rows, cols]`.
    Dense(Tensor),
    /// MLX affine: `q` is `U32 [.., rows, cols*bits/32]`; `scales`, `biases`
    /// are float `[.., rows, cols/group_size]`.
    Affine {
        q: Tensor,
        scales: Tensor,
        biases: Tensor,
        bits: u32,
        group_size: usize,
        experts: usize,
        rows: usize,
        cols: usize,
    },
    /// GGUF blocks: raw bytes `U8 [experts * rows * row_bytes]`.
    Gguf { data: Tensor, ty: GgmlType, experts: usize, rows: usize, cols: usize },
}

impl Weight {
    /// `(experts, rows, cols)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        match self {
            Weight::Dense(t) => match *t.shape() {
                [r, c] => (1, r, c),
                [e, r, c] => (e, r, c),
                _ => (0, 0, 0),
            },
            Weight::Affine { experts, rows, cols, .. } | Weight::Gguf { experts, rows, cols, .. } => {
                (*experts, *rows, *cols)
            }
        }
    }

    /// A dense weight from a 2-D or 3-D float tensor.
    pub fn dense(t: Tensor) -> Result<Weight> {
        ensure!(t.dtype().is_float(), "dense weight must be a float tensor, got {}", t.dtype());
        ensure!(matches!(t.shape().len(), 2 | 3), "dense weight must be 2-D or 3-D, got {:?}", t.shape());
        Ok(Weight::Dense(t))
    }

    /// Check and build an MLX affine weight. `rows`/`cols` are the logical
    /// (unpacked) sizes.
    pub fn affine(q: Tensor, scales: Tensor, biases: Tensor, bits: u32, group_size: usize) -> Result<Weight> {
        ensure!(matches!(bits, 2..=8) && bits != 7, "unsupported bits {bits} (MLX affine supports 2, 3, 4, 5, 6, 8)");
        ensure!(matches!(group_size, 32 | 64 | 128), "unsupported group_size {group_size} (32, 64 or 128)");
        ensure!(q.dtype() == DType::U32, "packed weight must be U32, got {}", q.dtype());
        let qs = q.shape().to_vec();
        ensure!(matches!(qs.len(), 2 | 3), "packed weight must be 2-D or 3-D, got {qs:?}");
        let (experts, rows, words) = if qs.len() == 3 { (qs[0], qs[1], qs[2]) } else { (1, qs[0], qs[1]) };
        ensure!(
            (words * 32) % bits as usize == 0,
            "packed width {words} words is not a whole number of {bits}-bit values"
        );
        let cols = words * 32 / bits as usize;
        ensure!(cols.is_multiple_of(group_size), "{cols} columns are not a multiple of group_size {group_size}");
        let mut want = qs.clone();
        *want.last_mut().unwrap() = cols / group_size;
        ensure!(
            scales.shape() == want.as_slice(),
            "scales have shape {:?}, but bits={bits} and group_size={group_size} with packed weight {qs:?} need {want:?}",
            scales.shape()
        );
        ensure!(
            biases.shape() == scales.shape(),
            "biases {:?} differ from scales {:?}",
            biases.shape(),
            scales.shape()
        );
        ensure!(scales.dtype().is_float() && biases.dtype().is_float(), "scales and biases must be float tensors");
        Ok(Weight::Affine { q, scales, biases, bits, group_size, experts, rows, cols })
    }

    /// Check and build a GGUF block weight from its raw bytes.
    pub fn gguf(data: Tensor, ty: GgmlType, experts: usize, rows: usize, cols: usize) -> Result<Weight> {
        ensure!(
            cols.is_multiple_of(ty.block_size()),
            "row of {cols} elements is not a multiple of {}'s block size {}",
            ty.name(),
            ty.block_size()
        );
        let need = experts * rows * ty.row_bytes(cols);
        ensure!(data.size_bytes() == need, "{} data is {} bytes, expected {need}", ty.name(), data.size_bytes());
        Ok(Weight::Gguf { data, ty, experts, rows, cols })
    }

    /// Bytes of storage (what a full pass over the weight reads).
    pub fn size_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.size_bytes(),
            Weight::Affine { q, scales, biases, .. } => q.size_bytes() + scales.size_bytes() + biases.size_bytes(),
            Weight::Gguf { data, .. } => data.size_bytes(),
        }
    }

    /// Logical element count.
    pub fn numel(&self) -> usize {
        let (e, r, c) = self.dims();
        e * r * c
    }

    /// Bytes of one row (one output feature) of one expert.
    pub fn row_bytes(&self) -> usize {
        let (e, r, _) = self.dims();
        self.size_bytes() / (e * r).max(1)
    }

    /// A short description of the format, e.g. `BF16`, `MLX 4-bit g64`, `Q4_K`.
    pub fn format(&self) -> String {
        match self {
            Weight::Dense(t) => t.dtype().name().to_string(),
            Weight::Affine { bits, group_size, .. } => format!("MLX {bits}-bit g{group_size}"),
            Weight::Gguf { ty, .. } => ty.name().to_string(),
        }
    }

    /// Dequantize row `row` of expert `expert` into `out` (`cols` values).
    /// The reference path; the backends' kernels must agree with it.
    pub fn dequant_row(&self, expert: usize, row: usize, out: &mut [f32]) -> Result<()> {
        let (e, r, c) = self.dims();
        ensure!(
            expert < e && row < r && out.len() == c,
            "dequant_row: ({expert}, {row}) of {e}x{r}x{c} into {}",
            out.len()
        );
        let idx = expert * r + row;
        match self {
            Weight::Dense(t) => {
                let range = idx * c..(idx + 1) * c;
                match t.dtype() {
                    DType::F32 => out.copy_from_slice(&t.as_f32()?[range]),
                    DType::BF16 => {
                        t.as_u16()?[range].iter().zip(out).for_each(|(&b, o)| *o = crate::dtype::bf16_to_f32(b))
                    }
                    DType::F16 => t.as_u16()?[range].iter().zip(out).for_each(|(&b, o)| *o = f16_to_f32(b)),
                    d => bail!("dense weight of dtype {d}"),
                }
            }
            Weight::Affine { q, scales, biases, bits, group_size, .. } => {
                let words = c * *bits as usize / 32;
                let qw: &[u32] = bytemuck::cast_slice(q.host_bytes()?);
                let qrow = &qw[idx * words..(idx + 1) * words];
                let ng = c / group_size;
                let (s, b) = (float_row(scales, idx * ng, ng)?, float_row(biases, idx * ng, ng)?);
                for (i, o) in out.iter_mut().enumerate() {
                    let g = i / group_size;
                    *o = s[g] * unpack(qrow, *bits, i) as f32 + b[g];
                }
            }
            Weight::Gguf { data, ty, .. } => {
                let rb = ty.row_bytes(c);
                let bytes = &data.host_bytes()?[idx * rb..(idx + 1) * rb];
                crate::quant::ggml::dequant_row(*ty, bytes, out);
            }
        }
        Ok(())
    }
}

/// `n` values of a float tensor starting at element `start`, as f32.
fn float_row(t: &Tensor, start: usize, n: usize) -> Result<Vec<f32>> {
    Ok(match t.dtype() {
        DType::F32 => t.as_f32()?[start..start + n].to_vec(),
        DType::BF16 => t.as_u16()?[start..start + n].iter().map(|&b| crate::dtype::bf16_to_f32(b)).collect(),
        DType::F16 => t.as_u16()?[start..start + n].iter().map(|&b| f16_to_f32(b)).collect(),
        d => bail!("scales/biases of dtype {d}"),
    })
}

/// Value `i` of a little-end-first `bits`-bit stream packed in `u32` words.
#[inline(always)]
pub fn unpack(words: &[u32], bits: u32, i: usize) -> u32 {
    let bit = i * bits as usize;
    let (w, s) = (bit / 32, (bit % 32) as u32);
    let mask = (1u32 << bits) - 1;
    let lo = words[w] >> s;
    if s + bits > 32 {
        (lo | (words[w + 1] << (32 - s))) & mask
    } else {
        lo & mask
    }
}

/// Pack `bits`-bit values (each `< 2^bits`) into `u32` words, little-end first.
pub fn pack(values: &[u32], bits: u32) -> Vec<u32> {
    let mut words = vec![0u32; (values.len() * bits as usize).div_ceil(32)];
    for (i, &v) in values.iter().enumerate() {
        let bit = i * bits as usize;
        let (w, s) = (bit / 32, (bit % 32) as u32);
        words[w] |= v << s;
        if s + bits > 32 {
            words[w + 1] |= v >> (32 - s);
        }
    }
    words
}

pub mod ggml;
