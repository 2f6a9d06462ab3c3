//! Log-probabilities of one step: the log-softmax of the raw logits (before
//! temperature, penalties and filters, as OpenAI and vLLM report them by
//! default), for the drawn token and the most likely ones.

use crate::engine::TokenLogprobs;

/// The log-softmax normaliser of a step's logits and its most likely tokens.
#[derive(Debug)]
pub struct StepScores {
    /// `log(sum(exp(logits)))`.
    lse: f64,
    top: Vec<(u32, f32)>,
}

impl StepScores {
    /// Score `logits`, keeping the `k` most likely tokens (the lower id
    /// first on ties; NaN logits count as impossible).
    pub fn new(logits: &[f32], k: usize) -> StepScores {
        let max = logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        let lse = if max.is_finite() {
            let sum: f64 = logits.iter().filter(|l| !l.is_nan()).map(|&l| ((l - max) as f64).exp()).sum();
            max as f64 + sum.ln()
        } else {
            max as f64
        };
        StepScores { lse, top: top_k(logits, k) }
    }

    /// The log-probability of a token whose logit is `logit`.
    pub fn logprob(&self, logit: f32) -> f32 {
        if logit.is_nan() {
            return f32::NEG_INFINITY;
        }
        (logit as f64 - self.lse) as f32
    }

    /// What is reported for `id`, drawn from `logits` (the ones scored).
    pub fn token(&self, logits: &[f32], id: u32) -> TokenLogprobs {
        let logit = logits.get(id as usize).copied().unwrap_or(f32::NAN);
        TokenLogprobs {
            logprob: self.logprob(logit),
            top: self.top.iter().map(|&(t, l)| (t, self.logprob(l))).collect(),
        }
    }
}

/// The `k` largest logits as `(id, logit)`, largest first.
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return top;
    }
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || (top.len() == k && l <= top[k - 1].1) {
            continue;
        }
        let at = top.partition_point(|&(_, t)| t >= l);
        top.insert(at, (i as u32, l));
        top.truncate(k);
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_the_most_likely() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NAN];
        let s = StepScores::new(&logits, 3);
        let z: f64 = [1.0f64, 3.0, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        let t = s.token(&logits, 2);
        assert!((t.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6, "{t:?}");
        let ids: Vec<u32> = t.top.iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert_eq!(t.top[0].1, t.top[1].1);
        let total: f64 = (0..4).map(|i| (s.token(&logits, i).logprob as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(s.token(&logits, 4).logprob, f32::NEG_INFINITY);
        assert!(StepScores::new(&logits, 0).token(&logits, 1).top.is_empty());
        // more asked for than there are
        assert_eq!(StepScores::new(&[0.5, 0.25], 5).top.len(), 2);
    }
}
