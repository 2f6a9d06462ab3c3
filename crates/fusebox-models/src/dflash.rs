//! z-lab DFlash block-diffusion drafts: their configuration and weights.
//!
//! A DFlash draft (`"architectures": ["DFlashDraftModel"]`) is a few decoder
//! layers of the target's family with no embedding and no lm_head: it reads
//! the target's hidden states at `target_layer_ids`, projects their
//! concatenation with `fc` and normalises it with `hidden_norm`, and drafts
//! `block_size - 1` tokens in one pass (docs/notes/dflash-reference.md).
//! This module loads and checks a draft and runs its forward pass: the
//! context (target hidden states) goes into the draft's own KV cache once,
//! as it is committed; a block is drafted against it.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};
use fusebox_core::backend::{swiglu_graph, AttnBufs, AttnIn, DraftAttn, SwigluBufs};
use fusebox_core::{rope, Backend, DType, LayerKv, Tensor, Weight};
use serde_json::Value;

use crate::config::{read_json, ModelConfig};
use crate::decoder::{kv_layer, load_layer, Decoder, Layer, Mlp};
use crate::safetensors::{Checkpoint, SafetensorsSource};
use crate::source::WeightSource;

/// The `architectures` entry that marks a DFlash draft.
pub const ARCHITECTURE: &str = "DFlashDraftModel";

/// Whether a parsed config.json describes a DFlash draft.
pub fn is_dflash(config: &Value) -> bool {
    config
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(ARCHITECTURE)))
}

/// A DFlash draft's configuration: its layers' shapes (`base`, the
/// target family's config fields) and the drafting settings.
#[derive(Clone, Debug)]
pub struct DFlashConfig {
    pub base: ModelConfig,
    /// Tokens per block: the last committed token and `block_size - 1` masks.
    pub block_size: usize,
    /// Layers of the target it was trained for.
    pub num_target_layers: usize,
    /// The token that fills the block's undecided positions.
    pub mask_token_id: u32,
    /// Target layers whose outputs make the context (0-based layer indices).
    pub target_layer_ids: Vec<usize>,
    /// Context keys a block query sees at most (`None`: all).
    pub sliding_window: Option<usize>,
    /// Causal attention inside the block (the published drafts: false).
    pub is_causal: bool,
}

impl DFlashConfig {
    /// Read `config.json` of a DFlash draft directory.
    pub fn from_file(path: &Path) -> Result<DFlashConfig> {
        let v = read_json(path)?;
        Self::from_value(&v, &path.display().to_string())
    }

    pub fn from_value(v: &Value, file: &str) -> Result<DFlashConfig> {
        ensure!(is_dflash(v), "{file}: not a DFlash draft (`architectures` lacks \"{ARCHITECTURE}\")");
        let base = ModelConfig::from_value(v, file)?;
        let dc = v.get("dflash_config").filter(|x| x.is_object());
        // newer drafts keep some settings inside dflash_config; it wins
        let field = |name: &str| dc.and_then(|d| d.get(name)).or_else(|| v.get(name)).filter(|x| !x.is_null());
        let uint = |name: &str| -> Result<Option<usize>> {
            field(name)
                .map(|x| {
                    x.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| anyhow!("{file}: `{name}` must be a whole number, got {x}"))
                })
                .transpose()
        };
        let block_size = uint("block_size")?.unwrap_or(16);
        ensure!(block_size >= 2, "{file}: `block_size` must be at least 2, got {block_size}");
        let num_target_layers = uint("num_target_layers")?
            .ok_or_else(|| anyhow!("{file}: required field `num_target_layers` is missing"))?;
        let mask_token_id = uint("mask_token_id")?
            .ok_or_else(|| anyhow!("{file}: required field `dflash_config.mask_token_id` is missing"))?
            as u32;
        let ids = field("target_layer_ids")
            .ok_or_else(|| anyhow!("{file}: required field `dflash_config.target_layer_ids` is missing"))?;
        let target_layer_ids: Vec<usize> = ids
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<_>>())
            .ok_or_else(|| anyhow!("{file}: `target_layer_ids` must be a list of layer indices, got {ids}"))?;
        ensure!(!target_layer_ids.is_empty(), "{file}: `target_layer_ids` is empty");
        if let Some(&bad) = target_layer_ids.iter().find(|&&i| i >= num_target_layers) {
            bail!("{file}: target layer {bad} is outside the {num_target_layers} target layers");
        }
        let is_causal = match field("is_causal") {
            None => false,
            Some(x) => x.as_bool().ok_or_else(|| anyhow!("{file}: `is_causal` must be true or false, got {x}"))?,
        };
        Ok(DFlashConfig {
            base,
            block_size,
            num_target_layers,
            mask_token_id,
            target_layer_ids,
            sliding_window: uint("sliding_window")?,
            is_causal,
        })
    }

    /// Check that this draft fits `target`: the same hidden size and
    /// vocabulary, as many layers as it was trained for, and a mask token
    /// inside the vocabulary.
    pub fn check_target(&self, target: &ModelConfig) -> Result<()> {
        let b = &self.base;
        ensure!(
            b.hidden_size == target.hidden_size,
            "the DFlash draft has hidden size {} but the target has {}",
            b.hidden_size,
            target.hidden_size
        );
        ensure!(
            self.num_target_layers == target.num_layers,
            "the DFlash draft was made for a target of {} layers, this one has {}",
            self.num_target_layers,
            target.num_layers
        );
        ensure!(
            b.vocab_size == target.vocab_size,
            "the DFlash draft has a vocabulary of {} tokens but the target has {}",
            b.vocab_size,
            target.vocab_size
        );
        ensure!(
            (self.mask_token_id as usize) < target.vocab_size,
            "the DFlash mask token {} is outside the target's vocabulary of {}",
            self.mask_token_id,
            target.vocab_size
        );
        Ok(())
    }
}

impl DFlashConfig {
    /// The layout of the published drafts for `target`, for a synthetic
    /// draft (benchmarks): `layers` layers of the target's shapes, five
    /// taps spread over the target's layers as the reference's
    /// `build_target_layer_ids` spreads them, the last token as the mask.
    pub fn synthetic(target: &ModelConfig, layers: usize, block_size: usize) -> DFlashConfig {
        let n = target.num_layers;
        let taps = 5.min(n);
        let target_layer_ids = if taps == 1 {
            vec![n / 2]
        } else {
            // evenly from 1 to n - 3, rounded (the reference's spread)
            let (lo, hi) = (1.0f64.min((n - 1) as f64), (n as f64 - 3.0).max(1.0));
            (0..taps).map(|i| (lo + (hi - lo) * i as f64 / (taps - 1) as f64).round() as usize).collect()
        };
        let mut base = target.clone();
        base.num_layers = layers;
        base.moe = None;
        DFlashConfig {
            block_size,
            num_target_layers: n,
            mask_token_id: target.vocab_size as u32 - 1,
            target_layer_ids,
            sliding_window: None,
            is_causal: false,
            base,
        }
    }
}

/// A loaded DFlash draft (its own weights only; the target's embedding and
/// lm_head are used with it).
pub struct DFlashDraft {
    pub cfg: DFlashConfig,
    /// `[hidden, layers * hidden]`: the concatenated target states to the context.
    pub fc: Weight,
    pub hidden_norm: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub inv_freq: Tensor,
}

impl DFlashDraft {
    /// Load a draft directory (config.json and *.safetensors, bf16/f16/f32
    /// or MLX-quantized) onto `be`, checking every shape.
    pub fn load(dir: &Path, be: &dyn Backend) -> Result<DFlashDraft> {
        let cfg = DFlashConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open_dir(dir)?;
        let quant = cfg.base.quantization.clone();
        let src = SafetensorsSource { ck: &ck, quant: quant.as_ref() };
        Self::load_from(cfg, &src, be)
    }

    pub fn load_from(cfg: DFlashConfig, src: &dyn WeightSource, be: &dyn Backend) -> Result<DFlashDraft> {
        let d = cfg.base.hidden_size;
        let taps = cfg.target_layer_ids.len();
        ensure!(cfg.base.moe.is_none(), "DFlash drafts with mixture-of-experts layers are not supported");
        ensure!(cfg.base.num_layers > 0, "a DFlash draft needs at least one layer (`num_hidden_layers` is 0)");
        let inv = rope::inv_freq(cfg.base.head_dim, cfg.base.rope_theta, cfg.base.rope_scaling);
        let layers = (0..cfg.base.num_layers)
            .map(|i| load_layer(&cfg.base, src, be, &format!("layers.{i}"), i))
            .collect::<Result<Vec<_>>>()?;
        Ok(DFlashDraft {
            fc: be.upload_weight(src.linear("fc", d, taps * d)?)?,
            hidden_norm: be.upload(src.norm("hidden_norm", d)?)?,
            norm: be.upload(src.norm("norm", d)?)?,
            inv_freq: be.upload(Tensor::from_f32(&[inv.len()], &inv)?)?,
            layers,
            cfg,
        })
    }

    /// Parameters of the draft's own weights.
    pub fn parameter_count(&self) -> usize {
        let mut n = self.fc.numel() + self.hidden_norm.numel() + self.norm.numel();
        for l in &self.layers {
            n += [&l.wq, &l.wk, &l.wv, &l.wo].iter().map(|w| w.numel()).sum::<usize>();
            n += l.attn_norm.numel() + l.mlp_norm.numel();
            n += l.q_norm.iter().chain(l.k_norm.iter()).map(|t| t.numel()).sum::<usize>();
            if let crate::decoder::Mlp::Dense { gate, up, down } = &l.mlp {
                n += gate.numel() + up.numel() + down.numel();
            }
        }
        n
    }
}

/// Buffers to add `n` rows of context (target hidden states) to the draft's
/// KV cache.
pub struct ContextBufs {
    pub n: usize,
    /// `[n, taps * hidden]`: the target's captured layer outputs, written by
    /// the caller before [`DFlashDraft::add_context`].
    pub taps: Tensor,
    fc_out: Tensor,
    ctx: Tensor,
    k_raw: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    stage: Vec<i32>,
}

/// Buffers to draft one block of `block_size` rows; the logits of block
/// rows `1..block_size` (the drafts) end in `logits`.
pub struct BlockBufs {
    ids: Tensor,
    positions: Tensor,
    /// The last key position each query row sees.
    limits: Tensor,
    stage_ids: Vec<i32>,
    stage_pos: Vec<i32>,
    stage_lim: Vec<i32>,
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
    out_h: Tensor,
    /// `[block_size - 1, vocab]`: row i drafts the token at `start + 1 + i`.
    pub logits: Tensor,
}

fn stage_positions(
    be: &dyn Backend,
    t: &mut Tensor,
    stage: &mut Vec<i32>,
    vals: impl Iterator<Item = usize>,
) -> Result<()> {
    stage.clear();
    stage.extend(vals.map(|p| p as i32));
    be.write_i32(t, stage)
}

impl DFlashDraft {
    /// One KV cache layer per draft layer, of `capacity` positions (the
    /// context plus one block).
    pub fn kv_layers(&self, be: &dyn Backend, capacity: usize) -> Result<Vec<LayerKv>> {
        (0..self.layers.len()).map(|_| kv_layer(&self.cfg.base, be, capacity)).collect()
    }

    /// Buffers to add `n` context rows at a time.
    pub fn context_bufs(&self, be: &dyn Backend, n: usize) -> Result<ContextBufs> {
        let b = &self.cfg.base;
        let (d, kvw) = (b.hidden_size, [n, b.num_kv_heads, b.head_dim]);
        let z = |shape: &[usize]| be.zeros(shape, DType::F32);
        Ok(ContextBufs {
            n,
            taps: z(&[n, self.cfg.target_layer_ids.len() * d])?,
            fc_out: z(&[n, d])?,
            ctx: z(&[n, d])?,
            k_raw: z(&kvw)?,
            k: z(&kvw)?,
            v: z(&kvw)?,
            positions: be.zeros(&[n], DType::I32)?,
            stage: Vec::with_capacity(n),
        })
    }

    /// Buffers to draft a block, with the target's vocabulary of `vocab`.
    pub fn block_bufs(&self, be: &dyn Backend, vocab: usize) -> Result<BlockBufs> {
        let b = &self.cfg.base;
        let m = self.cfg.block_size;
        let (d, ff, hd) = (b.hidden_size, b.intermediate_size, b.head_dim);
        let z = |shape: &[usize]| be.zeros(shape, DType::F32);
        let i32s = || be.zeros(&[m], DType::I32);
        Ok(BlockBufs {
            ids: i32s()?,
            positions: i32s()?,
            limits: i32s()?,
            stage_ids: Vec::with_capacity(m),
            stage_pos: Vec::with_capacity(m),
            stage_lim: Vec::with_capacity(m),
            x: z(&[m, d])?,
            h: z(&[m, d])?,
            q_raw: z(&[m, b.num_heads, hd])?,
            q: z(&[m, b.num_heads, hd])?,
            k_raw: z(&[m, b.num_kv_heads, hd])?,
            k: z(&[m, b.num_kv_heads, hd])?,
            v: z(&[m, b.num_kv_heads, hd])?,
            attn: z(&[m, b.num_heads, hd])?,
            o: z(&[m, d])?,
            gate: z(&[m, ff])?,
            up: z(&[m, ff])?,
            act: z(&[m, ff])?,
            out_h: z(&[m - 1, d])?,
            logits: z(&[m - 1, vocab])?,
        })
    }

    /// Project the `cb.n` context rows in `cb.taps` (target positions
    /// `start..start + n`) with `fc` and `hidden_norm`, and store every draft
    /// layer's keys and values for them in `kv`. The context gets no input
    /// norm and never enters the residual stream.
    pub fn add_context(&self, be: &dyn Backend, cb: &mut ContextBufs, start: usize, kv: &mut [LayerKv]) -> Result<()> {
        let b = &self.cfg.base;
        ensure!(kv.len() == self.layers.len(), "{} KV layers for {} draft layers", kv.len(), self.layers.len());
        stage_positions(be, &mut cb.positions, &mut cb.stage, start..start + cb.n)?;
        be.matmul(&cb.taps, &self.fc, &mut cb.fc_out)?;
        be.rms_norm(&cb.fc_out, &self.hidden_norm, b.rms_norm_eps, &mut cb.ctx)?;
        for (layer, cache) in self.layers.iter().zip(kv.iter_mut()) {
            let k_to = if layer.k_norm.is_some() { &mut cb.k_raw } else { &mut cb.k };
            be.matmul(&cb.ctx, &layer.wk, k_to)?;
            if let Some(w) = &layer.k_norm {
                be.rms_norm(&cb.k_raw, w, b.rms_norm_eps, &mut cb.k)?;
            }
            be.matmul(&cb.ctx, &layer.wv, &mut cb.v)?;
            be.rope(&mut cb.k, &cb.positions, &self.inv_freq, b.rope_style)?;
            be.kv_write(&cb.k, &cb.v, &cb.positions, cache)?;
        }
        Ok(())
    }

    /// Draft one block: `first` (the last committed token) at position
    /// `start`, then `block_size - 1` mask tokens, embedded with the target's
    /// embedding, attending to the context already in `kv` (positions
    /// `0..start`) and to the whole block; the target's lm_head turns block
    /// rows `1..` into `bb.logits`. [`DFlashDraft::set_block`], then
    /// [`DFlashDraft::run_block`].
    pub fn draft(
        &self,
        be: &dyn Backend,
        target: &Decoder,
        bb: &mut BlockBufs,
        first: u32,
        start: usize,
        kv: &mut [LayerKv],
    ) -> Result<()> {
        self.set_block(be, target, bb, first, start)?;
        self.run_block(be, target, bb, kv)
    }

    /// Write the block's token ids, positions and key limits into `bb`'s
    /// device buffers (so [`DFlashDraft::run_block`] can be replayed as a
    /// graph).
    pub fn set_block(
        &self,
        be: &dyn Backend,
        target: &Decoder,
        bb: &mut BlockBufs,
        first: u32,
        start: usize,
    ) -> Result<()> {
        let bs = self.cfg.block_size;
        ensure!((first as usize) < target.cfg.vocab_size, "token id {first} is outside the target's vocabulary");
        if let Some(w) = self.cfg.sliding_window {
            ensure!(
                start < w,
                "a context of {start} tokens is longer than the DFlash draft's sliding window of {w}, which fusebox does not implement yet"
            );
        }
        let mask = self.cfg.mask_token_id as usize;
        bb.stage_ids.clear();
        bb.stage_ids.push(first as i32);
        bb.stage_ids.extend(std::iter::repeat_n(mask as i32, bs - 1));
        be.write_i32(&mut bb.ids, &bb.stage_ids)?;
        stage_positions(be, &mut bb.positions, &mut bb.stage_pos, start..start + bs)?;
        let last = start + bs - 1;
        let causal = self.cfg.is_causal;
        stage_positions(
            be,
            &mut bb.limits,
            &mut bb.stage_lim,
            (start..start + bs).map(|p| if causal { p } else { last }),
        )
    }

    /// The block pass over the inputs [`DFlashDraft::set_block`] wrote.
    pub fn run_block(&self, be: &dyn Backend, target: &Decoder, bb: &mut BlockBufs, kv: &mut [LayerKv]) -> Result<()> {
        let (b, bs) = (&self.cfg.base, self.cfg.block_size);
        ensure!(kv.len() == self.layers.len(), "{} KV layers for {} draft layers", kv.len(), self.layers.len());
        let eps = b.rms_norm_eps;
        let scale = 1.0 / (b.head_dim as f32).sqrt();
        be.embedding(&target.embed, &bb.ids, &mut bb.x)?;
        for (layer, cache) in self.layers.iter().zip(kv.iter_mut()) {
            be.rms_norm(&bb.x, &layer.attn_norm, eps, &mut bb.h)?;
            let a = AttnIn {
                wq: &layer.wq,
                wk: &layer.wk,
                wv: &layer.wv,
                q_norm: layer.q_norm.as_ref(),
                k_norm: layer.k_norm.as_ref(),
                eps,
                positions: &bb.positions,
                slots: None,
                inv_freq: &self.inv_freq,
                style: b.rope_style,
            };
            let mut ab =
                AttnBufs { q_raw: &mut bb.q_raw, k_raw: &mut bb.k_raw, v: &mut bb.v, q: &mut bb.q, k: &mut bb.k };
            let mut c = DraftAttn { cache, limits: &bb.limits, scale, out: &mut bb.attn };
            be.dflash_attn(&bb.h, &a, &mut ab, &mut c)?;
            be.matmul(&bb.attn, &layer.wo, &mut bb.o)?;
            be.add_assign(&mut bb.x, &bb.o)?;
            be.rms_norm(&bb.x, &layer.mlp_norm, eps, &mut bb.h)?;
            let Mlp::Dense { gate, up, down } = &layer.mlp else { bail!("a DFlash draft layer has no dense MLP") };
            let mut sb = SwigluBufs { gate: &mut bb.gate, up: &mut bb.up, act: &mut bb.act };
            swiglu_graph(be, &bb.h, gate, up, &mut sb)?;
            be.matmul(&bb.act, down, &mut bb.o)?;
            be.add_assign(&mut bb.x, &bb.o)?;
        }
        be.rms_norm(&bb.x, &self.norm, eps, &mut bb.h)?;
        be.copy_rows(&bb.h, 1, &mut bb.out_h, 0, bs - 1)?;
        be.matmul(&bb.out_h, target.lm_head(), &mut bb.logits)
    }
}
