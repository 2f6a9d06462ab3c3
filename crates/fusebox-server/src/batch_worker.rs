//! The worker thread's loop when it batches ([`BatchEngine`]): requests move
//! from the queue into the engine as they come (while fewer than
//! `max_seqs` wait inside it, so a full queue still answers 429), every step
//! runs one forward pass over all running requests, and each request's
//! [`Sink`] turns its draws into events: streamed text, log-probabilities,
//! the frequency and presence penalties applied before the draw, the end.
//!
//! A request whose [`crate::Events`] were dropped is cancelled before the
//! next step (its KV blocks free again); [`crate::Engine::close`] ends every
//! request with an error. A failed or panicking step ends the requests it ran
//! with the error and starts a fresh engine.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc as std_mpsc;

use fusebox_core::Backend;
use fusebox_engine::{BatchEngine, BatchOptions, Observer, Request, SeqId, Speculation, StopReason, BLOCK_SIZE};
use fusebox_models::{Model, StreamDecoder, Tokenizer};
use tokio::sync::mpsc;

use crate::engine::{Event, FinishReason, Usage};
use crate::logprobs::StepScores;
use crate::model::{Batching, MakeSpeculation};
use crate::panic::panic_message;
use crate::penalties::Counts;
use crate::worker::{Job, Shared, SHUTTING_DOWN};

/// The engine's sizes for a context of `ctx` tokens. Without `--kv-blocks`:
/// blocks for `max_seqs` requests at the full context, or what half the
/// backend's free memory holds if less, and at least one full context.
pub(crate) fn options(b: &Batching, ctx: usize, model: &Model, be: &dyn Backend) -> BatchOptions {
    let one = ctx.div_ceil(BLOCK_SIZE);
    let per_block = (BLOCK_SIZE * model.decoder.cfg.kv_bytes_per_token(be.kv_dtype().size())).max(1);
    let fits = be.free_memory().map_or(usize::MAX, |free| free / 2 / per_block);
    BatchOptions {
        blocks: b.kv_blocks.unwrap_or((b.max_seqs * one).min(fits).max(one)),
        max_batch_tokens: b.max_batch_tokens,
        max_seqs: b.max_seqs,
        max_len: ctx,
    }
}

/// One request's end of the engine: what it is told at each draw.
struct Sink<'a> {
    tx: mpsc::UnboundedSender<Event>,
    tokenizer: &'a Tokenizer,
    shared: &'a Shared,
    stream: StreamDecoder,
    counts: Counts,
    penalties: bool,
    logprobs: Option<usize>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Sink<'_> {
    fn done(&mut self, finish_reason: FinishReason) {
        let text = match self.stream.flush(self.tokenizer) {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => return drop(self.tx.send(Event::Error(format!("{e:#}")))),
        };
        let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
        let _ = self.tx.send(Event::Done { finish_reason, usage, text });
    }
}

impl Observer for Sink<'_> {
    fn adjusts(&self) -> bool {
        self.penalties
    }

    fn adjust(&mut self, logits: &mut [f32]) {
        self.counts.apply(logits);
    }

    fn needs_logits(&self) -> bool {
        self.logprobs.is_some()
    }

    fn drawn(&mut self, raw: &[f32], token: u32, finished: Option<StopReason>) -> bool {
        if finished == Some(StopReason::Eos) {
            // a stop token is not sent
            self.done(FinishReason::Stop);
            return true;
        }
        self.shared.generated.fetch_add(1, SeqCst);
        if self.shared.closed.load(SeqCst) {
            return false;
        }
        self.counts.add(token);
        let logprobs = self.logprobs.map(|k| StepScores::new(raw, k).token(raw, token));
        let text = match self.stream.push(self.tokenizer, token) {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => {
                let _ = self.tx.send(Event::Error(format!("{e:#}")));
                return false;
            }
        };
        if self.tx.send(Event::Token { id: token, text, logprobs }).is_err() {
            return false;
        }
        self.completion_tokens += 1;
        if finished.is_some() {
            self.done(FinishReason::Length);
        }
        true
    }
}

/// Speculative decoding for the requests that can take it: a proposer made
/// per request.
pub(crate) struct Spec<'m> {
    pub make: &'m dyn MakeSpeculation,
    pub draft: Option<&'m Model>,
    pub ctx: usize,
}

/// Run jobs through `engine` until the queue closes. `spare` is a
/// speculation made already; finished requests' come back to it, so a
/// proposer is made only when none is free.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<'m>(
    model: &'m Model,
    be: &'m dyn Backend,
    opts: BatchOptions,
    mut engine: BatchEngine<'m>,
    spec: Option<Spec<'m>>,
    spare: Option<Speculation<'m>>,
    jobs: &std_mpsc::Receiver<Job>,
    shared: &'m Shared,
) {
    let mut spare: Vec<Speculation<'m>> = spare.into_iter().collect();
    let mut live: HashMap<SeqId, mpsc::UnboundedSender<Event>> = HashMap::new();
    let mut open = true;
    while open || !engine.is_idle() {
        // take jobs: wait for one when idle, else what is there
        let mut first = None;
        if engine.is_idle() {
            match jobs.recv() {
                Ok(j) => first = Some(j),
                Err(_) => break,
            }
        }
        while engine.waiting() < opts.max_seqs {
            let job = match first.take() {
                Some(j) => j,
                None => match jobs.try_recv() {
                    Ok(j) => j,
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                },
            };
            shared.queued.fetch_sub(1, SeqCst);
            admit(&mut engine, job, (model, be, spec.as_ref(), &mut spare), shared, &mut live);
        }
        // clients that went away, and a shutdown
        let closed = shared.closed.load(SeqCst);
        live.retain(|&id, tx| {
            if closed {
                let _ = tx.send(Event::Error(SHUTTING_DOWN.into()));
            }
            let keep = !closed && !tx.is_closed();
            if !keep {
                // ended as a finish, so that its proposer comes back
                engine.finish(id);
                spare.extend(engine.take_spec(id).map(|(s, _)| s));
            }
            keep
        });
        publish(&engine, shared);
        if engine.is_idle() {
            continue;
        }
        let failure = match catch_unwind(AssertUnwindSafe(|| engine.step())) {
            Ok(Ok(events)) => {
                for e in events.iter().filter(|e| e.finished.is_some()) {
                    spare.extend(engine.take_spec(e.id).map(|(s, _)| s));
                    if let Some(tx) = live.remove(&e.id) {
                        if e.finished == Some(StopReason::Callback) && shared.closed.load(SeqCst) {
                            let _ = tx.send(Event::Error(SHUTTING_DOWN.into()));
                        }
                    }
                }
                None
            }
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(p) => Some(format!("internal error: {}", panic_message(&*p))),
        };
        if let Some(msg) = failure {
            for (_, tx) in live.drain() {
                let _ = tx.send(Event::Error(msg.clone()));
            }
            match BatchEngine::new(&model.decoder, be, opts) {
                Ok(e) => engine = e,
                Err(e) => {
                    eprintln!("fusebox: the batched engine could not restart: {e:#}");
                    return;
                }
            }
        }
        publish(&engine, shared);
    }
}

/// Start `job` in the engine, or answer it at once. A request without
/// frequency or presence penalties speculates when the server does (the
/// rounds accept from the model's own logits).
fn admit<'m>(
    engine: &mut BatchEngine<'m>,
    job: Job,
    (model, be, spec, spare): (&'m Model, &'m dyn Backend, Option<&Spec<'m>>, &mut Vec<Speculation<'m>>),
    shared: &'m Shared,
    live: &mut HashMap<SeqId, mpsc::UnboundedSender<Event>>,
) {
    let tokenizer = &model.tokenizer;
    let Job { req, tx } = job;
    if tx.is_closed() {
        return; // cancelled while it waited
    }
    if shared.closed.load(SeqCst) {
        let _ = tx.send(Event::Error(SHUTTING_DOWN.into()));
        return;
    }
    shared.started.fetch_add(1, SeqCst);
    if req.max_tokens == 0 {
        let usage = Usage::new(req.prompt.len(), 0);
        let _ = tx.send(Event::Done { finish_reason: FinishReason::Length, usage, text: String::new() });
        return;
    }
    let sink = Sink {
        tx: tx.clone(),
        tokenizer,
        shared,
        stream: StreamDecoder::new(),
        counts: Counts::new(req.penalties),
        penalties: !req.penalties.is_off(),
        logprobs: req.logprobs,
        prompt_tokens: req.prompt.len(),
        completion_tokens: 0,
    };
    let speculation = match spec.filter(|_| req.penalties.is_off()) {
        Some(s) => match spare.pop().map(Ok).unwrap_or_else(|| s.make.make(model, s.draft, be, s.ctx)) {
            Ok(sp) => Some(sp),
            Err(e) => return drop(tx.send(Event::Error(format!("{e:#}")))),
        },
        None => None,
    };
    let request =
        Request { prompt: req.prompt, max_new_tokens: req.max_tokens, stop_ids: req.stop_ids, sampling: req.sampling };
    match engine.add_with(request, Some(Box::new(sink)), speculation) {
        Ok(id) => drop(live.insert(id, tx)),
        Err(e) => drop(tx.send(Event::Error(format!("{e:#}")))),
    }
}

/// The engine's state for [`crate::Engine::stats`] and `/metrics`.
fn publish(engine: &BatchEngine, shared: &Shared) {
    shared.held.store(engine.waiting(), SeqCst);
    shared.running.store(engine.running(), SeqCst);
    shared.kv_blocks_total.store(engine.blocks_total(), SeqCst);
    shared.kv_blocks_free.store(engine.blocks_free(), SeqCst);
    shared.preemptions.store(engine.preemptions(), SeqCst);
    let (_, drafted, accepted) = engine.spec_totals();
    shared.spec_drafted.store(drafted as u64, SeqCst);
    shared.spec_accepted.store(accepted as u64, SeqCst);
}
