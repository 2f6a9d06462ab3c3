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
