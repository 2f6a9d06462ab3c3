//! The [`Engine`] of `fusebox serve`: one thread that owns the model, the
//! backend and a [`fusebox_engine::BatchEngine`], fed by a bounded queue
//! ([`crate::batch_worker`] runs the loop).
//!
//! A request whose [`Events`] were dropped is stopped before the next step,
//! or skipped if it is still queued. [`Engine::close`] ends the running
//! requests and every queued one with an error and refuses new ones.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread;

use anyhow::{anyhow, Result};
use tokio::sync::mpsc;

use crate::engine::{Engine, EngineStats, Event, Events, GenRequest, SubmitError};
use crate::model::{Loaded, ModelInfo};

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
    pub(crate) spec_drafted: AtomicU64,
    pub(crate) spec_accepted: AtomicU64,
}

/// One thread that owns the model and its engine: batching where it can,
/// else one request at a time ([`crate::batch_worker`]).
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
            spec_draft_tokens: s.spec_drafted.load(SeqCst),
            spec_accepted_tokens: s.spec_accepted.load(SeqCst),
        }
    }

    fn close(&self) {
        self.shared.closed.store(true, SeqCst);
    }
}

/// The worker thread once the model is loaded: make the engine (batching
/// where the backend has paged attention and batching is on, else one
/// request at a time), report the model, then run jobs until the queue
/// closes.
fn run(loaded: Loaded, jobs: &std_mpsc::Receiver<Job>, ready: std_mpsc::Sender<Result<ModelInfo>>, shared: &Shared) {
    let Loaded { backend, mut model, ctx, spec, batching } = loaded;
    let be = &*backend;
    let chat_template = model.chat_template.take().map(Arc::new);
    let (draft, make) = match spec {
        Some(s) => (s.draft, Some(s.make)),
        None => (None, None),
    };
    // a proposer made now checks the settings (and serves the first request)
    let probe = match make.as_deref().map(|m| m.make(&model, draft.as_ref(), be, ctx)).transpose() {
        Ok(p) => p,
        Err(e) => return drop(ready.send(Err(e))),
    };
    let speculation = probe.as_ref().map(|s| format!("{} k={}", s.proposer.name(), s.options.k));
    let batched = batching.enabled && be.has_paged_attention();
    let opts = if batched {
        crate::batch_worker::options(&batching, ctx, &model, be)
    } else {
        fusebox_engine::BatchOptions::lone(ctx)
    };
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
        path: model.path.clone(),
        tokenizer: Arc::new(model.tokenizer.clone()),
        chat_template,
        generation: model.generation.clone(),
        eos_token_ids: model.eos_token_ids(),
        ctx,
        vocab_size: model.decoder.cfg.vocab_size,
        device: be.name(),
        speculation,
        batching: batched
            .then(|| format!("up to {} requests over {} KV blocks of 16 ({size})", opts.max_seqs, opts.blocks)),
    };
    let spec = make.as_deref().map(|make| crate::batch_worker::Spec { make, draft: draft.as_ref(), ctx });
    if ready.send(Ok(info)).is_ok() {
        crate::batch_worker::run(&model, be, opts, engine, spec, probe, jobs, shared);
    }
}
