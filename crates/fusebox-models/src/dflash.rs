//! z-lab DFlash block-diffusion drafts: their configuration and weights.
//!
//! A DFlash draft (`"architectures": ["DFlashDraftModel"]`) is a few decoder
//! layers of the target's family with no embedding and no lm_head: it reads
//! the target's hidden states at `target_layer_ids`, projects their
//! concatenation with `fc` and normalises it with `hidden_norm`, and drafts
//! `block_size - 1` tokens in one pass (docs/notes/dflash-reference.md).
//! This module loads and checks a draft; drafting with it is the DFlash
//! issue's next slice.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};
use fusebox_core::{Backend, Tensor, Weight};
use serde_json::Value;

use crate::config::{read_json, ModelConfig};
use crate::decoder::{load_layer, Layer};
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

/// A loaded DFlash draft (its own weights only; the target's embedding and
/// lm_head are used with it).
pub struct DFlashDraft {
    pub cfg: DFlashConfig,
    /// `[hidden, layers * hidden]`: the concatenated target states to the context.
    pub fc: Weight,
    pub hidden_norm: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
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
        let layers = (0..cfg.base.num_layers)
            .map(|i| load_layer(&cfg.base, src, be, &format!("layers.{i}"), i))
            .collect::<Result<Vec<_>>>()?;
        Ok(DFlashDraft {
            fc: be.upload_weight(src.linear("fc", d, taps * d)?)?,
            hidden_norm: be.upload(src.norm("hidden_norm", d)?)?,
            norm: be.upload(src.norm("norm", d)?)?,
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
