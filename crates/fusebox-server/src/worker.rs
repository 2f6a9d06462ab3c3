//! The interface between the HTTP handlers and whatever generates tokens,
//! and its first implementation: one worker thread that owns the model, the
//! backend and a [`Session`], fed by a bounded queue and running one request
//! at a time.
//!
//! Handlers see only [`Engine::submit`] and the [`Events`] it returns, so a
//! batched scheduler can replace [`Worker`] without touching them. Dropping
//! the [`Events`] cancels the request: the worker stops at its next token.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread;

use anyhow::{anyhow, Result};
use fusebox_core::Backend;
use fusebox_engine::{GenerateOptions, SamplingParams, Session, StopReason};
use fusebox_models::{ChatTemplate, GenerationConfig, Model, StreamDecoder, Tokenizer};
use serde::Serialize;
use tokio::sync::mpsc;

/// One generation: token ids in, new tokens out.
#[derive(Clone, Debug)]
pub struct GenRequest {
    /// The prompt's token ids (not empty; shorter than the context).
    pub prompt: Vec<u32>,
    /// At most this many new tokens.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when one of these is drawn (it is not emitted).
    pub stop_ids: Vec<u32>,
}

/// Why a generation ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of one request (OpenAI's `usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// What a request produces, in order: tokens, then one `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A new token and the text it completes (empty while the detokenizer
    /// holds back an incomplete character or word).
    Token { id: u32, text: String },
    /// The end. `text` is what the detokenizer still held back (usually empty).
    Done { finish_reason: FinishReason, usage: Usage, text: String },
    /// The request failed after it was accepted.
    Error(String),
}

/// The events of one submitted request. Dropping it cancels the request.
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// A request's events, fed through `tx` (for [`Engine`] implementations).
    pub fn channel() -> (mpsc::UnboundedSender<Event>, Events) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Events { rx })
    }

    /// The next event; `None` once the engine is done with the request.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// [`Events::next`] for callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Stop the request (the same as dropping it).
    pub fn cancel(self) {}
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full; try again later.
    QueueFull,
    /// The engine has stopped.
    Closed,
}

/// Something that generates tokens for requests.
pub trait Engine: Send + Sync + 'static {
    /// Queue `req`; its events arrive on the returned [`Events`].
    fn submit(&self, req: GenRequest) -> Result<Events, SubmitError>;
}

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
}

/// What the loader hands the worker thread.
pub struct Loaded {
    pub backend: Box<dyn Backend>,
    pub model: Model,
    /// The context length of the session.
    pub ctx: usize,
}

struct Job {
    req: GenRequest,
    tx: mpsc::UnboundedSender<Event>,
}

/// One thread, one session, one request at a time.
pub struct Worker {
    queue: std_mpsc::SyncSender<Job>,
}

impl Worker {
    /// Start the worker thread: it runs `load`, then takes requests from a
    /// queue of `max_queue` (waiting, not counting the one running). Returns
    /// once the model is loaded, or with the loader's error.
    pub fn spawn<F>(load: F, max_queue: usize) -> Result<(Worker, ModelInfo)>
    where
        F: FnOnce() -> Result<Loaded> + Send + 'static,
    {
        let (queue, jobs) = std_mpsc::sync_channel::<Job>(max_queue.max(1));
        let (ready_tx, ready) = std_mpsc::channel::<Result<ModelInfo>>();
        thread::Builder::new().name("fusebox-worker".into()).spawn(move || {
            let Loaded { backend, model, ctx } = match load() {
                Ok(l) => l,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            let eos_token_ids = model.eos_token_ids();
            let Model { path, decoder, tokenizer, chat_template, generation } = model;
            let tokenizer = Arc::new(tokenizer);
            let mut session = match Session::new(&decoder, &*backend, ctx) {
                Ok(s) => s,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            let info = ModelInfo {
                path,
                tokenizer: tokenizer.clone(),
                chat_template: chat_template.map(Arc::new),
                generation,
                eos_token_ids,
                ctx,
                vocab_size: decoder.cfg.vocab_size,
                device: backend.name(),
            };
            if ready_tx.send(Ok(info)).is_err() {
                return;
            }
            while let Ok(job) = jobs.recv() {
                if job.tx.is_closed() {
                    continue; // cancelled while it waited
                }
                match catch_unwind(AssertUnwindSafe(|| run_job(&mut session, &tokenizer, &job))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => drop(job.tx.send(Event::Error(format!("{e:#}")))),
                    Err(p) => {
                        session.reset();
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        drop(job.tx.send(Event::Error(format!("internal error: {msg}"))));
                    }
                }
            }
        })?;
        let info = ready.recv().map_err(|_| anyhow!("the worker thread stopped while loading the model"))??;
        Ok((Worker { queue }, info))
    }
}

impl Engine for Worker {
    fn submit(&self, req: GenRequest) -> Result<Events, SubmitError> {
        let (tx, events) = Events::channel();
        match self.queue.try_send(Job { req, tx }) {
            Ok(()) => Ok(events),
            Err(std_mpsc::TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(std_mpsc::TrySendError::Disconnected(_)) => Err(SubmitError::Closed),
        }
    }
}

/// Generate for one job on a fresh context, sending its events.
fn run_job(session: &mut Session, tokenizer: &Tokenizer, job: &Job) -> Result<()> {
    let Job { req, tx } = job;
    session.reset();
    let opts = GenerateOptions {
        max_new_tokens: req.max_tokens,
        stop_ids: req.stop_ids.clone(),
        sampling: req.sampling.clone(),
    };
    let mut stream = StreamDecoder::new();
    let out = session.generate(&req.prompt, &opts, |id| {
        let text = stream.push(tokenizer, id)?.unwrap_or_default();
        Ok(tx.send(Event::Token { id, text }).is_ok())
    })?;
    let text = stream.flush(tokenizer)?.unwrap_or_default();
    let finish_reason = match out.stop {
        StopReason::Eos | StopReason::Callback => FinishReason::Stop,
        StopReason::MaxTokens | StopReason::ContextFull => FinishReason::Length,
    };
    let usage = Usage::new(out.prompt_tokens, out.tokens.len());
    let _ = tx.send(Event::Done { finish_reason, usage, text });
    Ok(())
}
