//! Speculative decoding: a proposer drafts up to `k` tokens, the target
//! scores the pending token and the drafts in one verify pass
//! ([`Session::verify`]), keeps the drafts it agrees with plus one token of
//! its own, and the KV cache rolls back past the rest.
//!
//! A round over context `C` with pending token `t` (drawn, not yet run):
//! drafts `d1..dn` (n <= k); verify `[t, d1..dn]` gives `n + 1` rows; the
//! acceptance rule ([`accept`]) keeps `d1..da` and adds a bonus token `b`;
//! the cache is cut back to `C, t, d1..da` and `b` is the next pending token.
//! A round emits `a + 1` tokens for one target pass, so greedy output is
//! plain greedy's token for token, only sooner.

pub(crate) mod accept;
pub mod dflash;
pub mod draft;
pub mod ngram;
pub mod proposer;

use std::time::Instant;

use anyhow::{bail, ensure, Result};
use fusebox_core::sample::SamplingParams;
use serde_json::{json, Value};

pub use dflash::DFlash;
pub use draft::DraftModel;
pub use ngram::PromptLookup;
pub use proposer::{Draft, ProposeCtx, Proposer};

use crate::generate::{GenerateOptions, GenerateOutput, Session, StopReason};
use crate::verify::MAX_VERIFY_ROWS;

/// The most drafts one round may propose.
pub const MAX_SPEC_K: usize = MAX_VERIFY_ROWS - 1;

/// One round, as `--spec-trace` records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Round {
    pub proposed: Vec<u32>,
    pub accepted: usize,
}

/// What speculation did over one generation.
#[derive(Clone, Debug)]
pub struct SpecStats {
    pub method: &'static str,
    pub k: usize,
    /// Verify passes (a round with no drafts is a one-row pass).
    pub rounds: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// Wall time spent drafting (the proposer's `propose` calls), seconds.
    pub draft_secs: f64,
    /// Every round in order, when tracing.
    pub trace: Option<Vec<Round>>,
}

impl SpecStats {
    pub(crate) fn new(method: &'static str, k: usize, trace: bool) -> SpecStats {
        SpecStats { method, k, rounds: 0, drafted: 0, accepted: 0, draft_secs: 0.0, trace: trace.then(Vec::new) }
    }

    /// Drafts accepted per round.
    pub fn mean_accepted(&self) -> f64 {
        self.accepted as f64 / self.rounds.max(1) as f64
    }

    /// Accepted drafts over proposed ones.
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// `{"method", "k", "rounds", "drafted", "accepted", "mean_accepted"}`;
    /// with tracing, `rounds` is the list of rounds.
    pub fn to_json(&self) -> Value {
        let rounds = match &self.trace {
            Some(t) => t.iter().map(|r| json!({"proposed": r.proposed, "accepted": r.accepted})).collect(),
            None => json!(self.rounds),
        };
        json!({
            "method": self.method, "k": self.k, "rounds": rounds, "drafted": self.drafted,
            "accepted": self.accepted, "mean_accepted": self.mean_accepted(), "draft_secs": self.draft_secs,
        })
    }

    /// One line for stderr.
    pub fn summary(&self) -> String {
        format!(
            "spec: {} k={} | {} rounds, {} drafted, {} accepted ({:.1}%), {:.2} accepted per round",
            self.method,
            self.k,
            self.rounds,
            self.drafted,
            self.accepted,
            100.0 * self.acceptance_rate(),
            self.mean_accepted()
        )
    }
}

/// How to speculate.
#[derive(Clone, Copy, Debug)]
pub struct SpecOptions {
    /// Drafts per round at most (1 to [`MAX_SPEC_K`]).
    pub k: usize,
    /// Record every round ([`SpecStats::trace`]).
    pub trace: bool,
}

/// Buffers reused round after round.
#[derive(Default)]
struct RoundBufs {
    committed: Vec<u32>,
    rows: Vec<u32>,
    argmax: Vec<i32>,
    draft: Draft,
    /// Wall time of the proposals so far.
    draft_secs: f64,
}

/// What one round did ([`Session::speculative_round`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundOutcome {
    pub proposed: Vec<u32>,
    pub accepted: usize,
    /// The target's own token after the accepted drafts (the next pending one).
    pub bonus: u32,
}

impl Session<'_> {
    /// One round after the context with `pending` drawn but not yet run:
    /// draft up to `k` tokens, verify, accept, roll back. The cache then
    /// holds the context, `pending` and the accepted drafts. Returns the
    /// number accepted and the bonus token.
    fn round(
        &mut self,
        pending: u32,
        k: usize,
        sampling: &SamplingParams,
        proposer: &mut dyn Proposer,
        acceptor: &mut accept::Acceptor,
        b: &mut RoundBufs,
    ) -> Result<(usize, u32)> {
        b.committed.clear();
        b.committed.extend_from_slice(&self.tokens);
        b.committed.push(pending);
        b.draft.clear();
        if k > 0 {
            let ctx = ProposeCtx { tokens: &b.committed, sampling };
            let t = Instant::now();
            proposer.propose(&ctx, k, &mut b.draft)?;
            b.draft_secs += t.elapsed().as_secs_f64();
            b.draft.truncate(k);
        }
        let vocab = self.model.cfg.vocab_size;
        if let Some(&bad) = b.draft.tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("the {} proposer drafted token {bad}, outside the target's vocabulary of {vocab}", proposer.name());
        }
        b.rows.clear();
        b.rows.push(pending);
        b.rows.extend_from_slice(&b.draft.tokens);
        let base = self.kv.len;
        b.argmax.clear();
        b.argmax.extend_from_slice(self.verify(&b.rows)?);
        let (a, bonus) = acceptor.accept(&b.argmax, || self.verify_logits(), &b.committed, &b.draft)?;
        self.truncate(base + 1 + a);
        if let Some(taps) = self.verify_taps() {
            proposer.observe(taps, 0, base, a + 1)?;
        }
        b.committed.extend_from_slice(&b.draft.tokens[..a]);
        b.committed.push(bonus);
        proposer.accepted(&b.committed, a)?;
        Ok((a, bonus))
    }

    /// One speculative round on its own (for tests and tools): `pending`
    /// follows the context, drawn but not yet run. The acceptance stream
    /// starts afresh from `sampling.seed`.
    pub fn speculative_round(
        &mut self,
        pending: u32,
        k: usize,
        sampling: &SamplingParams,
        proposer: &mut dyn Proposer,
    ) -> Result<RoundOutcome> {
        ensure!((1..=MAX_SPEC_K).contains(&k), "--spec-k must be between 1 and {MAX_SPEC_K}, got {k}");
        self.check_room(k + 1)?;
        let mut b = RoundBufs::default();
        let (accepted, bonus) =
            self.round(pending, k, sampling, proposer, &mut accept::Acceptor::new(sampling), &mut b)?;
        Ok(RoundOutcome { proposed: b.draft.tokens, accepted, bonus })
    }

    /// [`Session::generate`] with speculative decoding: the same tokens at
    /// temperature 0, the same distribution otherwise, fewer target passes
    /// when the proposer's drafts are accepted.
    pub fn generate_speculative(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        spec: &SpecOptions,
        proposer: &mut dyn Proposer,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<(GenerateOutput, SpecStats)> {
        ensure!((1..=MAX_SPEC_K).contains(&spec.k), "--spec-k must be between 1 and {MAX_SPEC_K}, got {}", spec.k);
        let mut stats = SpecStats::new(proposer.name(), spec.k, spec.trace);
        self.set_tap_layers(proposer.target_layers());
        let observer = (!proposer.target_layers().is_empty()).then_some(&mut *proposer);
        let (mut out, first) = self.start(prompt, opts, observer)?;
        let Some(mut pending) = first else { return Ok((out, stats)) };
        let t1 = Instant::now();
        let start = self.kv.len; // the context before the first new token
        let mut acceptor = accept::Acceptor::new(&opts.sampling);
        let mut bufs = RoundBufs::default();
        // sized once, so rounds allocate nothing
        bufs.committed.reserve(self.capacity() + MAX_VERIFY_ROWS);
        bufs.rows.reserve(MAX_VERIFY_ROWS);
        bufs.argmax.reserve(MAX_VERIFY_ROWS);
        bufs.draft.tokens.reserve(MAX_VERIFY_ROWS);
        let mut stop = out.emit(pending, opts, self.kv.remaining() == 0, &mut on_token)?;
        while stop.is_none() {
            // room for the pending token and the drafts, and no drafts past the
            // last token wanted (the bonus is always one more)
            let k = spec.k.min(self.kv.remaining() - 1).min(opts.max_new_tokens - out.tokens.len() - 1);
            let (a, bonus) = self.round(pending, k, &opts.sampling, proposer, &mut acceptor, &mut bufs)?;
            let draft = &bufs.draft;
            stats.rounds += 1;
            stats.drafted += draft.tokens.len();
            stats.accepted += a;
            if let Some(t) = stats.trace.as_mut() {
                t.push(Round { proposed: draft.tokens.clone(), accepted: a });
            }
            for &tok in draft.tokens[..a].iter().chain(std::iter::once(&bonus)) {
                out.decode_steps += 1;
                // plain decoding would have run every emitted token but the
                // last: the context is full when that leaves no room
                let full = start + out.tokens.len() + 1 > self.capacity();
                stop = out.emit(tok, opts, full, &mut on_token)?;
                if stop.is_some() {
                    break;
                }
            }
            pending = bonus;
        }
        let stop = stop.expect("the loop ends on a stop");
        // leave the cache as plain decoding would: every emitted token run
        // but the last (and after a stop token, every emitted token)
        let keep = out.tokens.len() - usize::from(stop != StopReason::Eos);
        self.truncate(start + keep);
        out.stop = stop;
        out.decode_secs = t1.elapsed().as_secs_f64();
        stats.draft_secs = bufs.draft_secs;
        Ok((out, stats))
    }
}

/// A proposer and how to use it: speculation as one optional argument.
pub struct Speculation<'p> {
    pub options: SpecOptions,
    pub proposer: Box<dyn Proposer + 'p>,
}

impl Session<'_> {
    /// [`Session::generate`], or [`Session::generate_speculative`] when
    /// `spec` is given.
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        spec: Option<&mut Speculation<'_>>,
        on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<(GenerateOutput, Option<SpecStats>)> {
        match spec {
            None => Ok((self.generate(prompt, opts, on_token)?, None)),
            Some(s) => {
                let (out, stats) = self.generate_speculative(prompt, opts, &s.options, &mut *s.proposer, on_token)?;
                Ok((out, Some(stats)))
            }
        }
    }
}
