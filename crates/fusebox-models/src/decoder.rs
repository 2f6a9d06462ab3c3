//! The decoder shared by every supported architecture.
//!
//! Llama and Qwen3 differ only in configuration (Qwen3 adds a per-head
//! RMSNorm on q and k), so there is one implementation, written against the
//! [`Backend`] op set and nothing else. A forward pass writes into a
//! [`Workspace`] sized for `m` tokens; the engine keeps one workspace for
//! single-token decode and reuses it every step, so decode allocates nothing.

use anyhow::{bail, ensure, Result};
use fusebox_core::backend::{
    attn_inputs_graph, moe_experts_graph, swiglu_graph, AttnBufs, AttnIn, MoeBufs, MoeIn, SwigluBufs,
};
use fusebox_core::fusion::Site;
use fusebox_core::{rope, Backend, DType, LayerKv, Pages, Tensor, Weight};

use crate::config::ModelConfig;
use crate::source::WeightSource;

/// The MLP of one layer: a dense SwiGLU, or a sparse mixture of experts.
// One per layer, never moved in a hot loop: the size difference is harmless.
#[allow(clippy::large_enum_variant)]
pub enum Mlp {
    Dense {
        gate: Weight,
        up: Weight,
        down: Weight,
    },
    /// `router` is `[experts, hidden]`; the experts are stacked `[experts, ..]`.
    Moe {
        router: Weight,
        gate: Weight,
        up: Weight,
        down: Weight,
        top_k: usize,
        renormalize: bool,
    },
}

/// The weights of one decoder layer.
pub struct Layer {
    pub attn_norm: Tensor,
    pub wq: Weight,
    pub wk: Weight,
    pub wv: Weight,
    pub wo: Weight,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub mlp_norm: Tensor,
    pub mlp: Mlp,
}

/// Which fused paths one forward pass takes: the backend's policy
/// ([`Backend::fused`]) for the sites that apply. Every site is a
/// single-token decode site; prefill (m > 1) takes the graph path.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fused {
    pub qkv: bool,
    pub rope_kv_append: bool,
    pub moe: bool,
    pub add_rms_norm: bool,
    pub swiglu: bool,
}

impl Fused {
    pub fn of(be: &dyn Backend, m: usize) -> Fused {
        if m != 1 {
            return Fused::default();
        }
        let qkv = be.fused(Site::QkNorm);
        Fused {
            qkv,
            // subsumed by qk_norm when both are on
            rope_kv_append: !qkv && be.fused(Site::RopeKvAppend),
            moe: be.fused(Site::Moe),
            add_rms_norm: be.fused(Site::AddRmsNorm),
            swiglu: be.fused(Site::Swiglu),
        }
    }
}

/// A loaded decoder: configuration plus weights on one backend.
pub struct Decoder {
    pub cfg: ModelConfig,
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<Weight>,
    pub inv_freq: Tensor,
}

/// Which rows of logits a forward pass produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's (generation).
    Last,
    /// Every position's (scoring and tests).
    All,
    /// Up to this many rows', named per pass ([`Workspace::set_batch`]): the
    /// last row of each sequence of a batch that samples.
    Rows(usize),
}

/// Activation buffers for a forward pass over `m` tokens.
pub struct Workspace {
    pub m: usize,
    pub mode: Logits,
    /// The model's vocabulary size (token ids are checked against it).
    vocab: usize,
    /// Token ids to run (`I32 [m]`), set with [`Workspace::set_tokens`].
    pub ids: Tensor,
    /// Their positions (`I32 [m]`).
    pub positions: Tensor,
    /// Host staging of `ids` and `positions` (capacity `m`).
    stage_ids: Vec<i32>,
    stage_pos: Vec<i32>,
    x: Tensor,
    h: Tensor,
    q_raw: Tensor,
    q: Tensor,
    k_raw: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    o: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    last_x: Tensor,
    last_h: Tensor,
    /// MoE buffers (empty for dense models).
    router_logits: Tensor,
    expert_ids: Tensor,
    expert_w: Tensor,
    moe_gate: Tensor,
    moe_up: Tensor,
    moe_act: Tensor,
    moe_out: Tensor,
    /// `[m, vocab]` for [`Logits::All`], `[1, vocab]` for [`Logits::Last`].
    pub logits: Tensor,
    /// Hidden states captured during the pass ([`Workspace::with_taps`]).
    taps: Option<Taps>,
    /// A batch over a paged cache ([`Workspace::set_batch`]); `None`: one
    /// sequence in a contiguous cache.
    paged: Option<PagedStep>,
    /// Whether the next pass reads `paged` (a batch that is one sequence
    /// with its blocks in order runs as a contiguous cache, see
    /// [`Batch::is_contiguous`]).
    paged_on: bool,
    /// [`Logits::Rows`]: the rows whose logits the pass produces, in order.
    logit_rows: Vec<usize>,
}

/// Where a batched pass's rows live in a paged cache ([`Pages`]).
struct PagedStep {
    seqs: Tensor,
    tables: Tensor,
    slots: Tensor,
    block_size: usize,
}

/// One pass over a batch of sequences in a paged cache: per row its token,
/// position, sequence (a row of `tables`) and cache slot; per sequence its
/// block table (`width` ids a row; `tables.len() / width` sequences); the
/// rows whose logits the pass produces.
pub struct Batch<'a> {
    pub ids: &'a [u32],
    pub positions: &'a [i32],
    pub seqs: &'a [i32],
    pub slots: &'a [i32],
    pub tables: &'a [i32],
    pub width: usize,
    pub block_size: usize,
    pub logit_rows: &'a [usize],
}

impl Batch<'_> {
    /// Whether this batch is one sequence whose blocks are the cache's first
    /// ones in order, so that each row's slot is its position and the
    /// sequence's keys lie where a contiguous cache keeps them: then the pass
    /// runs the contiguous cache's kernels (the fused decode sites, a
    /// one-sequence attention), the same work a lone sequence has always run.
    pub fn is_contiguous(&self) -> bool {
        let Some(&last) = self.positions.iter().max() else { return false };
        let used = (last as usize + 1).div_ceil(self.block_size.max(1));
        self.tables.len() == self.width
            && self.seqs.iter().all(|&s| s == 0)
            && self.positions == self.slots
            && used <= self.width
            && self.tables[..used].iter().enumerate().all(|(j, &b)| b == j as i32)
    }
}

/// The outputs of some layers, captured for a draft that reads them.
struct Taps {
    /// Layer indices, in slot order.
    layers: Vec<usize>,
    /// `[m, layers.len() * hidden]`: row r is the concatenation of row r of
    /// every listed layer's output.
    out: Tensor,
}

impl Workspace {
    /// Also capture the outputs of decoder `layers` (0-based, in this order)
    /// for every row of each pass, concatenated per row ([`Workspace::taps`]).
    /// Layer `i`'s output is transformers' `hidden_states[i + 1]`: the last
    /// layer's is taken after the final norm, as there.
    pub fn with_taps(mut self, be: &dyn Backend, layers: &[usize]) -> Result<Workspace> {
        let d = self.x.last_dim();
        let out = be.zeros(&[self.m, layers.len() * d], DType::F32)?;
        self.taps = Some(Taps { layers: layers.to_vec(), out });
        Ok(self)
    }

    /// The captured layer outputs of the last pass, `[m, layers * hidden]`.
    pub fn taps(&self) -> Option<&Tensor> {
        self.taps.as_ref().map(|t| &t.out)
    }

    /// Set up the next forward as a batch over a paged cache. The tables are
    /// uploaded each pass (their shape changes with the batch).
    pub fn set_batch(&mut self, be: &dyn Backend, b: &Batch) -> Result<()> {
        let m = self.m;
        ensure!(
            b.positions.len() == m && b.seqs.len() == m && b.slots.len() == m,
            "batch: {m} rows need {m} positions, sequences and slots"
        );
        ensure!(
            b.width > 0 && b.tables.len().is_multiple_of(b.width),
            "batch: {} table entries in rows of {}",
            b.tables.len(),
            b.width
        );
        match self.mode {
            Logits::Rows(n) => ensure!(
                b.logit_rows.len() <= n && b.logit_rows.iter().all(|&r| r < m),
                "batch: logit rows {:?} for a pass of {m} rows and {n} logit rows",
                b.logit_rows
            ),
            _ => bail!("batch: the workspace was not made for Logits::Rows"),
        }
        self.stage_pos.clear();
        self.stage_pos.extend_from_slice(b.positions);
        self.set_ids(be, b.ids)?;
        be.write_i32(&mut self.positions, &self.stage_pos)?;
        self.logit_rows.clear();
        self.logit_rows.extend_from_slice(b.logit_rows);
        self.paged_on = !b.is_contiguous();
        if !self.paged_on {
            return Ok(());
        }
        // the buffers of the last pass are written again when their shapes fit (the
        // tables change shape as sequences join, leave or take another block)
        let shape = [b.tables.len() / b.width, b.width];
        match &mut self.paged {
            Some(p) if p.tables.shape() == shape => {
                be.write_i32(&mut p.seqs, b.seqs)?;
                be.write_i32(&mut p.slots, b.slots)?;
                be.write_i32(&mut p.tables, b.tables)?;
                p.block_size = b.block_size;
            }
            _ => {
                let t = |shape: &[usize], v: &[i32]| be.upload(Tensor::from_i32(shape, v)?);
                self.paged = Some(PagedStep {
                    seqs: t(&[m], b.seqs)?,
                    tables: t(&shape, b.tables)?,
                    slots: t(&[m], b.slots)?,
                    block_size: b.block_size,
                });
            }
        }
        Ok(())
    }

    /// Check and stage token ids for the next forward.
    fn set_ids(&mut self, be: &dyn Backend, ids: &[u32]) -> Result<()> {
        ensure!(ids.len() == self.m, "workspace holds {} tokens, got {}", self.m, ids.len());
        // checked here, on the host, so every backend gives the same error (a
        // device kernel cannot return one)
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {} tokens", self.vocab);
        }
        self.stage_ids.clear();
        self.stage_ids.extend(ids.iter().map(|&t| t as i32));
        be.write_i32(&mut self.ids, &self.stage_ids)
    }

    /// Write token ids and their positions (`start..start+m`) for the next forward.
    pub fn set_tokens(&mut self, be: &dyn Backend, ids: &[u32], start: usize) -> Result<()> {
        // staged in buffers of the workspace's size: no allocation (decode
        // and speculative verify passes run this every step)
        self.set_ids(be, ids)?;
        self.stage_pos.clear();
        self.stage_pos.extend((start..start + self.m).map(|p| p as i32));
        self.paged_on = false;
        be.write_i32(&mut self.positions, &self.stage_pos)
    }

    /// Whether the next pass reads a paged cache's layout (false: one
    /// sequence in a contiguous cache).
    pub fn is_paged(&self) -> bool {
        self.paged_on
    }
}

impl Decoder {
    /// Load the weights `cfg` names from a source (any format), checking
    /// every shape, and place them on `be`.
    pub fn load(cfg: ModelConfig, src: &dyn WeightSource, be: &dyn Backend) -> Result<Decoder> {
        let (hd, d) = (cfg.head_dim, cfg.hidden_size);
        let lin = |name: &str, rows: usize, cols: usize| -> Result<Weight> {
            be.upload_weight(src.linear(name, rows, cols)?)
        };
        let norm = |name: &str, n: usize| -> Result<Tensor> { be.upload(src.norm(name, n)?) };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(load_layer(&cfg, src, be, &format!("model.layers.{i}"), i)?);
        }
        let embed = lin("model.embed_tokens", cfg.vocab_size, d)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(lin("lm_head", cfg.vocab_size, d)?) };
        let inv = rope::inv_freq(hd, cfg.rope_theta, cfg.rope_scaling);
        Ok(Decoder {
            norm: norm("model.norm", d)?,
            inv_freq: be.upload(Tensor::from_f32(&[inv.len()], &inv)?)?,
            embed,
            lm_head,
            layers,
            cfg,
        })
    }

    /// The output projection (the embedding when tied).
    pub fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every weight once, with the fraction of it a decoded token reads
    /// (1 for dense weights, top_k / experts for stacked experts).
    fn weights_read(&self) -> Vec<(&Weight, f64)> {
        let mut v = vec![(&self.embed, 0.0)];
        v.extend(self.lm_head.iter().map(|w| (w, 1.0)));
        for l in &self.layers {
            v.extend([(&l.wq, 1.0), (&l.wk, 1.0), (&l.wv, 1.0), (&l.wo, 1.0)]);
            match &l.mlp {
                Mlp::Dense { gate, up, down } => v.extend([(gate, 1.0), (up, 1.0), (down, 1.0)]),
                Mlp::Moe { router, gate, up, down, top_k, .. } => {
                    let f = *top_k as f64 / gate.dims().0 as f64;
                    v.extend([(router, 1.0), (gate, f), (up, f), (down, f)]);
                }
            }
        }
        v
    }

    fn norms(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.norm];
        for l in &self.layers {
            v.extend([&l.attn_norm, &l.mlp_norm]);
            v.extend(l.q_norm.iter().chain(l.k_norm.iter()));
        }
        v
    }

    /// Total parameters (a tied lm_head is counted once).
    pub fn parameter_count(&self) -> usize {
        self.weights_read().iter().map(|(w, _)| w.numel()).sum::<usize>()
            + self.norms().iter().map(|t| t.numel()).sum::<usize>()
    }

    /// Weight bytes read to decode one token: the layers (only the selected
    /// experts of MoE blocks), the norms, the output projection and one
    /// embedding row.
    pub fn bytes_per_token(&self) -> usize {
        let mut b: f64 = self.weights_read().iter().map(|(w, f)| w.size_bytes() as f64 * f).sum();
        b += self.norms().iter().map(|t| t.size_bytes() as f64).sum::<f64>();
        if self.lm_head.is_none() {
            b += self.embed.size_bytes() as f64;
        }
        b += self.embed.row_bytes() as f64;
        b as usize
    }

    /// The weight formats, by parameter count, most common first (for `inspect`).
    pub fn weight_formats(&self) -> Vec<(String, usize)> {
        let mut counts: Vec<(String, usize)> = vec![];
        let all = self.weights_read().into_iter().map(|(w, _)| (w.format(), w.numel()));
        let norms = self.norms().into_iter().map(|t| (t.dtype().name().to_string(), t.numel()));
        for (f, n) in all.chain(norms) {
            match counts.iter_mut().find(|(g, _)| *g == f) {
                Some((_, c)) => *c += n,
                None => counts.push((f, n)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
    }

    /// Buffers for a forward pass over `m` tokens.
    pub fn workspace(&self, be: &dyn Backend, m: usize, mode: Logits) -> Result<Workspace> {
        let c = &self.cfg;
        let (d, ff, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let z = |shape: &[usize]| be.zeros(shape, DType::F32);
        let moe = c.moe.as_ref();
        let (top_k, mff) = moe.map_or((0, 0), |c| (c.top_k, c.intermediate_size));
        let ff = if c.layers_dense() { ff } else { 0 };
        // rows of final hidden states that meet the lm_head (Logits::Last, Rows)
        let nl = match mode {
            Logits::Rows(n) => {
                ensure!(n > 0, "a workspace for Logits::Rows(0) produces no logits");
                n
            }
            _ => 1,
        };
        Ok(Workspace {
            m,
            mode,
            vocab: c.vocab_size,
            ids: be.zeros(&[m], DType::I32)?,
            positions: be.zeros(&[m], DType::I32)?,
            stage_ids: Vec::with_capacity(m),
            stage_pos: Vec::with_capacity(m),
            x: z(&[m, d])?,
            h: z(&[m, d])?,
            q_raw: z(&[m, c.num_heads, hd])?,
            q: z(&[m, c.num_heads, hd])?,
            k_raw: z(&[m, c.num_kv_heads, hd])?,
            k: z(&[m, c.num_kv_heads, hd])?,
            v: z(&[m, c.num_kv_heads, hd])?,
            attn: z(&[m, c.num_heads, hd])?,
            o: z(&[m, d])?,
            gate: z(&[m, ff])?,
            up: z(&[m, ff])?,
            act: z(&[m, ff])?,
            last_x: z(&[nl, d])?,
            last_h: z(&[nl, d])?,
            router_logits: z(&[m, moe.map_or(0, |c| c.num_experts)])?,
            expert_ids: be.zeros(&[m, top_k], DType::I32)?,
            expert_w: z(&[m, top_k])?,
            moe_gate: z(&[m, top_k, mff])?,
            moe_up: z(&[m, top_k, mff])?,
            moe_act: z(&[m, top_k, mff])?,
            moe_out: z(&[m, top_k, d])?,
            logits: z(&[if mode == Logits::All { m } else { nl }, c.vocab_size])?,
            taps: None,
            paged: None,
            paged_on: false,
            logit_rows: Vec::with_capacity(nl),
        })
    }

    /// A KV cache layer of `capacity` positions, in the backend's KV dtype
    /// (f32 on the CPU, bf16 on CUDA).
    pub fn kv_layer(&self, be: &dyn Backend, capacity: usize) -> Result<LayerKv> {
        kv_layer(&self.cfg, be, capacity)
    }

    /// Run the tokens in `ws.ids` at `ws.positions`, appending their keys and
    /// values to `kv`, and leave the logits in `ws.logits`.
    pub fn forward(&self, be: &dyn Backend, ws: &mut Workspace, kv: &mut [LayerKv]) -> Result<()> {
        let c = &self.cfg;
        ensure!(kv.len() == self.layers.len(), "{} KV layers for {} model layers", kv.len(), self.layers.len());
        if let Some(&bad) = ws.taps.iter().flat_map(|t| &t.layers).find(|&&l| l >= self.layers.len()) {
            bail!("cannot capture layer {bad}: the model has {} layers", self.layers.len());
        }
        let eps = c.rms_norm_eps;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        be.embedding(&self.embed, &ws.ids, &mut ws.x)?;
        let fuse = Fused::of(be, ws.m);
        let fuse_add_norm = fuse.add_rms_norm;
        // x += y, then h = rms_norm(x): fused (one kernel) or the graph path
        let add_norm = |x: &mut Tensor, y: &Tensor, w: &Tensor, h: &mut Tensor| -> Result<()> {
            if fuse_add_norm {
                be.add_rms_norm(x, y, w, eps, h)
            } else {
                be.add_assign(x, y)?;
                be.rms_norm(x, w, eps, h)
            }
        };
        let n_layers = self.layers.len();
        for (i, (layer, cache)) in self.layers.iter().zip(kv.iter_mut()).enumerate() {
            // attention block (h already holds this layer's input norm after layer 0)
            if i == 0 {
                be.rms_norm(&ws.x, &layer.attn_norm, eps, &mut ws.h)?;
            }
            let a = AttnIn {
                wq: &layer.wq,
                wk: &layer.wk,
                wv: &layer.wv,
                q_norm: layer.q_norm.as_ref(),
                k_norm: layer.k_norm.as_ref(),
                eps,
                positions: &ws.positions,
                slots: ws.paged.as_ref().filter(|_| ws.paged_on).map(|p| &p.slots),
                inv_freq: &self.inv_freq,
                style: c.rope_style,
            };
            let mut b =
                AttnBufs { q_raw: &mut ws.q_raw, k_raw: &mut ws.k_raw, v: &mut ws.v, q: &mut ws.q, k: &mut ws.k };
            if fuse.qkv {
                be.qkv_rope(&ws.h, &a, &mut b, cache)?;
            } else {
                attn_inputs_graph(be, &ws.h, &a, &mut b, cache, fuse.rope_kv_append)?;
            }
            match ws.paged.as_ref().filter(|_| ws.paged_on) {
                None => be.attention(&ws.q, cache, &ws.positions, scale, &mut ws.attn)?,
                Some(p) => {
                    let pages = Pages {
                        positions: &ws.positions,
                        seqs: &p.seqs,
                        tables: &p.tables,
                        slots: &p.slots,
                        block_size: p.block_size,
                    };
                    be.paged_attention(&ws.q, cache, &pages, scale, &mut ws.attn)?
                }
            }
            be.matmul(&ws.attn, &layer.wo, &mut ws.o)?;
            // MLP block
            add_norm(&mut ws.x, &ws.o, &layer.mlp_norm, &mut ws.h)?;
            match &layer.mlp {
                Mlp::Dense { gate, up, down } => {
                    let mut b = SwigluBufs { gate: &mut ws.gate, up: &mut ws.up, act: &mut ws.act };
                    if fuse.swiglu {
                        be.swiglu(&ws.h, gate, up, &mut b)?;
                    } else {
                        swiglu_graph(be, &ws.h, gate, up, &mut b)?;
                    }
                    be.matmul(&ws.act, down, &mut ws.o)?;
                }
                Mlp::Moe { router, gate, up, down, renormalize, .. } => {
                    be.matmul(&ws.h, router, &mut ws.router_logits)?;
                    be.topk_router(&ws.router_logits, *renormalize, &mut ws.expert_ids, &mut ws.expert_w)?;
                    let e = MoeIn { gate, up, down, ids: &ws.expert_ids, weights: &ws.expert_w };
                    let mut b = MoeBufs {
                        gate: &mut ws.moe_gate,
                        up: &mut ws.moe_up,
                        act: &mut ws.moe_act,
                        y: &mut ws.moe_out,
                    };
                    if fuse.moe {
                        be.moe_experts(&ws.h, &e, &mut b, &mut ws.o)?;
                    } else {
                        moe_experts_graph(be, &ws.h, &e, &mut b, &mut ws.o)?;
                    }
                }
            }
            // the residual add, fused with the next layer's input norm
            if i + 1 < n_layers {
                add_norm(&mut ws.x, &ws.o, &self.layers[i + 1].attn_norm, &mut ws.h)?;
            } else {
                be.add_assign(&mut ws.x, &ws.o)?;
            }
            // ws.x now holds this layer's output; the last layer's is taken
            // after the final norm below
            if let Some(t) = ws.taps.as_mut().filter(|_| i + 1 < n_layers) {
                for (slot, _) in t.layers.iter().enumerate().filter(|(_, &l)| l == i) {
                    be.copy_cols(&ws.x, &mut t.out, slot * c.hidden_size)?;
                }
            }
        }
        // as transformers' `hidden_states[-1]` (what DFlash drafts were
        // trained on), the last layer's tap is the final-normed output
        if let Some(t) = ws.taps.as_mut() {
            for (slot, _) in t.layers.iter().enumerate().filter(|(_, &l)| l + 1 == n_layers) {
                be.rms_norm(&ws.x, &self.norm, eps, &mut ws.h)?;
                be.copy_cols(&ws.h, &mut t.out, slot * c.hidden_size)?;
            }
        }
        match ws.mode {
            Logits::All => {
                be.rms_norm(&ws.x, &self.norm, eps, &mut ws.h)?;
                be.matmul(&ws.h, self.lm_head(), &mut ws.logits)
            }
            Logits::Last => {
                be.copy_rows(&ws.x, ws.m - 1, &mut ws.last_x, 0, 1)?;
                be.rms_norm(&ws.last_x, &self.norm, eps, &mut ws.last_h)?;
                be.matmul(&ws.last_h, self.lm_head(), &mut ws.logits)
            }
            Logits::Rows(_) => {
                for (j, &r) in ws.logit_rows.iter().enumerate() {
                    be.copy_rows(&ws.x, r, &mut ws.last_x, j, 1)?;
                }
                be.rms_norm(&ws.last_x, &self.norm, eps, &mut ws.last_h)?;
                be.matmul(&ws.last_h, self.lm_head(), &mut ws.logits)
            }
        }
    }
}

/// A KV cache layer of `capacity` positions for layers shaped by `cfg`, in
/// the backend's KV dtype.
pub(crate) fn kv_layer(cfg: &ModelConfig, be: &dyn Backend, capacity: usize) -> Result<LayerKv> {
    let shape = [capacity, cfg.num_kv_heads, cfg.head_dim];
    let dt = be.kv_dtype();
    Ok(LayerKv { k: be.zeros(&shape, dt)?, v: be.zeros(&shape, dt)? })
}

/// Load the weights of decoder layer `i` (module prefix `p`, e.g.
/// `model.layers.3`) that `cfg` describes, checking every shape.
pub(crate) fn load_layer(
    cfg: &ModelConfig,
    src: &dyn WeightSource,
    be: &dyn Backend,
    p: &str,
    i: usize,
) -> Result<Layer> {
    let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
    let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let lin =
        |name: &str, rows: usize, cols: usize| -> Result<Weight> { be.upload_weight(src.linear(name, rows, cols)?) };
    let norm = |name: &str, n: usize| -> Result<Tensor> { be.upload(src.norm(name, n)?) };
    let mlp = match &cfg.moe {
        Some(moe) if moe.is_sparse(i) => {
            let (e, mff) = (moe.num_experts, moe.intermediate_size);
            let m = format!("{p}.mlp");
            Mlp::Moe {
                router: lin(&format!("{m}.gate"), e, d)?,
                gate: be.upload_weight(src.experts(&m, "gate_proj", e, mff, d)?)?,
                up: be.upload_weight(src.experts(&m, "up_proj", e, mff, d)?)?,
                down: be.upload_weight(src.experts(&m, "down_proj", e, d, mff)?)?,
                top_k: moe.top_k,
                renormalize: moe.norm_topk_prob,
            }
        }
        _ => {
            ensure!(ff > 0, "config: intermediate_size is required for the dense MLP of layer {i}");
            Mlp::Dense {
                gate: lin(&format!("{p}.mlp.gate_proj"), ff, d)?,
                up: lin(&format!("{p}.mlp.up_proj"), ff, d)?,
                down: lin(&format!("{p}.mlp.down_proj"), d, ff)?,
            }
        }
    };
    Ok(Layer {
        attn_norm: norm(&format!("{p}.input_layernorm"), d)?,
        wq: lin(&format!("{p}.self_attn.q_proj"), nh * hd, d)?,
        wk: lin(&format!("{p}.self_attn.k_proj"), nkv * hd, d)?,
        wv: lin(&format!("{p}.self_attn.v_proj"), nkv * hd, d)?,
        wo: lin(&format!("{p}.self_attn.o_proj"), d, nh * hd)?,
        q_norm: cfg.qk_norm.then(|| norm(&format!("{p}.self_attn.q_norm"), hd)).transpose()?,
        k_norm: cfg.qk_norm.then(|| norm(&format!("{p}.self_attn.k_norm"), hd)).transpose()?,
        mlp_norm: norm(&format!("{p}.post_attention_layernorm"), d)?,
        mlp,
    })
}

#[cfg(test)]
mod tests {
    use super::Batch;

    fn batch<'a>(
        positions: &'a [i32],
        seqs: &'a [i32],
        slots: &'a [i32],
        tables: &'a [i32],
        width: usize,
    ) -> Batch<'a> {
        Batch { ids: &[], positions, seqs, slots, tables, width, block_size: 16, logit_rows: &[] }
    }

    #[test]
    fn one_sequence_with_its_blocks_in_order_is_contiguous() {
        // a decode row at position 20 (block 1), blocks 0 and 1 in order: contiguous
        assert!(batch(&[20], &[0], &[20], &[0, 1], 2).is_contiguous());
        // a prompt chunk over positions 16..19 of the same table; the table may run past what is used
        assert!(batch(&[16, 17, 18], &[0; 3], &[16, 17, 18], &[0, 1, 7], 3).is_contiguous());
        // blocks out of order, a second sequence, slots that are not the positions
        assert!(!batch(&[20], &[0], &[4], &[1, 0], 2).is_contiguous());
        assert!(!batch(&[3, 3], &[0, 1], &[3, 19], &[0, 1], 1).is_contiguous());
        assert!(!batch(&[20], &[0], &[36], &[0, 2], 2).is_contiguous());
        // an empty batch has nothing to run
        assert!(!batch(&[], &[], &[], &[0], 1).is_contiguous());
    }
}
