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

/// One step's view of a paged cache, for [`crate::Backend::paged_attention`]
/// and the KV write. The cache is `[blocks * block_size, kv_heads, head_dim]`;
/// position `p` of sequence `s` is cache row
/// `tables[s, p / block_size] * block_size + p % block_size`. Every tensor is
/// `I32` on the backend's device, so a step's values are never baked into a
/// captured graph.
pub struct Pages<'a> {
    /// `[m]`: each query row's position in its sequence (it attends to
    /// positions `0..=positions[i]`).
    pub positions: &'a Tensor,
    /// `[m]`: each query row's sequence, a row of `tables`.
    pub seqs: &'a Tensor,
    /// `[sequences, max_blocks]`: each sequence's block ids in position
    /// order (entries past a sequence's length are never read).
    pub tables: &'a Tensor,
    /// `[m]`: the cache row each query row's key and value go to, the
    /// `positions` of [`crate::Backend::kv_write`].
    pub slots: &'a Tensor,
    /// Positions per block, a power of two.
    pub block_size: usize,
}
