//! The one interface every draft source implements.
//!
//! A round of speculative decoding asks a [`Proposer`] for up to `k` tokens
//! to follow the committed context, scores them all with the target in one
//! verify pass, and tells the proposer how many were accepted. Prompt lookup
//! needs only the tokens; a draft model keeps its own KV cache in step; a
//! draft conditioned on the target's hidden states (DFlash) names the target
//! layers it reads with [`Proposer::target_layers`] and is shown them for
//! every committed position through [`Proposer::observe`].

use anyhow::Result;
use fusebox_core::sample::SamplingParams;
use fusebox_core::Tensor;

/// What a proposer sees when asked for drafts.
pub struct ProposeCtx<'a> {
    /// The committed context: everything in the target's KV cache, then the
    /// pending token (the last one, drawn but not yet run by the target).
    pub tokens: &'a [u32],
    /// The sampling settings of the target, which the rejection rule applies
    /// to the draft's distribution too.
    pub sampling: &'a SamplingParams,
}

/// A proposal: the drafted tokens and, when the draft sampled them, the
/// distribution each was drawn from. Its buffers are kept from round to
/// round, so proposing allocates nothing once warm.
#[derive(Clone, Debug, Default)]
pub struct Draft {
    pub tokens: Vec<u32>,
    /// `q[i]` (for `i < q_rows`) is the draft's distribution over the
    /// vocabulary for `tokens[i]`; rows past `q_rows` are spare buffers.
    q: Vec<Vec<f32>>,
    q_rows: usize,
}

impl Draft {
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.q_rows = 0;
    }

    /// Keep the first `k` tokens (and their distributions).
    pub fn truncate(&mut self, k: usize) {
        self.tokens.truncate(k);
        self.q_rows = self.q_rows.min(k);
    }

    /// A buffer for the distribution of the next token a sampling draft
    /// pushes (call it once per token, before pushing the token).
    pub fn next_q(&mut self) -> &mut Vec<f32> {
        if self.q.len() == self.q_rows {
            self.q.push(Vec::new());
        }
        self.q_rows += 1;
        &mut self.q[self.q_rows - 1]
    }

    /// The draft's probability of `token` at row `i`: from its distribution
    /// when it sampled, else 1 for the drafted token (a point mass, as
    /// prompt lookup and greedy drafts are).
    pub fn q_of(&self, i: usize, token: u32) -> f32 {
        if i < self.q_rows {
            self.q[i].get(token as usize).copied().unwrap_or(0.0)
        } else {
            (self.tokens.get(i) == Some(&token)) as u32 as f32
        }
    }
}

/// The token a uniform draw `u` in `[0, 1)` picks from the (unnormalised)
/// distribution `q`: the first id whose cumulative mass passes `u` times
/// the total.
pub(crate) fn draw(q: &[f32], u: f64) -> u32 {
    let r = u * q.iter().map(|&x| x as f64).sum::<f64>();
    let (mut cum, mut x) = (0f64, 0u32);
    for (id, &pq) in q.iter().enumerate() {
        if pq > 0.0 {
            cum += pq as f64;
            x = id as u32;
            if cum > r {
                break;
            }
        }
    }
    x
}

/// A source of draft tokens.
pub trait Proposer: Send {
    /// The method's name in reports (`ngram`, `draft`).
    fn name(&self) -> &'static str;

    /// Append up to `k` drafted tokens to follow `ctx.tokens` to `draft`
    /// (cleared by the caller); none is a valid answer.
    fn propose(&mut self, ctx: &ProposeCtx<'_>, k: usize, draft: &mut Draft) -> Result<()>;

    /// The target accepted the first `accepted` tokens of the last
    /// proposal; `committed` is the committed context now (its last token
    /// is the new pending one).
    fn accepted(&mut self, committed: &[u32], accepted: usize) -> Result<()> {
        let _ = (committed, accepted);
        Ok(())
    }

    /// The target layers whose hidden states this proposer reads (none by
    /// default).
    fn target_layers(&self) -> &[usize] {
        &[]
    }

    /// The target ran positions `first..first + rows` of the committed
    /// context; rows `row0..row0 + rows` of `taps` (`[m, layers * hidden]`
    /// on the target's backend; a batched pass holds other sequences' rows
    /// too) are its outputs at [`Proposer::target_layers`].
    /// Called after each prompt chunk and after each verify pass (for the
    /// pending token and the accepted drafts), only for a proposer that
    /// names target layers.
    fn observe(&mut self, taps: &Tensor, row0: usize, first: usize, rows: usize) -> Result<()> {
        let _ = (taps, row0, first, rows);
        Ok(())
    }
}

/// A borrowed proposer proposes (a caller that keeps its proposer lends it
/// to a generation).
impl<P: Proposer + ?Sized> Proposer for &mut P {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn propose(&mut self, ctx: &ProposeCtx<'_>, k: usize, draft: &mut Draft) -> Result<()> {
        (**self).propose(ctx, k, draft)
    }
    fn accepted(&mut self, committed: &[u32], accepted: usize) -> Result<()> {
        (**self).accepted(committed, accepted)
    }
    fn target_layers(&self) -> &[usize] {
        (**self).target_layers()
    }
    fn observe(&mut self, taps: &Tensor, row0: usize, first: usize, rows: usize) -> Result<()> {
        (**self).observe(taps, row0, first, rows)
    }
}
