//! The per-layer key/value cache storage that attention reads.
//!
//! The op set only needs the two tensors of a layer; how many sequences,
//! how long, and (later) how pages are laid out is the engine's business.

use crate::dtype::DType;
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

impl Pages<'_> {
    /// Check the shapes every backend relies on for `m` query rows over a
    /// cache of `cap` rows: `(sequences, blocks a table row holds, log2 of
    /// the block size)`. (What the tables name is checked where they can be
    /// read: on the CPU.)
    pub fn shape(&self, m: usize, cap: usize, op: &str) -> anyhow::Result<(usize, usize, u32)> {
        use anyhow::ensure;
        let ts = self.tables.shape();
        ensure!(
            self.seqs.dtype() == DType::I32 && self.seqs.numel() == m,
            "{op}: {} sequence ids for {m} rows",
            self.seqs.numel()
        );
        ensure!(
            ts.len() == 2 && ts[1] > 0 && self.tables.dtype() == DType::I32,
            "{op}: block tables must be I32 [sequences, blocks], got {ts:?} {}",
            self.tables.dtype()
        );
        let bs = self.block_size;
        ensure!(bs.is_power_of_two(), "{op}: block size {bs} is not a power of two");
        ensure!(cap.is_multiple_of(bs), "{op}: cache of {cap} positions is not whole blocks of {bs}");
        Ok((ts[0], ts[1], bs.trailing_zeros()))
    }
}
