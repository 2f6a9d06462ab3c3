//! fusebox-models: checkpoint formats, configs, tokenizers, chat templates,
//! and the architectures (one config-driven decoder).

pub mod chat;
pub mod config;
pub mod decoder;
pub mod dflash;
pub mod gguf;
pub mod mlx_quant;
pub mod safetensors;
pub mod source;
pub mod synthetic;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use fusebox_core::Backend;

pub use chat::{ChatTemplate, Message};
pub use config::{Arch, GenerationConfig, ModelConfig, MoeConfig, QuantConfig};
pub use decoder::{Batch, Decoder, Logits, Workspace};
pub use source::WeightSource;
pub use tokenizer::{StreamDecoder, Tokenizer};

/// Everything loaded from a model directory.
pub struct Model {
    pub path: PathBuf,
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
}

impl Model {
    /// Load a model onto a backend: a Hugging Face / MLX model directory, or
    /// a `.gguf` file.
    pub fn load(path: &Path, be: &dyn Backend) -> Result<Model> {
        Self::load_with(path, be, false)
    }

    /// [`Model::load`], with every weight dequantized to f32 at load when
    /// `f32` is set (a quantized checkpoint's full-precision reference).
    pub fn load_with(path: &Path, be: &dyn Backend, f32: bool) -> Result<Model> {
        if !path.exists() {
            bail!("{}: no such file or directory", path.display());
        }
        if path.is_file() {
            if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                return Self::load_gguf(path, be, f32);
            }
            bail!(
                "{}: expected a model directory (config.json, tokenizer.json, *.safetensors) or a .gguf file",
                path.display()
            );
        }
        let cfg_path = path.join("config.json");
        if cfg_path.exists() && dflash::is_dflash(&config::read_json(&cfg_path)?) {
            bail!(
                "{}: a DFlash draft ({}), which drafts for a target model and has no embedding or lm_head of its own; it cannot run by itself (`fusebox inspect -m {} --target TARGET` checks that it fits a target)",
                path.display(),
                dflash::ARCHITECTURE,
                path.display()
            );
        }
        let cfg = ModelConfig::from_file(&cfg_path)?;
        let generation = GenerationConfig::from_file(&path.join("generation_config.json"))?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let chat_template = ChatTemplate::from_tokenizer_config(&path.join("tokenizer_config.json"))?;
        let ck = safetensors::Checkpoint::open_dir(path)?;
        let src = safetensors::SafetensorsSource { ck: &ck, quant: cfg.quantization.as_ref() };
        let decoder = if f32 {
            Decoder::load(cfg.clone(), &source::Dequantized(&src), be)?
        } else {
            Decoder::load(cfg.clone(), &src, be)?
        };
        Ok(Model { path: path.to_path_buf(), decoder, tokenizer, chat_template, generation })
    }

    /// Load a GGUF file: weights, config, tokenizer and chat template all
    /// come from the one file.
    pub fn load_gguf(path: &Path, be: &dyn Backend, f32: bool) -> Result<Model> {
        let file = gguf::GgufFile::open(path)?;
        let cfg = gguf::model_config(&file)?;
        let tokenizer = gguf::tokenizer(&file)?;
        let name = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
        let chat_template = match gguf::chat_template(&file) {
            Some(src) => Some(
                ChatTemplate::new(&src, &name(cfg.bos_token_id), &name(cfg.eos_token_ids.first().copied()))
                    .map_err(|e| anyhow::anyhow!("{}: tokenizer.chat_template: {e:#}", path.display()))?,
            ),
            None => None,
        };
        // llama.cpp's `rope_freqs.weight` is already folded into cfg.rope_scaling
        let src = gguf::GgufSource::new(&file);
        let decoder =
            if f32 { Decoder::load(cfg, &source::Dequantized(&src), be)? } else { Decoder::load(cfg, &src, be)? };
        Ok(Model {
            path: path.to_path_buf(),
            decoder,
            tokenizer,
            chat_template,
            generation: GenerationConfig::default(),
        })
    }

    /// The configuration of the model at `path` (a directory's config.json
    /// or a GGUF file's metadata) without loading its weights.
    pub fn config_at(path: &Path) -> Result<ModelConfig> {
        if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return gguf::model_config(&gguf::GgufFile::open(path)?);
        }
        ModelConfig::from_file(&path.join("config.json"))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.decoder.cfg
    }

    /// EOS ids from config.json and generation_config.json, deduplicated.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut v = self.config().eos_token_ids.clone();
        v.extend(&self.generation.eos_token_ids);
        v.sort_unstable();
        v.dedup();
        v
    }
}
