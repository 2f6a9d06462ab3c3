//! Speculative decoding: a proposer drafts up to `k` tokens, the target
//! scores the pending token and the drafts in one pass, keeps the drafts it
//! agrees with plus one token of its own, and the cache position moves past
//! the accepted ones only. The engine runs the rounds
//! ([`crate::BatchEngine::add_with`], `batch_spec.rs`); this module holds the
//! proposers, the acceptance rule and the statistics.
//!
//! A round over context `C` with pending token `t` (drawn, not yet run):
//! drafts `d1..dn` (n <= k); scoring `[t, d1..dn]` gives `n + 1` rows; the
//! acceptance rule ([`accept`]) keeps `d1..da` and adds a bonus token `b`;
//! the cache holds `C, t, d1..da` and `b` is the next pending token. A
//! round emits `a + 1` tokens for one target pass, so greedy output is
//! plain greedy's token for token, only sooner.

pub(crate) mod accept;
pub mod dflash;
pub mod draft;
pub mod ngram;
pub mod proposer;

use serde_json::{json, Value};

pub use dflash::DFlash;
pub use draft::DraftModel;
pub use ngram::PromptLookup;
pub use proposer::{Draft, ProposeCtx, Proposer};

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

/// A proposer and how to use it: speculation as one optional argument.
pub struct Speculation<'p> {
    pub options: SpecOptions,
    pub proposer: Box<dyn Proposer + 'p>,
}
