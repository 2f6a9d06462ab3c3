//! The KV cache of one sequence: a contiguous `[capacity, kv_heads, head_dim]`
//! buffer per layer, allocated once, and the number of positions filled.

use anyhow::Result;
use fusebox_core::{Backend, LayerKv};
use fusebox_models::Decoder;

pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// Positions filled so far.
    pub len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(model: &Decoder, be: &dyn Backend, capacity: usize) -> Result<KvCache> {
        let layers = (0..model.layers.len()).map(|_| model.kv_layer(be, capacity)).collect::<Result<_>>()?;
        Ok(KvCache { layers, len: 0, capacity })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Forget the contents (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}
