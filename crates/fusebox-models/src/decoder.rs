//! The decoder shared by every supported architecture.
//!
//! Llama and Qwen3 differ only in configuration (Qwen3 adds a per-head
//! RMSNorm on q and k), so there is one implementation, written against the
//! [`Backend`] op set and nothing else. A forward pass writes into a
//! [`Workspace`] sized for `m` tokens; the engine keeps one workspace for
//! single-token decode and reuses it every step, so decode allocates nothing.

use anyhow::{ensure, Result};
use fusebox_core::{rope, Backend, DType, LayerKv, Tensor};

use crate::config::ModelConfig;
use crate::safetensors::Checkpoint;

/// The weights of one decoder layer.
pub struct Layer {
    pub attn_norm: Tensor,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub mlp_norm: Tensor,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
}

/// A loaded decoder: configuration plus weights on one backend.
pub struct Decoder {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<Tensor>,
    pub inv_freq: Tensor,
}

/// Which rows of logits a forward pass produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's (generation).
    Last,
    /// Every position's (scoring and tests).
    All,
}

/// Activation buffers for a forward pass over `m` tokens.
pub struct Workspace {
    pub m: usize,
    pub mode: Logits,
    /// Token ids to run (`I32 [m]`), set with [`Workspace::set_tokens`].
    pub ids: Tensor,
    /// Their positions (`I32 [m]`).
    pub positions: Tensor,
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
    /// `[m, vocab]` for [`Logits::All`], `[1, vocab]` for [`Logits::Last`].
    pub logits: Tensor,
}

impl Workspace {
    /// Write token ids and their positions (`start..start+m`) for the next forward.
    pub fn set_tokens(&mut self, be: &dyn Backend, ids: &[u32], start: usize) -> Result<()> {
        ensure!(ids.len() == self.m, "workspace holds {} tokens, got {}", self.m, ids.len());
        if let [id] = ids {
            // the decode step: no allocation
            be.write_i32(&mut self.ids, &[*id as i32])?;
            return be.write_i32(&mut self.positions, &[start as i32]);
        }
        let ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let pos: Vec<i32> = (start..start + self.m).map(|p| p as i32).collect();
        be.write_i32(&mut self.ids, &ids)?;
        be.write_i32(&mut self.positions, &pos)
    }
}

impl Decoder {
    /// Load the weights named by `cfg` from a checkpoint, checking every
    /// tensor's shape and dtype, and place them on `be`.
    pub fn load(cfg: ModelConfig, ck: &Checkpoint, be: &dyn Backend) -> Result<Decoder> {
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let dense = |name: &str, shape: &[usize]| -> Result<Tensor> { be.upload(ck.get_float(name, shape)?) };
        // Norm weights are tiny; keep them in f32 on every backend.
        let norm = |name: &str, n: usize| -> Result<Tensor> { be.upload(ck.get_float(name, &[n])?.to_f32()?) };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: norm(&format!("{p}.input_layernorm.weight"), d)?,
                wq: dense(&format!("{p}.self_attn.q_proj.weight"), &[nh * hd, d])?,
                wk: dense(&format!("{p}.self_attn.k_proj.weight"), &[nkv * hd, d])?,
                wv: dense(&format!("{p}.self_attn.v_proj.weight"), &[nkv * hd, d])?,
                wo: dense(&format!("{p}.self_attn.o_proj.weight"), &[d, nh * hd])?,
                q_norm: cfg.qk_norm.then(|| norm(&format!("{p}.self_attn.q_norm.weight"), hd)).transpose()?,
                k_norm: cfg.qk_norm.then(|| norm(&format!("{p}.self_attn.k_norm.weight"), hd)).transpose()?,
                mlp_norm: norm(&format!("{p}.post_attention_layernorm.weight"), d)?,
                w_gate: dense(&format!("{p}.mlp.gate_proj.weight"), &[ff, d])?,
                w_up: dense(&format!("{p}.mlp.up_proj.weight"), &[ff, d])?,
                w_down: dense(&format!("{p}.mlp.down_proj.weight"), &[d, ff])?,
            });
        }
        let embed = dense("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(dense("lm_head.weight", &[cfg.vocab_size, d])?) };
        let inv = rope::inv_freq(hd, cfg.rope_theta, cfg.rope_scaling);
        Ok(Decoder {
            norm: norm("model.norm.weight", d)?,
            inv_freq: be.upload(Tensor::from_f32(&[inv.len()], &inv)?)?,
            embed,
            lm_head,
            layers,
            cfg,
        })
    }

    fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every weight tensor once (a tied lm_head is not counted twice).
    pub fn weights(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.embed, &self.norm];
        v.extend(self.lm_head.as_ref());
        for l in &self.layers {
            v.extend([&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.mlp_norm, &l.w_gate, &l.w_up, &l.w_down]);
            v.extend(l.q_norm.iter().chain(l.k_norm.iter()));
        }
        v
    }

    /// Total parameters.
    pub fn parameter_count(&self) -> usize {
        self.weights().iter().map(|t| t.numel()).sum()
    }

    /// Weight bytes read to decode one token: every layer, the final norm,
    /// the output projection and one embedding row.
    pub fn bytes_per_token(&self) -> usize {
        let all: usize = self.weights().iter().map(|t| t.size_bytes()).sum();
        let embed_row = self.cfg.hidden_size * self.embed.dtype().size();
        let head = self.lm_head().size_bytes();
        if self.lm_head.is_some() {
            all - self.embed.size_bytes() + embed_row
        } else {
            debug_assert_eq!(head, self.embed.size_bytes());
            all + embed_row
        }
    }

    /// The dtypes of the weights, most common first (for `inspect`).
    pub fn weight_dtypes(&self) -> Vec<(DType, usize)> {
        let mut counts: Vec<(DType, usize)> = vec![];
        for t in self.weights() {
            match counts.iter_mut().find(|(d, _)| *d == t.dtype()) {
                Some((_, n)) => *n += t.numel(),
                None => counts.push((t.dtype(), t.numel())),
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
        Ok(Workspace {
            m,
            mode,
            ids: be.zeros(&[m], DType::I32)?,
            positions: be.zeros(&[m], DType::I32)?,
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
            last_x: z(&[1, d])?,
            last_h: z(&[1, d])?,
            logits: z(&[if mode == Logits::All { m } else { 1 }, c.vocab_size])?,
        })
    }

    /// A KV cache layer of `capacity` positions (f32 on the CPU backend).
    pub fn kv_layer(&self, be: &dyn Backend, capacity: usize) -> Result<LayerKv> {
        let shape = [capacity, self.cfg.num_kv_heads, self.cfg.head_dim];
        Ok(LayerKv { k: be.zeros(&shape, DType::F32)?, v: be.zeros(&shape, DType::F32)? })
    }

    /// Run the tokens in `ws.ids` at `ws.positions`, appending their keys and
    /// values to `kv`, and leave the logits in `ws.logits`.
    pub fn forward(&self, be: &dyn Backend, ws: &mut Workspace, kv: &mut [LayerKv]) -> Result<()> {
        let c = &self.cfg;
        ensure!(kv.len() == self.layers.len(), "{} KV layers for {} model layers", kv.len(), self.layers.len());
        let eps = c.rms_norm_eps;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        be.embedding(&self.embed, &ws.ids, &mut ws.x)?;
        for (layer, cache) in self.layers.iter().zip(kv.iter_mut()) {
            // attention block
            be.rms_norm(&ws.x, &layer.attn_norm, eps, &mut ws.h)?;
            be.matmul(&ws.h, &layer.wq, &mut ws.q_raw)?;
            be.matmul(&ws.h, &layer.wk, &mut ws.k_raw)?;
            be.matmul(&ws.h, &layer.wv, &mut ws.v)?;
            let q = match &layer.q_norm {
                Some(w) => {
                    be.rms_norm(&ws.q_raw, w, eps, &mut ws.q)?;
                    &mut ws.q
                }
                None => &mut ws.q_raw,
            };
            let k = match &layer.k_norm {
                Some(w) => {
                    be.rms_norm(&ws.k_raw, w, eps, &mut ws.k)?;
                    &mut ws.k
                }
                None => &mut ws.k_raw,
            };
            be.rope(q, &ws.positions, &self.inv_freq, c.rope_style)?;
            be.rope(k, &ws.positions, &self.inv_freq, c.rope_style)?;
            be.kv_write(k, &ws.v, &ws.positions, cache)?;
            be.attention(q, cache, &ws.positions, scale, &mut ws.attn)?;
            be.matmul(&ws.attn, &layer.wo, &mut ws.o)?;
            be.add_assign(&mut ws.x, &ws.o)?;
            // MLP block
            be.rms_norm(&ws.x, &layer.mlp_norm, eps, &mut ws.h)?;
            be.matmul(&ws.h, &layer.w_gate, &mut ws.gate)?;
            be.matmul(&ws.h, &layer.w_up, &mut ws.up)?;
            be.silu_mul(&ws.gate, &ws.up, &mut ws.act)?;
            be.matmul(&ws.act, &layer.w_down, &mut ws.o)?;
            be.add_assign(&mut ws.x, &ws.o)?;
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
        }
    }
}
