//! The interface between the HTTP handlers and whatever generates tokens.
//!
//! Handlers see only [`Engine::submit`] and the [`Events`] it returns, so a
//! batched scheduler can replace the [`Worker`](crate::Worker) without
//! touching them. Dropping the [`Events`] cancels the request: the engine
//! stops it at its next token, or skips it if it has not started.

use serde::Serialize;
use tokio::sync::mpsc;

use fusebox_engine::SamplingParams;

use crate::penalties::Penalties;

/// One generation: token ids in, new tokens out.
#[derive(Clone, Debug, Default)]
pub struct GenRequest {
    /// The prompt's token ids (not empty; shorter than the context).
    pub prompt: Vec<u32>,
    /// At most this many new tokens.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when one of these is drawn (it is not emitted).
    pub stop_ids: Vec<u32>,
    /// OpenAI's frequency and presence penalties (zero: off).
    pub penalties: Penalties,
    /// Report each token's log-probability and this many most likely
    /// alternatives (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
}

/// A drawn token's log-probability under the model's raw distribution (the
/// log-softmax of its logits, before temperature, penalties and filters),
/// and the most likely tokens at that step with theirs, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
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
    /// holds back an incomplete character or word), with its
    /// log-probabilities when the request asked for them.
    Token { id: u32, text: String, logprobs: Option<TokenLogprobs> },
    /// The end. `text` is what the detokenizer still held back (usually empty).
    Done { finish_reason: FinishReason, usage: Usage, text: String },
    /// The request failed (or the engine shut down) after it was accepted.
    Error(String),
}

/// The events of one submitted request. Dropping it cancels the request.
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// A request's events, fed through `tx` (for [`Engine`] implementations;
    /// `tx.is_closed()` says the request was cancelled).
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
    /// The engine has stopped (or is shutting down).
    Closed,
}

/// A snapshot of what an engine is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests accepted and waiting to start.
    pub queued: usize,
    /// Requests being generated.
    pub running: usize,
    /// Requests that started generating, since the engine started.
    pub started: u64,
    /// Tokens generated since the engine started, for every request
    /// (cancelled ones included).
    pub generated_tokens: u64,
    /// The engine's KV cache: blocks in all and free.
    pub kv_blocks_total: usize,
    pub kv_blocks_free: usize,
    /// Requests a batching engine preempted (their blocks freed, their
    /// tokens recomputed later), since it started.
    pub preemptions: u64,
    /// Speculative decoding since the engine started: draft tokens scored,
    /// and those accepted.
    pub spec_draft_tokens: u64,
    pub spec_accepted_tokens: u64,
}

/// Something that generates tokens for requests.
pub trait Engine: Send + Sync + 'static {
    /// Queue `req`; its events arrive on the returned [`Events`].
    fn submit(&self, req: GenRequest) -> Result<Events, SubmitError>;

    /// What the engine is doing now (default: nothing known).
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    /// Shut down: refuse new requests ([`SubmitError::Closed`]) and end the
    /// running and queued ones with an [`Event::Error`] at their next token
    /// (default: nothing to stop).
    fn close(&self) {}
}
