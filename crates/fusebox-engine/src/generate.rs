//! The generation loop: prefill the prompt in one forward (chunked only past
//! [`PREFILL_CHUNK`] tokens), then decode one token at a time with a
//! workspace and KV cache allocated once up front.

use std::time::Instant;

use anyhow::{bail, Result};
use fusebox_core::Backend;
use fusebox_models::{Decoder, Logits, Workspace};

use crate::kv_cache::KvCache;
use crate::sampling::{Sampler, SamplingParams};

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
    model: &'m Decoder,
    be: &'m dyn Backend,
    pub kv: KvCache,
    decode_ws: Workspace,
    logits: Vec<f32>,
    /// Every token in the KV cache, in order.
    pub tokens: Vec<u32>,
}

impl<'m> Session<'m> {
    /// A session whose context holds `capacity` tokens.
    pub fn new(model: &'m Decoder, be: &'m dyn Backend, capacity: usize) -> Result<Session<'m>> {
        Ok(Session {
            model,
            be,
            kv: KvCache::new(model, be, capacity)?,
            decode_ws: model.workspace(be, 1, Logits::Last)?,
            logits: Vec::with_capacity(model.cfg.vocab_size),
            tokens: Vec::with_capacity(capacity),
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
    }

    /// How many leading tokens of `ids` are already in the context.
    pub fn common_prefix(&self, ids: &[u32]) -> usize {
        self.tokens.iter().zip(ids).take_while(|(a, b)| a == b).count()
    }

    /// Start over with an empty context.
    pub fn reset(&mut self) {
        self.kv.clear();
        self.tokens.clear();
    }

    fn check_room(&self, n: usize) -> Result<()> {
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
        let chunk = ids.len().min(PREFILL_CHUNK);
        let mut ws = self.model.workspace(self.be, chunk, Logits::Last)?;
        for part in ids.chunks(chunk) {
            if part.len() != ws.m {
                ws = self.model.workspace(self.be, part.len(), Logits::Last)?;
            }
            ws.set_tokens(self.be, part, self.kv.len)?;
            let (model, be, kv) = (self.model, self.be, &mut self.kv.layers);
            be.run(&mut || model.forward(be, &mut ws, kv))?;
            self.kv.len += part.len();
            self.tokens.extend_from_slice(part);
        }
        self.be.read_f32(&ws.logits, &mut self.logits)?;
        Ok(&mut self.logits)
    }

    /// Decode one token; returns the logits after it. Allocates nothing.
    pub fn step(&mut self, id: u32) -> Result<&mut [f32]> {
        self.check_room(1)?;
        self.decode_ws.set_tokens(self.be, &[id], self.kv.len)?;
        let (model, be, ws, kv) = (self.model, self.be, &mut self.decode_ws, &mut self.kv.layers);
        be.run(&mut || model.forward(be, ws, kv))?;
        self.kv.len += 1;
        self.tokens.push(id);
        self.be.read_f32(&self.decode_ws.logits, &mut self.logits)?;
        Ok(&mut self.logits)
    }

    /// Generate after `prompt` (appended to the current context). `on_token`
    /// sees each new token as it is produced and returns `false` to stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<GenerateOutput> {
        let mut sampler = Sampler::new(opts.sampling.clone());
        let t0 = Instant::now();
        self.prefill(prompt)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let mut out = GenerateOutput {
            prompt_tokens: prompt.len(),
            tokens: Vec::with_capacity(opts.max_new_tokens.min(self.capacity())),
            stop: StopReason::MaxTokens,
            prefill_secs,
            decode_secs: 0.0,
            decode_steps: 0,
        };
        if opts.max_new_tokens == 0 {
            return Ok(out);
        }
        let t1 = Instant::now();
        loop {
            let tok = sampler.sample(&mut self.logits, &self.tokens);
            if opts.stop_ids.contains(&tok) {
                out.stop = StopReason::Eos;
                break;
            }
            out.tokens.push(tok);
            if !on_token(tok)? {
                out.stop = StopReason::Callback;
                break;
            }
            if out.tokens.len() >= opts.max_new_tokens {
                out.stop = StopReason::MaxTokens;
                break;
            }
            if self.kv.remaining() == 0 {
                out.stop = StopReason::ContextFull;
                break;
            }
            self.step(tok)?;
            out.decode_steps += 1;
        }
        out.decode_secs = t1.elapsed().as_secs_f64();
        Ok(out)
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
