//! Where the decoder gets its weights from, independent of the file format.
//!
//! The decoder asks for weights by their Hugging Face module path
//! (`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`, ...) and the
//! logical shape it expects; each format maps that onto its own names and
//! encodings (HF safetensors dense or MLX affine in [`crate::safetensors`],
//! GGUF blocks in [`crate::gguf`]). Every implementation checks shapes and
//! dtypes and names the file and tensor in its errors.

use anyhow::Result;
use fusebox_core::{Tensor, Weight};

pub trait WeightSource {
    /// A linear layer's or embedding table's weight, logically `[rows, cols]`
    /// (rows = output features), e.g. `model.layers.3.self_attn.q_proj`.
    fn linear(&self, module: &str, rows: usize, cols: usize) -> Result<Weight>;

    /// A 1-D norm weight of `n` values (e.g. `model.norm`), as f32.
    fn norm(&self, module: &str, n: usize) -> Result<Tensor>;

    /// The stacked experts of one projection of an MoE block, logically
    /// `[experts, rows, cols]`: `mlp` is the block (`model.layers.3.mlp`),
    /// `proj` is `gate_proj`, `up_proj` or `down_proj`.
    fn experts(&self, mlp: &str, proj: &str, experts: usize, rows: usize, cols: usize) -> Result<Weight>;

    /// Whether the source has a weight for this module (e.g. an untied `lm_head`).
    fn has(&self, module: &str) -> bool;
}

/// Another source with every linear weight dequantized to dense f32 at
/// load: a quantized checkpoint as its full-precision reference (4 bytes a
/// parameter; slow, exact to the stored values).
pub struct Dequantized<'a>(pub &'a dyn WeightSource);

fn to_f32(w: Weight, what: &str) -> Result<Weight> {
    if matches!(&w, Weight::Dense(t) if t.dtype() == fusebox_core::DType::F32) {
        return Ok(w);
    }
    let (e, r, c) = w.dims();
    let mut out = vec![0f32; e * r * c];
    for (i, row) in out.chunks_exact_mut(c).enumerate() {
        w.dequant_row(i / r, i % r, row).map_err(|err| anyhow::anyhow!("{what}: {err:#}"))?;
    }
    let shape: Vec<usize> = if e == 1 { vec![r, c] } else { vec![e, r, c] };
    Weight::dense(Tensor::from_f32(&shape, &out)?)
}

impl WeightSource for Dequantized<'_> {
    fn linear(&self, module: &str, rows: usize, cols: usize) -> Result<Weight> {
        to_f32(self.0.linear(module, rows, cols)?, module)
    }
    fn norm(&self, module: &str, n: usize) -> Result<Tensor> {
        self.0.norm(module, n)
    }
    fn experts(&self, mlp: &str, proj: &str, experts: usize, rows: usize, cols: usize) -> Result<Weight> {
        to_f32(self.0.experts(mlp, proj, experts, rows, cols)?, &format!("{mlp}.experts.{proj}"))
    }
    fn has(&self, module: &str) -> bool {
        self.0.has(module)
    }
}
