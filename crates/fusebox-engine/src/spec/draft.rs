//! A draft model: any model fusebox loads, sharing the target's tokenizer,
//! drafting with its own KV cache. Before each proposal the draft's cache
//! is cut back to the longest prefix it shares with the committed context
//! and the rest is run, so it stays in step with whatever was accepted.
//!
//! At temperature 0 the draft decodes greedily on the device (one token
//! read back per step); otherwise it samples from its own distribution `q`
//! under the target's settings and hands `q` to the rejection rule.

use anyhow::{ensure, Result};
use fusebox_core::dtype::random_bits;
use fusebox_core::sample::{probabilities, SamplingParams, Scratch};
use fusebox_core::Backend;
use fusebox_models::Model;

use super::proposer::{draw, Draft, ProposeCtx, Proposer};
use super::MAX_SPEC_K;
use crate::generate::Session;
use crate::verify::MAX_VERIFY_ROWS;

/// Separates the draft's sampling stream from the target's, for one seed.
const STREAM: u64 = 0x4452_4146_5453_414d;

/// A probe whose ids two tokenizers must agree on (words, digits, spaces,
/// punctuation and non-Latin script).
const PROBE: &str =
    "Speculative decoding: the quick brown fox jumps over 13 lazy dogs, then naïve café 你好 .\n\tdone!";

pub struct DraftModel<'m> {
    session: Session<'m>,
    /// The settings of the last proposal (the draft's sampler is set when they change).
    params: Option<SamplingParams>,
    scratch: Scratch,
    history: Vec<i32>,
    logits: Vec<f32>,
    seed: u64,
    counter: u64,
}

/// Check that `draft` can draft for `target`: the same vocabulary size (the
/// width of the logits; a GGUF file's token list may be padded to it) and
/// the same ids for a probe string.
pub fn check_compatible(target: &Model, draft: &Model) -> Result<()> {
    let (tv, dv) = (target.config().vocab_size, draft.config().vocab_size);
    ensure!(
        tv == dv,
        "the draft model {} has a vocabulary of {dv} tokens but the target {} has {tv}: a draft must share the target's tokenizer",
        draft.path.display(),
        target.path.display()
    );
    let (a, b) = (target.tokenizer.encode(PROBE, false)?, draft.tokenizer.encode(PROBE, false)?);
    ensure!(
        a == b,
        "the draft model {} tokenizes the probe {PROBE:?} differently from the target {} ({b:?} vs {a:?}): a draft must share the target's tokenizer",
        draft.path.display(),
        target.path.display()
    );
    Ok(())
}

impl<'m> DraftModel<'m> {
    /// A draft for `target`, on `be`, for contexts of up to `capacity` tokens.
    pub fn new(target: &Model, draft: &'m Model, be: &'m dyn Backend, capacity: usize) -> Result<DraftModel<'m>> {
        check_compatible(target, draft)?;
        Ok(DraftModel {
            session: Session::new(&draft.decoder, be, capacity + MAX_SPEC_K + 1)?,
            params: None,
            scratch: Scratch::default(),
            history: Vec::new(),
            logits: Vec::new(),
            seed: 0,
            counter: 0,
        })
    }

    fn set_params(&mut self, p: &SamplingParams) -> Result<()> {
        if self.params.as_ref() != Some(p) {
            let mut own = p.clone();
            if p.is_greedy() {
                own.temperature = 0.0;
            }
            self.session.set_sampling(&own)?;
            self.seed = p.seed ^ STREAM;
            self.counter = 0;
            self.params = Some(p.clone());
        }
        Ok(())
    }

    fn uniform(&mut self) -> f64 {
        let u = (random_bits(self.seed, self.counter) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        self.counter += 1;
        u
    }
}

impl Proposer for DraftModel<'_> {
    fn name(&self) -> &'static str {
        "draft"
    }

    fn propose(&mut self, ctx: &ProposeCtx<'_>, k: usize, draft: &mut Draft) -> Result<()> {
        let t = ctx.tokens;
        if k == 0 || t.is_empty() {
            return Ok(());
        }
        self.set_params(ctx.sampling)?;
        // keep what the draft shares with the context; run at least the last token
        let c = self.session.common_prefix(t).min(t.len() - 1);
        self.session.truncate(c);
        let room = self.session.capacity() - c;
        ensure!(room > t.len() - c, "the draft model's context ({} tokens) is full", self.session.capacity());
        let k = k.min(room - (t.len() - c));
        let feed = &t[c..];
        if ctx.sampling.is_greedy() {
            // a short feed (the usual one: the bonus token, perhaps the last
            // draft) through a cached verify pass, a long one (the prompt) as a prefill
            let mut tok = if feed.len() > 1 && feed.len() <= MAX_VERIFY_ROWS {
                *self.session.verify(feed)?.last().expect("one row per token") as u32
            } else {
                self.session.advance(feed)?
            };
            for i in 0..k {
                draft.tokens.push(tok);
                if i + 1 < k {
                    tok = self.session.decode(tok)?;
                }
            }
            return Ok(());
        }
        let block = ctx.sampling.encode();
        self.history.clear();
        self.history.extend(t.iter().map(|&x| x as i32));
        let mut logits = std::mem::take(&mut self.logits);
        logits.clear();
        if feed.len() > 1 && feed.len() <= MAX_VERIFY_ROWS {
            self.session.verify(feed)?;
            let rows = self.session.verify_logits()?;
            logits.extend_from_slice(&rows[rows.len() / feed.len() * (feed.len() - 1)..]);
        } else {
            logits.extend_from_slice(self.session.prefill(feed)?);
        }
        for i in 0..k {
            let q = draft.next_q();
            probabilities(&logits, &block, &self.history, &mut self.scratch, q);
            let x = draw(q, self.uniform());
            draft.tokens.push(x);
            self.history.push(x as i32);
            if i + 1 < k {
                logits.clear();
                logits.extend_from_slice(self.session.step(x)?);
            }
        }
        self.logits = logits;
        Ok(())
    }
}
