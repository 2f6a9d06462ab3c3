//! One request at a time through a [`BatchEngine`], start to end: the loop
//! `generate`, `run` and `bench` drive. A lone sequence runs the contiguous
//! kernels and decodes in one repeating pass with the draw on the backend,
//! so nothing is lost to the batching machinery; with prefix reuse on
//! ([`BatchEngine::set_prefix_reuse`]) a chat's next turn prefills only
//! what it adds.

use std::time::Instant;

use anyhow::{ensure, Result};
use fusebox_core::Backend;
use fusebox_models::Decoder;

use crate::batch::{BatchEngine, BatchOptions, Request};
use crate::block_manager::BLOCK_SIZE;
use crate::generate::{GenerateOptions, GenerateOutput, StopReason, PREFILL_CHUNK};
use crate::spec::{SpecStats, Speculation};

impl<'m> BatchEngine<'m> {
    /// An engine for one request at a time with a context of `ctx` tokens.
    pub fn lone(model: &'m Decoder, be: &'m dyn Backend, ctx: usize) -> Result<BatchEngine<'m>> {
        ensure!(ctx > 0, "the context holds no tokens");
        BatchEngine::new(model, be, BatchOptions::lone(ctx))
    }

    /// Generate after `prompt`, alone (the engine must be idle), with
    /// `spec`'s proposer when given (it is handed back at the end, to use
    /// again). `on_token` sees each new token as it is produced (a stop
    /// token is neither shown nor kept) and returns `false` to stop. The
    /// prompt's prefix shared with the last request is reused when prefix
    /// reuse is on; the output's `prompt_tokens` counts what ran.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        spec: &mut Option<Speculation<'m>>,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<(GenerateOutput, Option<SpecStats>)> {
        ensure!(self.is_idle(), "generate: the engine is running other requests");
        ensure!(!prompt.is_empty(), "the prompt is empty (no tokens)");
        let reused = self.reusable_prefix(prompt);
        let mut out = GenerateOutput::new(prompt.len() - reused, opts.max_new_tokens.min(1 << 16));
        if opts.max_new_tokens == 0 {
            return Ok((out, None));
        }
        let t0 = Instant::now();
        let req = Request {
            prompt: prompt.to_vec(),
            max_new_tokens: opts.max_new_tokens,
            stop_ids: opts.stop_ids.clone(),
            sampling: opts.sampling.clone(),
        };
        let id = self.add_with(req, None, spec.take())?;
        let run = self.run_lone(id, t0, &mut out, &mut on_token);
        if run.is_err() {
            self.cancel(id);
        }
        out.stop = run?;
        let stats = self.take_spec(id).map(|(s, stats)| {
            *spec = Some(s);
            stats
        });
        Ok((out, stats))
    }

    /// Step sequence `id`, alone, to its end; returns why it ended.
    fn run_lone(
        &mut self,
        id: crate::batch::SeqId,
        t0: Instant,
        out: &mut GenerateOutput,
        on_token: &mut impl FnMut(u32) -> Result<bool>,
    ) -> Result<StopReason> {
        let mut t1: Option<Instant> = None;
        let mut stop = None;
        let mut events = Vec::with_capacity(crate::spec::MAX_SPEC_K + 1);
        while stop.is_none() {
            self.step_into(&mut events)?;
            for e in events.iter().cloned() {
                debug_assert_eq!(e.id, id);
                if let Some(tok) = e.token {
                    match t1 {
                        None => {
                            out.prefill_secs = t0.elapsed().as_secs_f64();
                            t1 = Some(Instant::now());
                        }
                        Some(_) => out.decode_steps += 1,
                    }
                    if e.finished != Some(StopReason::Eos) {
                        out.tokens.push(tok);
                        if !on_token(tok)? {
                            stop = Some(StopReason::Callback);
                            if e.finished.is_none() {
                                self.finish(id);
                            }
                            break;
                        }
                    }
                }
                if let Some(why) = e.finished {
                    stop = Some(why);
                }
            }
            ensure!(stop.is_some() || !self.is_idle(), "generate: the request left the engine unfinished");
        }
        out.decode_secs = t1.map_or(0.0, |t| t.elapsed().as_secs_f64());
        Ok(stop.expect("the loop ends on a stop"))
    }
}

impl BatchOptions {
    /// The sizes of an engine for one request at a time with a context of
    /// `ctx` tokens: its cache, prompts prefilled in chunks of
    /// [`PREFILL_CHUNK`].
    pub fn lone(ctx: usize) -> BatchOptions {
        BatchOptions { blocks: ctx.div_ceil(BLOCK_SIZE), max_batch_tokens: PREFILL_CHUNK, max_seqs: 1, max_len: ctx }
    }
}
