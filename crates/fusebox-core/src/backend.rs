//! The op set.
//!
//! Every architecture is written once against this trait; every backend
//! implements all of it. Ops write into caller-provided output tensors
//! (destination passing), so a decode step that reuses one workspace
//! allocates nothing, and a device backend can capture the step as a graph.
//!
//! Conventions shared by all ops:
//! * activations are f32 on the CPU backend (a device backend may use bf16);
//! * "rows" means the tensor viewed as `[numel / last_dim, last_dim]`;
//! * positions and token ids are `I32` tensors on the backend's device, so
//!   the per-step values live in device memory and are never baked into a
//!   captured graph;
//! * a linear weight `w` is `[out_features, in_features]` and `matmul`
//!   computes `x @ w^T`.

use anyhow::{ensure, Result};

use crate::dtype::DType;
use crate::fusion::Site;
use crate::kv::{LayerKv, Pages};
use crate::quant::Weight;
use crate::rope::RopeStyle;
use crate::tensor::Tensor;

/// Inputs of up to this many rows are computed row by row exactly as a
/// one-row (decode) step computes them, on every backend: matmuls, expert
/// matmuls and attention give each row bitwise the values a one-token step
/// at that position gives. So a speculative verify pass of up to
/// `ROW_EXACT_MAX - 1` drafts scores each position as plain decoding would;
/// longer inputs (prefill) take the faster blocked paths.
pub const ROW_EXACT_MAX: usize = 32;

pub trait Backend: Send + Sync {
    /// Human-readable name, e.g. `cpu (2 threads)`.
    fn name(&self) -> String;

    /// The hardware, for benchmark records (e.g. `NVIDIA H100 80GB HBM3`).
    fn device_name(&self) -> String {
        self.name()
    }

    /// Allocate a zero-filled tensor on this backend's device.
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// Move a host tensor (typically a memory-mapped weight) onto the device.
    fn upload(&self, t: Tensor) -> Result<Tensor>;
    /// Copy a float tensor to host f32 values, reusing `out`'s allocation.
    fn read_f32(&self, t: &Tensor, out: &mut Vec<f32>) -> Result<()>;
    /// Run one forward pass (a batch of ops) as a unit. The CPU backend runs
    /// it inside its thread pool, so the ops' parallel loops are scheduled
    /// without touching the global job queue (which would allocate); a
    /// device backend can use this boundary to capture or replay a graph.
    fn run(&self, f: &mut (dyn FnMut() -> Result<()> + Send)) -> Result<()> {
        f()
    }
    /// Run one forward pass that repeats with the same buffers (the decode
    /// step). `key` names the buffers (the caller changes it whenever any
    /// buffer the pass touches is reallocated). A device backend may record
    /// the pass as a graph and replay it instead of calling `f`, so `f` must
    /// take every per-step value from device tensors written before the call.
    fn run_graph(&self, key: u64, f: &mut (dyn FnMut() -> Result<()> + Send)) -> Result<()> {
        let _ = key;
        self.run(f)
    }
    /// Overwrite an `I32` tensor (token ids, positions) from host values.
    fn write_i32(&self, t: &mut Tensor, data: &[i32]) -> Result<()>;
    /// Overwrite an `F32` tensor from host values.
    fn write_f32(&self, t: &mut Tensor, data: &[f32]) -> Result<()>;
    /// Read an `I32` tensor to the host (waits for the device).
    fn read_i32(&self, t: &Tensor, out: &mut Vec<i32>) -> Result<()>;
    /// Wait until all queued work has finished.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// The element type of the KV cache on this backend.
    fn kv_dtype(&self) -> DType {
        DType::F32
    }
    /// Put a weight on the device, in the layout this backend's kernels
    /// read (a device backend may convert formats it has no kernel for).
    fn upload_weight(&self, w: Weight) -> Result<Weight> {
        upload_weight_tensors(self, w)
    }
    /// Fill a tensor with pseudo-random values from `seed` (synthetic
    /// benchmark weights): floats uniform in `[lo, hi)`, integer types with
    /// uniformly random bits.
    fn fill_random(&self, t: &mut Tensor, seed: u64, lo: f32, hi: f32) -> Result<()>;
    /// Device-to-device copy bandwidth in GB/s (bytes read plus bytes
    /// written per second), measured now: the roofline's denominator.
    fn copy_bandwidth(&self) -> Result<f64>;

    /// `out[i, :] = table[ids[i], :]` (any weight format, dequantized).
    fn embedding(&self, table: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()>;
    /// RMSNorm over the last dimension: `out = x / sqrt(mean(x^2) + eps) * w`.
    /// `w` has the length of `x`'s last dimension, so a `[m, heads, head_dim]`
    /// tensor with a `[head_dim]` weight is a per-head (QK) norm.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()>;
    /// `out[m, n] = x[m, k] @ w[n, k]^T`, with `x` read as `[numel / k, k]`
    /// (so `[m, heads, head_dim]` attention output feeds `o_proj` directly);
    /// a GEMV when m == 1.
    fn matmul(&self, x: &Tensor, w: &Weight, out: &mut Tensor) -> Result<()>;
    /// Mixture-of-experts projection: for row r and slot s,
    /// `out[r, s, :] = w[ids[r, s]] @ x_rs` where `w` is `[experts, n, k]`,
    /// `ids` is `I32 [m, slots]`, and `x_rs` is `x[r, :]` when `x` is
    /// `[m, k]` (shared input) or `x[r, s, :]` when it is `[m, slots, k]`.
    fn expert_matmul(&self, x: &Tensor, w: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()>;
    /// MoE routing: softmax (f32) over each row of `logits [m, experts]`,
    /// the `k` largest (ties: lower expert id first) into `ids [m, k]` (I32)
    /// and their probabilities into `weights [m, k]`, renormalised to sum to
    /// 1 when `renormalize`.
    fn topk_router(&self, logits: &Tensor, renormalize: bool, ids: &mut Tensor, weights: &mut Tensor) -> Result<()>;
    /// `out[r, :] = sum_s weights[r, s] * y[r, s, :]` (combine expert outputs).
    fn moe_combine(&self, y: &Tensor, weights: &Tensor, out: &mut Tensor) -> Result<()>;
    /// Rotary embedding in place on `x[m, heads, head_dim]`, row i at
    /// position `positions[i]`, with `inv_freq[head_dim / 2]`.
    fn rope(&self, x: &mut Tensor, positions: &Tensor, inv_freq: &Tensor, style: RopeStyle) -> Result<()>;
    /// Store `k`, `v` (`[m, kv_heads, head_dim]`) at rows `positions[i]` of
    /// the cache (a contiguous cache's positions, or a paged cache's slots,
    /// [`Pages::slots`]).
    fn kv_write(&self, k: &Tensor, v: &Tensor, positions: &Tensor, cache: &mut LayerKv) -> Result<()>;
    /// Causal attention with grouped-query heads: query row i (`q[m, heads,
    /// head_dim]`) attends to cache positions `0..=positions[i]`.
    fn attention(&self, q: &Tensor, cache: &LayerKv, positions: &Tensor, scale: f32, out: &mut Tensor) -> Result<()>;
    /// [`Backend::attention`] over a paged cache: query row i attends to
    /// positions `0..=pages.positions[i]` of sequence `pages.seqs[i]`. The
    /// rows of a sequence with at most [`ROW_EXACT_MAX`] rows in the call are
    /// computed as a one-row step computes them, whatever else the call holds,
    /// and a paged cache gives bitwise what a contiguous cache holding the
    /// same rows gives.
    fn paged_attention(&self, q: &Tensor, cache: &LayerKv, pages: &Pages, scale: f32, out: &mut Tensor) -> Result<()>;
    /// Bytes of memory free for new buffers on this backend's device (the
    /// CPU: the system's available memory), where it can tell.
    fn free_memory(&self) -> Option<usize> {
        None
    }
    /// Whether [`Backend::paged_attention`] runs here (CUDA: not yet).
    fn has_paged_attention(&self) -> bool {
        true
    }
    /// Whether the fusible decode site `site` runs its fused kernel on this
    /// backend ([`crate::fusion::FusionPolicy`]).
    fn fused(&self, site: Site) -> bool {
        self.fusion_policy().is_some_and(|p| p.is_on(site))
    }
    /// This backend's fusion decisions, with where each came from.
    fn fusion_policy(&self) -> Option<&crate::fusion::FusionPolicy> {
        None
    }
    /// Switch a fusible site on or off from now on (A/B runs; no effect on a
    /// backend without fused paths).
    fn set_fused(&self, site: Site, on: bool) {
        if let Some(p) = self.fusion_policy() {
            p.override_site(site, Some(on));
        }
    }
    /// Put every fusible site on the graph path while `on` (the reference
    /// pass of `FUSEBOX_FUSED_PARITY_CHECK`), without losing the decisions.
    fn force_graph_path(&self, on: bool) {
        if let Some(p) = self.fusion_policy() {
            p.force_graph(on);
        }
    }
    /// `x += y`, then `out = rms_norm(x) * w`: the residual add fused with the
    /// next RMSNorm (site `add_rms_norm`). The default is the graph path.
    fn add_rms_norm(&self, x: &mut Tensor, y: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        self.add_assign(x, y)?;
        self.rms_norm(x, w, eps, out)
    }
    /// Site `qk_norm`: the q, k and v projections of `h`, the per-head norms
    /// (when the model has them), RoPE, the query into `b.q`, keys and values
    /// appended to `cache`, in as few kernels as the backend can. The
    /// default is the graph path ([`attn_inputs_graph`]).
    fn qkv_rope(&self, h: &Tensor, a: &AttnIn, b: &mut AttnBufs, cache: &mut LayerKv) -> Result<()> {
        attn_inputs_graph(self, h, a, b, cache, false)
    }
    /// Site `rope_kv_append`: with the projections in `b.q_raw`, `b.k_raw`
    /// and `b.v`, the per-head norms, RoPE, the query into `b.q`, keys and
    /// values appended to `cache`. The default is the graph path.
    fn rope_kv_append(&self, a: &AttnIn, b: &mut AttnBufs, cache: &mut LayerKv) -> Result<()> {
        norm_rope_append_graph(self, a, b, cache, true)
    }
    /// Site `moe`: the expert MLPs of the selected experts (`e.ids`) applied
    /// to `h` and summed with the router weights into `out`. The default is
    /// the graph path ([`moe_experts_graph`]).
    fn moe_experts(&self, h: &Tensor, e: &MoeIn, b: &mut MoeBufs, out: &mut Tensor) -> Result<()> {
        moe_experts_graph(self, h, e, b, out)
    }
    /// Site `swiglu`: `b.act = silu(h @ gate^T) * (h @ up^T)` for a dense
    /// MLP. The default is the graph path ([`swiglu_graph`]).
    fn swiglu(&self, h: &Tensor, gate: &Weight, up: &Weight, b: &mut SwigluBufs) -> Result<()> {
        swiglu_graph(self, h, gate, up, b)
    }
    /// Site `dflash_attn`: one layer of a DFlash draft block: the q/k/v
    /// projections of the block rows `h`, per-head norms, RoPE, the block's
    /// keys and values into `c.cache` at the block positions, and attention
    /// of every block row to keys `0..=c.limits[i]` into `c.out`. The
    /// default is the graph path ([`dflash_attn_graph`]).
    fn dflash_attn(&self, h: &Tensor, a: &AttnIn, b: &mut AttnBufs, c: &mut DraftAttn) -> Result<()> {
        dflash_attn_graph(self, h, a, b, c)
    }
    /// `out = silu(gate) * up`.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()>;
    /// `x += y` (the residual add).
    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()>;
    /// Softmax over the last dimension, computed in f32.
    fn softmax(&self, x: &Tensor, out: &mut Tensor) -> Result<()>;
    /// Index of the largest value of each row (the first one on ties), as `I32`.
    fn argmax(&self, x: &Tensor, out: &mut Tensor) -> Result<()>;
    /// Copy `n` rows of `src` starting at `src_row` into `dst` starting at `dst_row`.
    fn copy_rows(&self, src: &Tensor, src_row: usize, dst: &mut Tensor, dst_row: usize, n: usize) -> Result<()>;
    /// `dst[r, col..col + n] = src[r, :]` for every row `r` of `src [m, n]`
    /// into `dst [m, N]` (f32): one slot of a row-wise concatenation (the
    /// target hidden states a DFlash draft reads).
    fn copy_cols(&self, src: &Tensor, dst: &mut Tensor, col: usize) -> Result<()>;
    /// Draw one token from the last row of `logits` (see [`crate::sample`]).
    /// `params` is the `F32 [SAMPLE_PARAMS]` block written by
    /// [`crate::sample::encode_params`]; `history` (`I32 [cap]`) holds the
    /// context so far and `state` (`I32 [2]`: history length, draw counter)
    /// how much of it is valid. The token goes to `out[0]` and is appended to
    /// the history; the counter advances, so a graph replay draws afresh.
    fn sample(
        &self,
        logits: &Tensor,
        params: &Tensor,
        history: &mut Tensor,
        state: &mut Tensor,
        out: &mut Tensor,
    ) -> Result<()>;
}

/// What the attention inputs of one layer are made from.
pub struct AttnIn<'a> {
    pub wq: &'a Weight,
    pub wk: &'a Weight,
    pub wv: &'a Weight,
    /// Per-head RMSNorm weights (`[head_dim]`, Qwen3); `None` for Llama.
    pub q_norm: Option<&'a Tensor>,
    pub k_norm: Option<&'a Tensor>,
    pub eps: f32,
    pub positions: &'a Tensor,
    /// The cache rows the keys and values go to when they are not the
    /// positions (a paged cache's [`Pages::slots`]); `None`: the positions.
    pub slots: Option<&'a Tensor>,
    pub inv_freq: &'a Tensor,
    pub style: RopeStyle,
}

/// Activation buffers of the attention inputs, `[m, heads, head_dim]` for
/// the query and `[m, kv_heads, head_dim]` for keys and values (f32). The
/// query for attention ends in `q`; the others are scratch.
pub struct AttnBufs<'a> {
    pub q_raw: &'a mut Tensor,
    pub k_raw: &'a mut Tensor,
    pub v: &'a mut Tensor,
    pub q: &'a mut Tensor,
    pub k: &'a mut Tensor,
}

/// What a DFlash draft layer's attention works on besides its inputs: the
/// draft's KV cache (the context, then the block appended at its
/// positions), the last key each block row sees, the score scale, and the
/// output `[rows, heads, head_dim]`.
pub struct DraftAttn<'a> {
    pub cache: &'a mut LayerKv,
    pub limits: &'a Tensor,
    pub scale: f32,
    pub out: &'a mut Tensor,
}

/// The experts of one MoE block and the router's choice.
pub struct MoeIn<'a> {
    /// Stacked `[experts, width, hidden]`.
    pub gate: &'a Weight,
    pub up: &'a Weight,
    /// Stacked `[experts, hidden, width]`.
    pub down: &'a Weight,
    /// `I32 [m, k]`: the selected experts.
    pub ids: &'a Tensor,
    /// `[m, k]`: their router weights.
    pub weights: &'a Tensor,
}

/// Scratch of the MoE expert path: `gate`, `up`, `act` `[m, k, width]`,
/// `y` `[m, k, hidden]`.
pub struct MoeBufs<'a> {
    pub gate: &'a mut Tensor,
    pub up: &'a mut Tensor,
    pub act: &'a mut Tensor,
    pub y: &'a mut Tensor,
}

/// Scratch of the dense MLP's first half: `gate`, `up` and `act`, `[m, width]`.
pub struct SwigluBufs<'a> {
    pub gate: &'a mut Tensor,
    pub up: &'a mut Tensor,
    pub act: &'a mut Tensor,
}

/// The graph path of gate/up + SwiGLU: two projections, then `silu_mul`.
pub fn swiglu_graph<B: Backend + ?Sized>(
    be: &B,
    h: &Tensor,
    gate: &Weight,
    up: &Weight,
    b: &mut SwigluBufs,
) -> Result<()> {
    be.matmul(h, gate, b.gate)?;
    be.matmul(h, up, b.up)?;
    be.silu_mul(b.gate, b.up, b.act)
}

/// The graph path of the attention inputs: three projections, then (unless
/// `fused_append`, which hands the rest to [`Backend::rope_kv_append`])
/// [`norm_rope_append_graph`]. A projection goes straight into `q` / `k`
/// when nothing reads it raw.
pub fn attn_inputs_graph<B: Backend + ?Sized>(
    be: &B,
    h: &Tensor,
    a: &AttnIn,
    b: &mut AttnBufs,
    cache: &mut LayerKv,
    fused_append: bool,
) -> Result<()> {
    let q_to = if a.q_norm.is_some() || fused_append { &mut *b.q_raw } else { &mut *b.q };
    be.matmul(h, a.wq, q_to)?;
    let k_to = if a.k_norm.is_some() || fused_append { &mut *b.k_raw } else { &mut *b.k };
    be.matmul(h, a.wk, k_to)?;
    be.matmul(h, a.wv, b.v)?;
    if fused_append {
        be.rope_kv_append(a, b, cache)
    } else {
        norm_rope_append_graph(be, a, b, cache, false)
    }
}

/// The graph path of site `dflash_attn`: the attention inputs one op each
/// ([`attn_inputs_graph`]), then [`Backend::attention`].
pub fn dflash_attn_graph<B: Backend + ?Sized>(
    be: &B,
    h: &Tensor,
    a: &AttnIn,
    b: &mut AttnBufs,
    c: &mut DraftAttn,
) -> Result<()> {
    attn_inputs_graph(be, h, a, b, c.cache, false)?;
    be.attention(b.q, c.cache, c.limits, c.scale, c.out)
}

/// Check [`Backend::copy_cols`]' operands: `(rows, src width, dst width)`.
pub fn copy_cols_dims(src: &Tensor, dst: &Tensor, col: usize) -> Result<(usize, usize, usize)> {
    ensure!(
        src.dtype() == DType::F32 && dst.dtype() == DType::F32,
        "copy_cols: {} into {} (f32 only)",
        src.dtype(),
        dst.dtype()
    );
    let (m, n, wide) = (src.rows(), src.last_dim(), dst.last_dim());
    ensure!(dst.rows() == m, "copy_cols: {m} rows into {} rows", dst.rows());
    ensure!(col + n <= wide, "copy_cols: columns {col}..{} of rows of {wide}", col + n);
    Ok((m, n, wide))
}

/// The graph path of per-head norm + RoPE + KV append, one op each. The
/// projections are in `q_raw` / `k_raw` when the head has a norm or
/// `from_raw`, else already in `q` / `k`.
pub fn norm_rope_append_graph<B: Backend + ?Sized>(
    be: &B,
    a: &AttnIn,
    b: &mut AttnBufs,
    cache: &mut LayerKv,
    from_raw: bool,
) -> Result<()> {
    for (norm, raw, out) in [(a.q_norm, &*b.q_raw, &mut *b.q), (a.k_norm, &*b.k_raw, &mut *b.k)] {
        match norm {
            Some(w) => be.rms_norm(raw, w, a.eps, out)?,
            None if from_raw => be.copy_rows(raw, 0, out, 0, raw.rows())?,
            None => {}
        }
    }
    be.rope(b.q, a.positions, a.inv_freq, a.style)?;
    be.rope(b.k, a.positions, a.inv_freq, a.style)?;
    be.kv_write(b.k, b.v, a.slots.unwrap_or(a.positions), cache)
}

/// The graph path of the MoE experts: gate and up projections, SwiGLU, down
/// projection, weighted sum; one op each.
pub fn moe_experts_graph<B: Backend + ?Sized>(
    be: &B,
    h: &Tensor,
    e: &MoeIn,
    b: &mut MoeBufs,
    out: &mut Tensor,
) -> Result<()> {
    be.expert_matmul(h, e.gate, e.ids, b.gate)?;
    be.expert_matmul(h, e.up, e.ids, b.up)?;
    be.silu_mul(b.gate, b.up, b.act)?;
    be.expert_matmul(b.act, e.down, e.ids, b.y)?;
    be.moe_combine(b.y, e.weights, out)
}

/// Upload every tensor of a weight as it is (the default
/// [`Backend::upload_weight`]; a backend that re-lays out some formats calls
/// it for the rest).
pub fn upload_weight_tensors<B: Backend + ?Sized>(be: &B, w: Weight) -> Result<Weight> {
    Ok(match w {
        Weight::Dense(t) => Weight::Dense(be.upload(t)?),
        Weight::Affine { q, scales, biases, bits, group_size, experts, rows, cols } => Weight::Affine {
            q: be.upload(q)?,
            scales: be.upload(scales)?,
            biases: be.upload(biases)?,
            bits,
            group_size,
            experts,
            rows,
            cols,
        },
        Weight::Gguf { data, ty, experts, rows, cols } => {
            Weight::Gguf { data: be.upload(data)?, ty, experts, rows, cols }
        }
    })
}
