//! The generation loop: prefill the prompt in one forward (chunked only past
//! [`PREFILL_CHUNK`] tokens), then decode one token at a time with a
//! workspace and KV cache allocated once up front.
//!
//! Tokens are drawn on the backend ([`Backend::sample`]): the sampling
//! parameters, the token history and the draw counter live in device
//! buffers, so a decode step (the forward pass and the draw) is one
//! [`Backend::run_graph`] pass that a device backend records once and
//! replays, and only the drawn token comes back to the host.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Result};
use fusebox_core::dtype::splitmix64;
use fusebox_core::{Backend, Tensor};
use fusebox_models::{Decoder, Logits, Workspace};

use crate::device_sampler::DeviceSampler;
use crate::kv_cache::KvCache;
use crate::sampling::SamplingParams;

/// Prompts longer than this are prefilled in chunks of this many tokens,
/// which bounds the activation memory of a prefill.
pub const PREFILL_CHUNK: usize = 2048;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Stop when one of these is sampled (it is not emitted).
    pub stop_ids: Vec<u32>,
    pub sampling: SamplingParams,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop (EOS) token was sampled.
    Eos,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The KV cache (context) is full.
    ContextFull,
    /// The token callback asked to stop.
    Callback,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Callback => "stopped",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub prompt_tokens: usize,
    /// The generated tokens (a stop token is not included).
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Time of the prompt forward pass(es).
    pub prefill_secs: f64,
    /// Time of the decode forward passes, and how many there were.
    pub decode_secs: f64,
    pub decode_steps: usize,
}

impl GenerateOutput {
    pub(crate) fn new(prompt_tokens: usize, capacity: usize) -> GenerateOutput {
        GenerateOutput {
            prompt_tokens,
            tokens: Vec::with_capacity(capacity),
            stop: StopReason::MaxTokens,
            prefill_secs: 0.0,
            decode_secs: 0.0,
            decode_steps: 0,
        }
    }

    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_steps == 0 {
            0.0
        } else {
            self.decode_steps as f64 / self.decode_secs.max(1e-9)
        }
    }
}

/// One sequence being generated on one backend.
pub struct Session<'m> {
    pub(crate) model: &'m Decoder,
    pub(crate) be: &'m dyn Backend,
    pub kv: KvCache,
    decode_ws: Workspace,
    logits: Vec<f32>,
    /// Every token in the KV cache, in order.
    pub tokens: Vec<u32>,
    pub(crate) sampler: DeviceSampler,
    /// Names this session's buffers in graph keys.
    id: u64,
    /// `FUSEBOX_FUSED_PARITY_CHECK`: steps checked and the worst relative RMS
    /// of fused against graph-path logits.
    parity: Option<ParityCheck>,
    /// Speculative verify passes, by row count (made at first use).
    pub(crate) verify: crate::verify::VerifyPasses,
}

/// The fused-path diagnostic: every decode step also runs on the graph path.
#[derive(Clone, Copy, Debug, Default)]
pub struct ParityCheck {
    pub steps: usize,
    pub worst_rms: f64,
    /// The decode step (0-based) where the worst RMS was seen.
    pub worst_step: usize,
}

impl ParityCheck {
    /// One decode step's logits, `fused` against the graph path's `reference`.
    pub(crate) fn record(&mut self, fused: &[f32], reference: &[f32]) {
        let num: f64 = fused.iter().zip(reference).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
        let e = (num / den.max(f64::MIN_POSITIVE)).sqrt();
        if e > self.worst_rms || self.steps == 0 {
            self.worst_rms = e;
            self.worst_step = self.steps;
        }
        self.steps += 1;
    }

    /// One line for stderr.
    pub fn report(&self) -> String {
        format!(
            "fusebox: parity check (FUSEBOX_FUSED_PARITY_CHECK): {} decode steps, fused vs graph path worst relative RMS {:.3e} (step {}){}",
            self.steps,
            self.worst_rms,
            self.worst_step,
            if self.worst_rms < 5e-3 { "" } else { " -- above the 5e-3 gate" }
        )
    }
}

/// Graph keys of the two repeating passes.
const PASS_STEP: u64 = 1;
const PASS_DECODE: u64 = 2;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

impl<'m> Session<'m> {
    /// A session whose context holds `capacity` tokens.
    pub fn new(model: &'m Decoder, be: &'m dyn Backend, capacity: usize) -> Result<Session<'m>> {
        let sampler = DeviceSampler::new(be, capacity)?;
        Ok(Session {
            model,
            be,
            kv: KvCache::new(model, be, capacity)?,
            decode_ws: model.workspace(be, 1, Logits::Last)?,
            logits: Vec::with_capacity(model.cfg.vocab_size),
            tokens: Vec::with_capacity(capacity),
            sampler,
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            parity: fusebox_core::fusion::parity_check().then(ParityCheck::default),
            verify: Default::default(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.kv.capacity()
    }

    /// Keep only the first `n` tokens of the context (a shared prefix of the
    /// next prompt), so that only the rest needs a prefill.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.tokens.len());
        self.tokens.truncate(n);
        self.kv.len = n;
        self.sampler.pending = None;
    }

    /// How many leading tokens of `ids` are already in the context.
    pub fn common_prefix(&self, ids: &[u32]) -> usize {
        self.tokens.iter().zip(ids).take_while(|(a, b)| a == b).count()
    }

    /// Start over with an empty context.
    pub fn reset(&mut self) {
        self.kv.clear();
        self.tokens.clear();
        self.sampler.pending = None;
    }

    pub(crate) fn check_room(&self, n: usize) -> Result<()> {
        if n > self.kv.remaining() {
            bail!(
                "{} tokens do not fit in the context: {} of {} positions are free (raise --ctx-size, up to the model's max_position_embeddings)",
                n,
                self.kv.remaining(),
                self.kv.capacity()
            );
        }
        Ok(())
    }

    /// The key of a repeating pass over this session's buffers: it changes
    /// with the session and whenever the KV cache is replaced.
    pub(crate) fn graph_key(&self, pass: u64) -> u64 {
        let kv = match self.kv.layers.first() {
            Some(l) if l.k.is_device() => l.k.device_ptr().unwrap_or(0),
            Some(l) => l.k.numel() as u64,
            None => 0,
        };
        splitmix64(splitmix64(self.id ^ splitmix64(kv)) ^ pass)
    }

    /// A workspace of `m` rows.
    pub(crate) fn workspace(&self, m: usize, mode: Logits) -> Result<Workspace> {
        self.model.workspace(self.be, m, mode)
    }

    /// Run `ids` after what is already in the context, in chunks of at
    /// most [`PREFILL_CHUNK`]; the workspace of the last chunk holds the
    /// logits after the last token. `observer` sees each chunk's captured
    /// target layers.
    fn forward_prompt(&mut self, ids: &[u32]) -> Result<Workspace> {
        let chunk = ids.len().min(PREFILL_CHUNK);
        let mut ws = self.workspace(chunk, Logits::Last)?;
        self.sampler.pending = None;
        for part in ids.chunks(chunk) {
            if part.len() != ws.m {
                ws = self.workspace(part.len(), Logits::Last)?;
            }
            ws.set_tokens(self.be, part, self.kv.len)?;
            let (model, be, kv) = (self.model, self.be, &mut self.kv.layers);
            be.run(&mut || model.forward(be, &mut ws, kv))?;
            self.kv.len += part.len();
            self.tokens.extend_from_slice(part);
        }
        Ok(ws)
    }

    /// Run `ids` after what is already in the context; returns the logits
    /// after the last of them.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<&mut [f32]> {
        if ids.is_empty() {
            bail!("the prompt is empty (no tokens)");
        }
        self.check_room(ids.len())?;
        if ids.len() == 1 {
            return self.step(ids[0]);
        }
        let ws = self.forward_prompt(ids)?;
        self.be.read_f32(&ws.logits, &mut self.logits)?;
        Ok(&mut self.logits)
    }

    /// The `FUSEBOX_FUSED_PARITY_CHECK` result so far (None when it is off).
    pub fn parity(&self) -> Option<ParityCheck> {
        self.parity
    }

    /// The parity check's reference: the decode step on the graph path
    /// (it writes the same KV row the real step then overwrites).
    fn parity_reference(&mut self) -> Result<Option<Vec<f32>>> {
        if self.parity.is_none() {
            return Ok(None);
        }
        let (model, be, ws, kv) = (self.model, self.be, &mut self.decode_ws, &mut self.kv.layers);
        be.force_graph_path(true);
        let r = be.run(&mut || model.forward(be, ws, kv));
        be.force_graph_path(false);
        r?;
        let mut v = vec![];
        be.read_f32(&ws.logits, &mut v)?;
        Ok(Some(v))
    }

    fn parity_compare(&mut self, reference: Option<Vec<f32>>) -> Result<()> {
        let (Some(r), Some(p)) = (reference, self.parity.as_mut()) else { return Ok(()) };
        let mut f = vec![];
        self.be.read_f32(&self.decode_ws.logits, &mut f)?;
        p.record(&f, &r);
        Ok(())
    }

    /// Decode one token; returns the logits after it. Allocates nothing
    /// (unless `FUSEBOX_FUSED_PARITY_CHECK` is on).
    pub fn step(&mut self, id: u32) -> Result<&mut [f32]> {
        self.check_room(1)?;
        self.decode_ws.set_tokens(self.be, &[id], self.kv.len)?;
        let reference = self.parity_reference()?;
        let key = self.graph_key(PASS_STEP);
        let (model, be, ws, kv) = (self.model, self.be, &mut self.decode_ws, &mut self.kv.layers);
        be.run_graph(key, &mut || model.forward(be, ws, kv))?;
        self.parity_compare(reference)?;
        self.kv.len += 1;
        self.tokens.push(id);
        self.sampler.pending = None;
        self.be.read_f32(&self.decode_ws.logits, &mut self.logits)?;
        Ok(&mut self.logits)
    }

    /// Set the sampling parameters for the draws that follow, and restart
    /// the random stream (draw `i` after this uses counter `i`, so the same
    /// seed, context and settings give the same tokens).
    pub fn set_sampling(&mut self, p: &SamplingParams) -> Result<()> {
        self.sampler.set_params(self.be, p, 0)
    }

    /// Put the context (and `next`, the token about to be run) in the
    /// device history, and the state to match.
    fn write_history(&mut self, next: Option<u32>) -> Result<()> {
        self.sampler.write_history(self.be, &self.tokens, next)
    }

    /// Read the drawn token back.
    fn take_token(&mut self) -> Result<u32> {
        self.sampler.take_token(self.be, self.model.cfg.vocab_size)
    }

    /// Draw a token from `logits` (the last prompt chunk's).
    fn sample_from(&mut self, logits: &Tensor) -> Result<u32> {
        self.write_history(None)?;
        self.sampler.sample(self.be, logits)?;
        self.take_token()
    }

    /// Run `id` and draw the next token on the backend, as one repeating pass
    /// (a CUDA graph replay once warm). Uses the parameters of
    /// [`Session::set_sampling`]; the penalty sees the context and `id`.
    /// Allocates nothing once warm.
    pub fn decode(&mut self, id: u32) -> Result<u32> {
        self.check_room(1)?;
        if self.sampler.pending != Some(id) {
            self.write_history(Some(id))?;
        }
        self.decode_ws.set_tokens(self.be, &[id], self.kv.len)?;
        let reference = self.parity_reference()?;
        let key = self.graph_key(PASS_DECODE);
        let (model, be, ws, kv, s) = (self.model, self.be, &mut self.decode_ws, &mut self.kv.layers, &mut self.sampler);
        be.run_graph(key, &mut || {
            model.forward(be, ws, kv)?;
            s.sample(be, &ws.logits)
        })?;
        self.parity_compare(reference)?;
        self.kv.len += 1;
        self.tokens.push(id);
        self.take_token()
    }

    /// The sampler's device state, read back (for tests and debugging): the
    /// valid part of the token history and the draw counter. After a draw
    /// the history is the context followed by the token drawn.
    pub fn sampler_history(&self) -> Result<(Vec<i32>, u32)> {
        self.sampler.read_history(self.be)
    }

    /// Run `prompt` (one token or more) after the context and draw the next
    /// token with the sampler of [`Session::set_sampling`] (the plain and the
    /// speculative loops start alike; a draft model drafts with it).
    pub fn advance(&mut self, prompt: &[u32]) -> Result<u32> {
        if let [id] = prompt {
            self.decode(*id)
        } else {
            let ws = self.forward_prompt(prompt)?;
            self.sample_from(&ws.logits)
        }
    }
}

/// Logits at every position of `ids` from one forward pass over a fresh
/// context (`[ids.len(), vocab]`, row-major). For tests and scoring.
pub fn full_logits(model: &Decoder, be: &dyn Backend, ids: &[u32]) -> Result<Vec<f32>> {
    let mut kv = KvCache::new(model, be, ids.len())?;
    let mut ws = model.workspace(be, ids.len(), Logits::All)?;
    ws.set_tokens(be, ids, 0)?;
    model.forward(be, &mut ws, &mut kv.layers)?;
    let mut out = Vec::new();
    be.read_f32(&ws.logits, &mut out)?;
    Ok(out)
}
