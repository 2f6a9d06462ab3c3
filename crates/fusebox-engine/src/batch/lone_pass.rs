//! A lone sequence's passes (its blocks the cache's first, in order): the
//! decode step and the speculative round as one repeating pass each, the
//! draw or each row's argmax on the backend, as a `Session` runs them.

use anyhow::Result;
use fusebox_core::dtype::splitmix64;

use super::draws::{record, round};
use super::{BatchEngine, Event, LoneDraw};
use crate::device_sampler::DeviceSampler;

/// The graph key of a lone sequence's decode step (with the engine's id and
/// the workspace's serial).
const PASS_LONE_DECODE: u64 = 0x4c4f_4e45;
/// The graph key of a lone sequence's speculative round (likewise).
const PASS_LONE_ROUND: u64 = 0x524f_554e;

impl BatchEngine<'_> {
    /// The speculative round of a lone sequence (running `i`, `n` rows: its
    /// pending token and drafts, its blocks in order) as one repeating pass
    /// with each row's argmax taken on the backend (a CUDA graph replay once
    /// warm), as `Session::verify` runs it: the logits come back only when
    /// the acceptance rule needs them (sampling, a penalty) or the
    /// observer reads them.
    pub(super) fn lone_round(
        &mut self,
        i: usize,
        n: usize,
        serial: u64,
        ws_key: (usize, usize),
        events: &mut Vec<Event>,
        done: &mut Vec<usize>,
    ) -> Result<()> {
        let (model, be, vocab, room) = (self.model, self.be, self.model.cfg.vocab_size, self.room());
        let nl = ws_key.1;
        let am = match self.argmax.entry(nl) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(be.zeros(&[nl], fusebox_core::DType::I32)?),
        };
        let ws = &mut self.workspaces.get_mut(&ws_key).expect("the pass's workspace").1;
        let key = splitmix64(splitmix64(self.id ^ splitmix64(serial)) ^ PASS_LONE_ROUND);
        let cache = &mut self.cache;
        be.run_graph(key, &mut || {
            model.forward(be, ws, cache)?;
            be.argmax(&ws.logits, am)
        })?;
        be.read_i32(am, &mut self.argmax_host)?;
        let s = &mut self.running[i];
        let sp = s.spec.as_ref().expect("a speculating sequence");
        let logits = !sp.argmax_only() || s.observer.as_ref().is_some_and(|o| o.needs_logits());
        let rows: &[f32] = if logits {
            be.read_f32(&ws.logits, &mut self.logits)?;
            &self.logits[..n * vocab]
        } else {
            &[]
        };
        let taps = ws.taps().filter(|_| sp.taps()).map(|t| (t, 0));
        let argmax = Some(&self.argmax_host[..n]);
        round(s, i, (rows, argmax), taps, vocab, room, &mut self.spec_totals, events, done)
    }

    /// The decode step of a lone sequence (running `i`, one row, its blocks
    /// in order) as one repeating pass, the forward and the draw on the
    /// backend (a CUDA graph replay once warm), as a `Session` decodes:
    /// only the token comes back, and the logits when its observer reads
    /// them. The draw is the one the host sampler would make (the same
    /// stream and history).
    pub(super) fn lone_decode(
        &mut self,
        i: usize,
        serial: u64,
        events: &mut Vec<Event>,
        done: &mut Vec<usize>,
    ) -> Result<()> {
        let (model, be, vocab, room) = (self.model, self.be, self.model.cfg.vocab_size, self.room());
        let s = &mut self.running[i];
        let lone = match &mut self.lone {
            Some(l) => l,
            none => {
                none.insert(LoneDraw { dev: DeviceSampler::new(be, self.opts.max_len + 1)?, owner: s.id, synced: None })
            }
        };
        if lone.owner != s.id || lone.synced.is_none() {
            lone.dev.set_params(be, &s.sampler.params, s.sampler.draws())?;
            lone.owner = s.id;
            lone.synced = None;
        }
        if lone.synced != Some((s.id, s.tokens.len())) {
            lone.dev.draws = s.sampler.draws();
            lone.dev.write_history(be, &s.tokens, None)?;
        }
        let ws = &mut self.workspaces.get_mut(&(1, 1)).expect("the pass's workspace").1;
        let key = splitmix64(splitmix64(self.id ^ splitmix64(serial)) ^ PASS_LONE_DECODE);
        let (cache, dev) = (&mut self.cache, &mut lone.dev);
        // the parity check's reference: the step on the graph path (it writes the KV row the real step
        // then writes again)
        let reference = match self.parity {
            Some(_) => {
                be.force_graph_path(true);
                let r = be.run(&mut || model.forward(be, ws, cache));
                be.force_graph_path(false);
                r?;
                let mut v = vec![];
                be.read_f32(&ws.logits, &mut v)?;
                Some(v)
            }
            None => None,
        };
        be.run_graph(key, &mut || {
            model.forward(be, ws, cache)?;
            dev.sample(be, &ws.logits)
        })?;
        if let (Some(r), Some(p)) = (reference, self.parity.as_mut()) {
            be.read_f32(&ws.logits, &mut self.logits)?;
            p.record(&self.logits[..vocab], &r);
        }
        let tok = lone.dev.take_token(be, vocab)?;
        s.sampler.skip();
        s.computed += 1;
        lone.synced = Some((s.id, s.tokens.len() + 1));
        let raw: &[f32] = if s.observer.as_ref().is_some_and(|o| o.needs_logits()) {
            be.read_f32(&ws.logits, &mut self.logits)?;
            &self.logits[..vocab]
        } else {
            &[]
        };
        record(s, i, tok, raw, room, events, done);
        Ok(())
    }
}
