//! Prompt lookup: draft the continuation of the latest earlier occurrence of
//! the context's last `n` tokens (`n` from `max_n` down to 1), found in the
//! prompt and the output so far. No weights; strong when the answer copies
//! from the prompt (editing, summarising, code). A continuation that runs
//! into the end of the context is a loop (the match is one period back), so
//! it goes on repeating that period up to `k` tokens.

use anyhow::{ensure, Result};

use super::proposer::{Draft, ProposeCtx, Proposer};

pub struct PromptLookup {
    max_n: usize,
}

impl PromptLookup {
    /// Match suffixes of up to `max_n` tokens (at least 1).
    pub fn new(max_n: usize) -> Result<PromptLookup> {
        ensure!(max_n >= 1, "--spec-ngram-max must be at least 1, got {max_n}");
        Ok(PromptLookup { max_n })
    }
}

/// Append to `out` the continuation (up to `k` tokens) of the latest earlier
/// occurrence of the last `n` tokens of `t`, trying `n = max_n` down to 1;
/// a continuation cut by the end of `t` repeats its period.
pub fn lookup(t: &[u32], max_n: usize, k: usize, out: &mut Vec<u32>) {
    for n in (1..=max_n.min(t.len().saturating_sub(1))).rev() {
        let pat = &t[t.len() - n..];
        // the latest start before the suffix itself
        if let Some(s) = (0..t.len() - n).rev().find(|&s| &t[s..s + n] == pat) {
            let cont = &t[s + n..];
            out.extend((0..k).map(|i| cont[i % cont.len()]));
            return;
        }
    }
}

impl Proposer for PromptLookup {
    fn name(&self) -> &'static str {
        "ngram"
    }

    fn propose(&mut self, ctx: &ProposeCtx<'_>, k: usize, draft: &mut Draft) -> Result<()> {
        lookup(ctx.tokens, self.max_n, k, &mut draft.tokens);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    fn lookup(t: &[u32], max_n: usize, k: usize) -> Vec<u32> {
        let mut out = vec![];
        super::lookup(t, max_n, k, &mut out);
        out
    }

    #[test]
    fn latest_longest_match() {
        //            0  1  2  3  4  5  6  7  8  9
        let t = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2];
        // suffix [1, 2] last occurs at 4 (before the suffix at 8): continuation 3, 7, 1, 2
        assert_eq!(lookup(&t, 2, 3), [3, 7, 1]);
        // ... which reaches the end: the period 3, 7, 1, 2 repeats
        assert_eq!(lookup(&t, 2, 10), [3, 7, 1, 2, 3, 7, 1, 2, 3, 7]);
        // a 3-gram [7, 1, 2] has no earlier match, so n falls to 2
        assert_eq!(lookup(&t, 3, 2), [3, 7]);
        // no match at any n
        assert_eq!(lookup(&[5, 6, 7], 3, 4), [0u32; 0]);
        // n = 1
        assert_eq!(lookup(&[4, 8, 5, 4], 3, 2), [8, 5]);
        assert_eq!(lookup(&[], 3, 2), [0u32; 0]);
        assert_eq!(lookup(&[4], 3, 2), [0u32; 0]);
    }

    #[test]
    fn a_loop_is_drafted_k_deep() {
        // one token repeating: the latest match is the token before, period 1
        assert_eq!(lookup(&[5, 9, 9, 9], 3, 4), [9, 9, 9, 9]);
        // period 2
        assert_eq!(lookup(&[1, 2, 1, 2, 1, 2], 2, 5), [1, 2, 1, 2, 1]);
    }
}
