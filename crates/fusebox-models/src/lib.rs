//! fusebox-models: checkpoint formats, configs, tokenizers, chat templates,
//! and the architectures (one config-driven decoder).

pub mod chat;
pub mod config;
pub mod decoder;
pub mod safetensors;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use fusebox_core::Backend;

pub use chat::{ChatTemplate, Message};
pub use config::{Arch, GenerationConfig, ModelConfig};
pub use decoder::{Decoder, Logits, Workspace};
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
    /// Load a Hugging Face model directory onto a backend.
    pub fn load(path: &Path, be: &dyn Backend) -> Result<Model> {
        if !path.exists() {
            bail!("{}: no such file or directory", path.display());
        }
        if !path.is_dir() {
            bail!("{}: expected a model directory (config.json, tokenizer.json, *.safetensors)", path.display());
        }
        let cfg = ModelConfig::from_file(&path.join("config.json"))?;
        let generation = GenerationConfig::from_file(&path.join("generation_config.json"))?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let chat_template = ChatTemplate::from_tokenizer_config(&path.join("tokenizer_config.json"))?;
        let ck = safetensors::Checkpoint::open_dir(path)?;
        let decoder = Decoder::load(cfg, &ck, be)?;
        Ok(Model { path: path.to_path_buf(), decoder, tokenizer, chat_template, generation })
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
