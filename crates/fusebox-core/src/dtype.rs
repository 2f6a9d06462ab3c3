//! Element types.

use std::fmt;

/// The element type of a [`crate::Tensor`].
///
/// Float types are what weights and activations use. `U32` and `U8` are raw
/// packed-integer storage for quantised formats (MLX affine packs several
/// values into each `u32`; GGUF blocks are byte streams), and `I32` holds
/// token ids and positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    U32,
    U8,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// True for the floating-point types a dense weight may have.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The name used by safetensors headers (`"BF16"`, `"F32"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::U8 => "U8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, round to nearest even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// f16 bits to f32 (exact).
#[inline(always)]
pub fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// f32 to f16 bits, round to nearest even.
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// splitmix64: the mixing function behind [`random_bits`].
pub const fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// Element `i` of the random stream `seed` (the same on every backend, so a
/// synthetic model has the same weights on CPU and GPU).
pub const fn random_bits(seed: u64, i: u64) -> u64 {
    splitmix64(seed ^ splitmix64(i))
}

/// Element `i` of the stream `seed` as a float uniform in `[lo, hi)`.
pub fn random_f32(seed: u64, i: u64, lo: f32, hi: f32) -> f32 {
    let u = (random_bits(seed, i) >> 40) as f32 * (1.0 / 16777216.0);
    lo + (hi - lo) * u
}

/// `n` pseudo-random token ids below `vocab` from `seed` (xorshift64; benchmark
/// prompts and test inputs, the same on every machine).
pub fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab.max(1) as u64) as u32
        })
        .collect()
}
