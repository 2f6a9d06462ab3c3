//! Speculative decoding inside a [`crate::BatchEngine`]: a decoding
//! sequence with a proposer runs its pending token and up to `k` drafts as
//! rows of the step's pass (every row's logits kept), then the acceptance
//! rule of [`crate::spec`] keeps the drafts the target agrees with and adds
//! its own token, and the sequence's cache position moves past the accepted
//! ones only (the rejected drafts' keys and values are overwritten later).
//! So a round costs the rows it scores in a pass shared with every other
//! sequence, and greedy output is plain greedy's, token for token.

use std::time::Instant;

use anyhow::{bail, ensure, Result};
use fusebox_core::sample::SamplingParams;
use fusebox_core::Tensor;

use crate::spec::accept::Acceptor;
use crate::spec::{Draft, ProposeCtx, Proposer, Round, SpecOptions, SpecStats, Speculation, MAX_SPEC_K};

/// One sequence's speculation.
pub(crate) struct SeqSpec<'m> {
    proposer: Box<dyn Proposer + 'm>,
    k: usize,
    acceptor: Acceptor,
    /// The drafts of the round in flight (rows after the pending token).
    pub(crate) draft: Draft,
    pub(crate) stats: SpecStats,
    argmax: Vec<i32>,
}

impl<'m> SeqSpec<'m> {
    pub(crate) fn new(spec: Speculation<'m>, sampling: &SamplingParams) -> Result<SeqSpec<'m>> {
        let k = spec.options.k;
        ensure!((1..=MAX_SPEC_K).contains(&k), "--spec-k must be between 1 and {MAX_SPEC_K}, got {k}");
        Ok(SeqSpec {
            stats: SpecStats::new(spec.proposer.name(), k, spec.options.trace),
            proposer: spec.proposer,
            k,
            acceptor: Acceptor::new(sampling),
            draft: Draft::default(),
            argmax: Vec::new(),
        })
    }

    /// Drafts a round may propose with `limit` rows of room after the
    /// pending token (the budget, the cache, the tokens still wanted).
    pub(crate) fn k(&self, limit: usize) -> usize {
        self.k.min(limit)
    }

    /// Draft up to `k` tokens after `tokens` (the committed context, ending
    /// with the pending token) into [`SeqSpec::draft`].
    pub(crate) fn propose(&mut self, tokens: &[u32], sampling: &SamplingParams, k: usize, vocab: usize) -> Result<()> {
        self.draft.clear();
        if k == 0 {
            return Ok(());
        }
        let t = Instant::now();
        self.proposer.propose(&ProposeCtx { tokens, sampling }, k, &mut self.draft)?;
        self.stats.draft_secs += t.elapsed().as_secs_f64();
        self.draft.truncate(k);
        if let Some(&bad) = self.draft.tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!(
                "the {} proposer drafted token {bad}, outside the target's vocabulary of {vocab}",
                self.proposer.name()
            );
        }
        Ok(())
    }

    /// After the pass scored the pending token and the drafts (`logits`:
    /// their rows, `[1 + drafts, vocab]`, or empty when [`SeqSpec::argmax_only`]
    /// and the backend took each row's `argmax`): the drafts accepted and
    /// the bonus token. `context` is the committed context (ending with the pending
    /// token).
    pub(crate) fn accept(
        &mut self,
        logits: &[f32],
        argmax: Option<&[i32]>,
        vocab: usize,
        context: &[u32],
    ) -> Result<(usize, u32)> {
        self.argmax.clear();
        match argmax {
            Some(am) => self.argmax.extend_from_slice(am),
            None if self.acceptor.argmax_only() => {
                self.argmax.extend(logits.chunks_exact(vocab).map(|row| crate::sampling::argmax(row) as i32))
            }
            None => {}
        }
        let (a, bonus) = self.acceptor.accept(&self.argmax, || Ok(logits), context, &self.draft)?;
        let d = &self.draft.tokens;
        self.stats.rounds += 1;
        self.stats.drafted += d.len();
        self.stats.accepted += a;
        if let Some(t) = self.stats.trace.as_mut() {
            t.push(Round { proposed: d.clone(), accepted: a });
        }
        Ok((a, bonus))
    }

    /// Whether the acceptance rule decides from each row's argmax alone.
    pub(crate) fn argmax_only(&self) -> bool {
        self.acceptor.argmax_only()
    }

    /// Whether the proposer reads target layers ([`SeqSpec::observe`]).
    pub(crate) fn taps(&self) -> bool {
        !self.proposer.target_layers().is_empty()
    }

    /// Show the proposer the target's layers at positions `first..first +
    /// rows`: rows `row0..` of `taps`.
    pub(crate) fn observe(&mut self, taps: &Tensor, row0: usize, first: usize, rows: usize) -> Result<()> {
        self.proposer.observe(taps, row0, first, rows)
    }

    /// The speculation to use again (the same proposer and `k`), and what
    /// it did.
    pub(crate) fn into_parts(self) -> (Speculation<'m>, SpecStats) {
        let options = SpecOptions { k: self.k, trace: self.stats.trace.is_some() };
        (Speculation { options, proposer: self.proposer }, self.stats)
    }

    /// Tell the proposer the round's outcome (`committed`: the context now,
    /// ending with the bonus token).
    pub(crate) fn accepted(&mut self, committed: &[u32], accepted: usize) -> Result<()> {
        self.proposer.accepted(committed, accepted)
    }
}
