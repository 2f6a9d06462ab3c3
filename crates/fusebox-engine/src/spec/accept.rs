//! Which drafts the target accepts, and the token it adds.
//!
//! * **Greedy** (temperature 0): the longest prefix of drafts equal to the
//!   target's choice at each row (its argmax, after the repetition penalty
//!   when there is one), then the target's choice at the first row that
//!   disagrees (or after the last draft): the bonus token. The output is
//!   plain greedy decoding's, token for token.
//! * **Sampling**: the standard rejection rule. Row `i`'s target
//!   distribution `p` and the draft's `q` are both the sampler's (temperature,
//!   top-k/p, min-p and the penalty over the context so far applied alike);
//!   draft `x` is accepted with probability `min(1, p(x) / q(x))`, else the
//!   bonus is drawn from `max(0, p - q)` normalised and the round ends; when
//!   every draft is accepted the bonus is drawn from the next row's `p`. The
//!   tokens are distributed exactly as the target's own samples.

use anyhow::Result;
use fusebox_core::dtype::random_bits;
use fusebox_core::sample::{probabilities, SamplingParams, Scratch, SAMPLE_PARAMS};

use super::proposer::Draft;

/// Separates the acceptance stream from the sampler's, for the same seed.
const STREAM: u64 = 0x5350_4543_4143_4350;

pub(crate) struct Acceptor {
    block: [f32; SAMPLE_PARAMS],
    /// Greedy with no penalty: the device argmax of each row decides.
    plain_greedy: bool,
    greedy: bool,
    seed: u64,
    counter: u64,
    scratch: Scratch,
    p: Vec<f32>,
    history: Vec<i32>,
}

impl Acceptor {
    pub fn new(params: &SamplingParams) -> Acceptor {
        Acceptor {
            block: params.encode(),
            plain_greedy: params.is_greedy() && params.repeat_penalty == 1.0,
            greedy: params.is_greedy(),
            seed: params.seed ^ STREAM,
            counter: 0,
            scratch: Scratch::default(),
            p: Vec::new(),
            history: Vec::new(),
        }
    }

    /// A uniform draw in `[0, 1)` from the acceptance stream.
    fn uniform(&mut self) -> f64 {
        let u = (random_bits(self.seed, self.counter) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        self.counter += 1;
        u
    }

    /// A draw from `w` (non-negative weights summing to `total > 0`).
    fn draw(&mut self, w: &[f32], total: f64) -> u32 {
        let r = self.uniform() * total;
        let mut cum = 0f64;
        let mut last = 0;
        for (i, &x) in w.iter().enumerate() {
            if x > 0.0 {
                cum += x as f64;
                last = i;
                if cum > r {
                    return i as u32;
                }
            }
        }
        last as u32
    }

    fn draw_all(&mut self, p: &[f32]) -> u32 {
        let total: f64 = p.iter().map(|&x| x as f64).sum();
        self.draw(p, total)
    }

    /// Whether [`Acceptor::accept`] decides from each row's argmax alone
    /// (greedy with no penalty), never reading the logits.
    pub fn argmax_only(&self) -> bool {
        self.plain_greedy
    }

    /// After a verify pass over `[pending, draft.tokens..]` with `argmax`
    /// its rows' argmax (read only when [`Acceptor::argmax_only`]) and
    /// `logits` giving its rows' logits (`[rows, vocab]`, called only when
    /// not): how many drafts are accepted, and the bonus token. `context`
    /// is the committed context (ending with the pending token).
    pub fn accept<'l>(
        &mut self,
        argmax: &[i32],
        logits: impl FnOnce() -> Result<&'l [f32]>,
        context: &[u32],
        draft: &Draft,
    ) -> Result<(usize, u32)> {
        let d = &draft.tokens;
        if self.plain_greedy {
            let a = d.iter().zip(argmax).take_while(|(t, m)| **t as i32 == **m).count();
            return Ok((a, argmax[a] as u32));
        }
        let logits = logits()?;
        let vocab = logits.len() / (d.len() + 1);
        self.history.clear();
        self.history.extend(context.iter().map(|&t| t as i32));
        let mut p = std::mem::take(&mut self.p);
        let mut out = None;
        for i in 0..=d.len() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            probabilities(row, &self.block, &self.history, &mut self.scratch, &mut p);
            if self.greedy {
                let target = fusebox_core::sample::argmax(&p) as u32;
                if i == d.len() || d[i] != target {
                    out = Some((i, target));
                    break;
                }
            } else if i == d.len() {
                out = Some((i, self.draw_all(&p)));
                break;
            } else {
                let x = d[i];
                let (px, qx) = (p.get(x as usize).copied().unwrap_or(0.0), draft.q_of(i, x));
                // accept with probability min(1, p/q)
                if !(qx > 0.0 && self.uniform() * (qx as f64) < px as f64) {
                    // the residual max(0, p - q)
                    let mut total = 0f64;
                    for (t, pt) in p.iter_mut().enumerate() {
                        *pt = (*pt - draft.q_of(i, t as u32)).max(0.0);
                        total += *pt as f64;
                    }
                    let bonus = if total > 0.0 {
                        self.draw(&p, total)
                    } else {
                        // p == q up to rounding: p itself
                        let row = &logits[i * vocab..(i + 1) * vocab];
                        probabilities(row, &self.block, &self.history, &mut self.scratch, &mut p);
                        self.draw_all(&p)
                    };
                    out = Some((i, bonus));
                    break;
                }
            }
            self.history.push(d[i] as i32);
        }
        self.p = p;
        Ok(out.expect("the last row always ends the loop"))
    }
}
