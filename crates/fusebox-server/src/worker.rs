//! The first [`Engine`]: one thread that owns the model, the backend, a
//! [`Session`] and the speculation (if any), fed by a bounded queue and
//! running one request at a time on a fresh context.
//!
//! A request whose [`Events`] were dropped is stopped at its next token, or
//! skipped if it is still queued. [`Engine::close`] ends the running request
//! and every queued one with an error and refuses new ones.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread;

use anyhow::{anyhow, Result};
use fusebox_core::Backend;
use fusebox_engine::{GenerateOptions, Session, Speculation, StopReason};
use fusebox_models::{Model, StreamDecoder, Tokenizer};
use tokio::sync::mpsc;

use crate::engine::{Engine, EngineStats, Event, Events, FinishReason, GenRequest, SubmitError, TokenLogprobs, Usage};
use crate::model::{Loaded, MakeSpeculation, ModelInfo};
use crate::panic::panic_message;
use crate::stepwise;

/// What a request is told when the server shuts down under it.
pub const SHUTTING_DOWN: &str = "the server is shutting down";

pub(crate) struct Job {
    pub(crate) req: GenRequest,
    pub(crate) tx: mpsc::UnboundedSender<Event>,
}

/// Counters and the shutdown flag, shared by the handles and the thread.
#[derive(Default)]
pub(crate) struct Shared {
    /// Jobs in the queue.
    pub(crate) queued: AtomicUsize,
    /// Requests a batching engine holds but has not started.
    pub(crate) held: AtomicUsize,
    pub(crate) running: AtomicUsize,
    pub(crate) started: AtomicU64,
    pub(crate) generated: AtomicU64,
    pub(crate) closed: AtomicBool,
    pub(crate) kv_blocks_total: AtomicUsize,
    pub(crate) kv_blocks_free: AtomicUsize,
    pub(crate) preemptions: AtomicU64,
}

/// One thread that owns the model: a batching engine where the backend has
/// a paged KV cache and there is no speculation ([`crate::batch_worker`]),
/// else one session running one request at a time.
pub struct Worker {
    queue: std_mpsc::SyncSender<Job>,
    shared: Arc<Shared>,
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
        let shared = Arc::<Shared>::default();
        let sh = shared.clone();
        thread::Builder::new().name("fusebox-worker".into()).spawn(move || match load() {
            Ok(loaded) => run(loaded, &jobs, ready_tx, &sh),
            Err(e) => drop(ready_tx.send(Err(e))),
        })?;
        let info = ready.recv().map_err(|_| anyhow!("the worker thread stopped while loading the model"))??;
        Ok((Worker { queue, shared }, info))
    }
}

impl Engine for Worker {
    fn submit(&self, req: GenRequest) -> Result<Events, SubmitError> {
        if self.shared.closed.load(SeqCst) {
            return Err(SubmitError::Closed);
        }
        let (tx, events) = Events::channel();
        self.shared.queued.fetch_add(1, SeqCst);
        let r = self.queue.try_send(Job { req, tx });
        if r.is_err() {
            self.shared.queued.fetch_sub(1, SeqCst);
        }
        match r {
            Ok(()) => Ok(events),
            Err(std_mpsc::TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(std_mpsc::TrySendError::Disconnected(_)) => Err(SubmitError::Closed),
        }
    }

    fn stats(&self) -> EngineStats {
        let s = &self.shared;
        EngineStats {
            queued: s.queued.load(SeqCst) + s.held.load(SeqCst),
            running: s.running.load(SeqCst),
            started: s.started.load(SeqCst),
            generated_tokens: s.generated.load(SeqCst),
            kv_blocks_total: s.kv_blocks_total.load(SeqCst),
            kv_blocks_free: s.kv_blocks_free.load(SeqCst),
            preemptions: s.preemptions.load(SeqCst),
        }
    }

    fn close(&self) {
        self.shared.closed.store(true, SeqCst);
    }
}

/// The worker thread once the model is loaded: set up the session (and the
/// speculation), report the model, then run jobs until the queue closes.
fn run(loaded: Loaded, jobs: &std_mpsc::Receiver<Job>, ready: std_mpsc::Sender<Result<ModelInfo>>, shared: &Shared) {
    let Loaded { backend, mut model, ctx, spec, batching } = loaded;
    let be = &*backend;
    let (draft, make) = match spec {
        Some(s) => (s.draft, Some(s.make)),
        None => (None, None),
    };
    let info = ModelInfo {
        path: model.path.clone(),
        tokenizer: Arc::new(model.tokenizer.clone()),
        chat_template: model.chat_template.take().map(Arc::new),
        generation: model.generation.clone(),
        eos_token_ids: model.eos_token_ids(),
        ctx,
        vocab_size: model.decoder.cfg.vocab_size,
        device: be.name(),
        speculation: None,
        batching: None,
    };
    // speculation batches too, unless its proposer reads the target's hidden states (DFlash)
    let probe = match make.as_deref().map(|m| m.make(&model, draft.as_ref(), be, ctx)).transpose() {
        Ok(p) => p,
        Err(e) => return drop(ready.send(Err(e))),
    };
    let batchable = probe.as_ref().is_none_or(|p| p.proposer.target_layers().is_empty());
    let speculation = probe.as_ref().map(|s| format!("{} k={}", s.proposer.name(), s.options.k));
    drop(probe);
    if batchable && batching.enabled && be.has_paged_attention() {
        let opts = crate::batch_worker::options(&batching, ctx, &model, be);
        let engine = match fusebox_engine::BatchEngine::new(&model.decoder, be, opts) {
            Ok(e) => e,
            Err(e) => return drop(ready.send(Err(e))),
        };
        let per_block = fusebox_engine::BLOCK_SIZE * model.decoder.cfg.kv_bytes_per_token(be.kv_dtype().size());
        let bytes = (opts.blocks * per_block) as f64;
        let size = if bytes >= (1u64 << 30) as f64 {
            format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
        } else {
            format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
        };
        let info = ModelInfo {
            batching: Some(format!("up to {} requests over {} KV blocks of 16 ({size})", opts.max_seqs, opts.blocks)),
            speculation,
            ..info
        };
        let spec = make.as_deref().map(|make| crate::batch_worker::Spec { make, draft: draft.as_ref(), ctx });
        if ready.send(Ok(info)).is_ok() {
            crate::batch_worker::run(&model, be, opts, engine, spec, jobs, shared);
        }
        return;
    }
    let mut gen = match Generator::new(&model, draft.as_ref(), make.as_deref(), be, ctx, shared) {
        Ok(g) => g,
        Err(e) => return drop(ready.send(Err(e))),
    };
    let info = ModelInfo {
        speculation: gen.spec.as_ref().map(|s| format!("{} k={}", s.proposer.name(), s.options.k)),
        ..info
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    while let Ok(job) = jobs.recv() {
        if job.tx.is_closed() {
            shared.queued.fetch_sub(1, SeqCst);
            continue; // cancelled while it waited
        }
        shared.running.fetch_add(1, SeqCst);
        shared.queued.fetch_sub(1, SeqCst);
        if shared.closed.load(SeqCst) {
            let _ = job.tx.send(Event::Error(SHUTTING_DOWN.into()));
        } else {
            shared.started.fetch_add(1, SeqCst);
            match catch_unwind(AssertUnwindSafe(|| gen.run(&job))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => drop(job.tx.send(Event::Error(format!("{e:#}")))),
                Err(p) => {
                    gen.session.reset();
                    drop(job.tx.send(Event::Error(format!("internal error: {}", panic_message(&*p)))));
                }
            }
        }
        shared.running.fetch_sub(1, SeqCst);
    }
}

/// What the worker generates with.
struct Generator<'m> {
    session: Session<'m>,
    spec: Option<Speculation<'m>>,
    tokenizer: &'m Tokenizer,
    shared: &'m Shared,
}

impl<'m> Generator<'m> {
    fn new(
        model: &'m Model,
        draft: Option<&'m Model>,
        make: Option<&dyn MakeSpeculation>,
        be: &'m dyn Backend,
        ctx: usize,
        shared: &'m Shared,
    ) -> Result<Generator<'m>> {
        let session = Session::new(&model.decoder, be, ctx)?;
        let spec = make.map(|m| m.make(model, draft, be, ctx)).transpose()?;
        Ok(Generator { session, spec, tokenizer: &model.tokenizer, shared })
    }

    /// Generate for one job on a fresh context, sending its events; stop
    /// when the request is cancelled or the worker closed. Requests that
    /// need each step's logits run the host-driven loop ([`stepwise`]),
    /// without speculation; the others the session's own loop.
    fn run(&mut self, job: &Job) -> Result<()> {
        let Job { req, tx } = job;
        let (tokenizer, shared) = (self.tokenizer, self.shared);
        self.session.reset();
        let mut stream = StreamDecoder::new();
        let mut on_token = |id: u32, logprobs: Option<TokenLogprobs>| -> Result<bool> {
            shared.generated.fetch_add(1, SeqCst);
            if shared.closed.load(SeqCst) {
                return Ok(false);
            }
            let text = stream.push(tokenizer, id)?.unwrap_or_default();
            Ok(tx.send(Event::Token { id, text, logprobs }).is_ok())
        };
        let out = if stepwise::needed(req) {
            stepwise::generate(&mut self.session, req, on_token)?
        } else {
            let opts = GenerateOptions {
                max_new_tokens: req.max_tokens,
                stop_ids: req.stop_ids.clone(),
                sampling: req.sampling.clone(),
            };
            let (out, _) =
                self.session.generate_with(&req.prompt, &opts, self.spec.as_mut(), |id| on_token(id, None))?;
            out
        };
        if out.stop == StopReason::Callback && shared.closed.load(SeqCst) {
            let _ = tx.send(Event::Error(SHUTTING_DOWN.into()));
            return Ok(());
        }
        let text = stream.flush(tokenizer)?.unwrap_or_default();
        let finish_reason = match out.stop {
            StopReason::Eos | StopReason::Callback => FinishReason::Stop,
            StopReason::MaxTokens | StopReason::ContextFull => FinishReason::Length,
        };
        let usage = Usage::new(out.prompt_tokens, out.tokens.len());
        let _ = tx.send(Event::Done { finish_reason, usage, text });
        Ok(())
    }
}
