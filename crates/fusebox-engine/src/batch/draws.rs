//! What a sequence's rows of a step are, and what happens when it draws:
//! the rows to plan (a prompt chunk, a decode row, a speculative round),
//! a round's acceptance, a draw's stop rules and event.

use anyhow::Result;
use fusebox_core::Tensor;

use super::{Event, Seq};
use crate::generate::StopReason;

/// The rows sequence `s` runs next within `budget`: a prompt chunk, its
/// pending token, or (speculating) its pending token and the drafts its
/// proposer makes now, as many as the budget, the cache (`room`) and the
/// tokens it still wants allow.
pub(super) fn rows_for(s: &mut Seq, budget: usize, room: usize, vocab: usize) -> Result<usize> {
    if !s.speculates() {
        return Ok(s.runnable().min(budget));
    }
    let wanted = s.max_new_tokens - (s.tokens.len() - s.prompt_len);
    let limit = (budget - 1).min(room - s.tokens.len()).min(wanted.saturating_sub(1));
    let sp = s.spec.as_mut().expect("speculates");
    sp.propose(&s.tokens, &s.sampler.params, sp.k(limit), vocab)?;
    Ok(1 + sp.draft.tokens.len())
}

/// Sequence `s` (running `i`) after its speculative round's pass: `rows`
/// are the logits of the pending token and each draft (empty when only
/// their argmax came back), with their argmax when the backend took it. The accepted drafts
/// and the bonus token join it one by one (an event each, up to the first
/// that ends it), its cache position moves past the pending token and the
/// accepted drafts, and the proposer hears the outcome.
#[allow(clippy::too_many_arguments)]
pub(super) fn round(
    s: &mut Seq,
    i: usize,
    (rows, argmax): (&[f32], Option<&[i32]>),
    taps: Option<(&Tensor, usize)>,
    vocab: usize,
    room: usize,
    totals: &mut (usize, usize, usize),
    events: &mut Vec<Event>,
    done: &mut Vec<usize>,
) -> Result<()> {
    let sp = s.spec.as_mut().expect("a speculating sequence");
    let (a, bonus) = sp.accept(rows, argmax, vocab, &s.tokens)?;
    let drafted = sp.draft.tokens.len();
    *totals = (totals.0 + 1, totals.1 + drafted, totals.2 + a);
    if let Some((t, r0)) = taps {
        sp.observe(t, r0, s.computed, a + 1)?;
    }
    s.computed += 1 + a;
    let before = done.len();
    for j in 0..=a {
        let tok = if j < a { s.spec.as_ref().expect("a speculating sequence").draft.tokens[j] } else { bonus };
        let raw = rows.get(j * vocab..(j + 1) * vocab).unwrap_or(&[]);
        record(s, i, tok, raw, room, events, done);
        if done.len() > before {
            // ended inside the round: the cache never holds more than the tokens
            s.computed = s.computed.min(s.tokens.len());
            return Ok(());
        }
    }
    let sp = s.spec.as_mut().expect("a speculating sequence");
    sp.accepted(&s.tokens, a)
}

/// After sequence `s` (running `i`) drew `tok` from `raw`: the token joins
/// it, the end is decided (a stop token, its budget, a full cache, or its
/// observer gone) and the step's event recorded.
pub(super) fn record(
    s: &mut Seq,
    i: usize,
    tok: u32,
    raw: &[f32],
    room: usize,
    events: &mut Vec<Event>,
    done: &mut Vec<usize>,
) {
    s.tokens.push(tok);
    let generated = s.tokens.len() - s.prompt_len;
    let mut finished = if s.stop_ids.contains(&tok) {
        Some(StopReason::Eos)
    } else if generated >= s.max_new_tokens {
        Some(StopReason::MaxTokens)
    } else if s.tokens.len() > room {
        // the cache is full: the last token drawn needs no room (as a Session)
        Some(StopReason::ContextFull)
    } else {
        None
    };
    if let Some(o) = s.observer.as_mut() {
        if !o.drawn(raw, tok, finished) && finished.is_none() {
            finished = Some(StopReason::Callback);
        }
    }
    events.push(Event { id: s.id, token: Some(tok), finished });
    if finished.is_some() {
        done.push(i);
    }
}
