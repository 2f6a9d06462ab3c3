//! The per-layer key/value cache storage that attention reads.
//!
//! The op set only needs the two tensors of a layer; how many sequences,
//! how long, and (later) how pages are laid out is the engine's business.

use crate::tensor::Tensor;

/// Keys and values of one layer, each `[capacity, n_kv_heads, head_dim]`.
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

impl LayerKv {
    /// Positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.k.shape()[0]
    }
}
