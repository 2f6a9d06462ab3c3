//! What a loader hands the [`Worker`](crate::Worker) ([`Loaded`], with its
//! speculative decoding, if any) and what the worker tells the HTTP side
//! about the model ([`ModelInfo`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use fusebox_core::Backend;
use fusebox_engine::Speculation;
use fusebox_models::{ChatTemplate, GenerationConfig, Model, Tokenizer};

/// What the HTTP side needs to know about the loaded model.
pub struct ModelInfo {
    pub path: PathBuf,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub generation: GenerationConfig,
    pub eos_token_ids: Vec<u32>,
    /// The context length in tokens, prompt included.
    pub ctx: usize,
    pub vocab_size: usize,
    /// The backend's name (`cpu (2 threads)`, `cuda:0 (...)`).
    pub device: String,
    /// How the worker decodes, for the startup line (`ngram k=4`; `None`:
    /// plain decoding).
    pub speculation: Option<String>,
    /// The batching engine's sizes, for the startup line (`None`: one
    /// request at a time).
    pub batching: Option<String>,
}

/// What the loader hands the worker thread.
pub struct Loaded {
    pub backend: Box<dyn Backend>,
    pub model: Model,
    /// The context length of the session.
    pub ctx: usize,
    /// Speculative decoding (`None`: plain decoding).
    pub spec: Option<SpecSetup>,
    /// Continuous batching's sizes (used where the backend has a paged KV
    /// cache and there is no speculation).
    pub batching: Batching,
}

/// Sizes of the batched worker ([`fusebox_engine::BatchEngine`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// KV cache blocks of 16 positions; `None`: enough for `max_seqs`
    /// requests at the full context, or what half the free memory holds
    /// if less (at least one full context).
    pub kv_blocks: Option<usize>,
    /// Rows one step may run (decode rows and prefill chunks together).
    pub max_batch_tokens: usize,
    /// Requests generated at once.
    pub max_seqs: usize,
    /// `false`: one request at a time on a contiguous cache, as before.
    pub enabled: bool,
}

impl Default for Batching {
    fn default() -> Batching {
        Batching { kv_blocks: None, max_batch_tokens: 512, max_seqs: 16, enabled: true }
    }
}

impl Loaded {
    /// `model` on `backend` with a context of `ctx` tokens, decoding plainly.
    pub fn new(backend: Box<dyn Backend>, model: Model, ctx: usize) -> Loaded {
        Loaded { backend, model, ctx, spec: None, batching: Batching::default() }
    }
}

/// Speculative decoding for the worker: the draft model it needs (if any),
/// and how to make the [`Speculation`] once the worker holds the models.
pub struct SpecSetup {
    pub draft: Option<Model>,
    pub make: Box<dyn MakeSpeculation>,
}

/// Makes the [`Speculation`] the worker generates with (the loader's side
/// knows the method and its settings; the worker owns what it borrows).
pub trait MakeSpeculation {
    fn make<'m>(
        &self,
        target: &'m Model,
        draft: Option<&'m Model>,
        be: &'m dyn Backend,
        ctx: usize,
    ) -> Result<Speculation<'m>>;
}
