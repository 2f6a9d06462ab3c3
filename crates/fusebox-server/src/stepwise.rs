//! Generation driven from the host, one step at a time: for requests that
//! need the logits of each step (log-probabilities, frequency and presence
//! penalties). [`Session::step`] hands back the logits, the host sampler
//! ([`Sampler`], the backend's algorithm on host slices) draws from them
//! with the same seed stream and penalty history as [`Session::decode`],
//! so the tokens are the ones the device loop draws from the same settings
//! (greedy or seeded alike). Speculative decoding is not used here: such
//! requests decode plainly.

use anyhow::Result;
use fusebox_engine::{GenerateOutput, Sampler, Session, StopReason};

use crate::engine::{GenRequest, TokenLogprobs};
use crate::logprobs::StepScores;
use crate::penalties::Counts;

/// Whether `req` needs the host-driven loop.
pub fn needed(req: &GenRequest) -> bool {
    req.logprobs.is_some() || !req.penalties.is_off()
}

/// Generate for `req` after the current context, like
/// [`Session::generate`]: `on_token` sees each new token (and its
/// log-probabilities, when asked for) and returns `false` to stop.
pub fn generate(
    session: &mut Session,
    req: &GenRequest,
    mut on_token: impl FnMut(u32, Option<TokenLogprobs>) -> Result<bool>,
) -> Result<GenerateOutput> {
    let mut out = GenerateOutput {
        prompt_tokens: req.prompt.len(),
        tokens: Vec::new(),
        stop: StopReason::MaxTokens,
        prefill_secs: 0.0,
        decode_secs: 0.0,
        decode_steps: 0,
    };
    let t0 = std::time::Instant::now();
    // the logits are copied out of the session, which the sampler's history
    // (the session's tokens) is read from alongside
    let mut logits = session.prefill(&req.prompt)?.to_vec();
    out.prefill_secs = t0.elapsed().as_secs_f64();
    if req.max_tokens == 0 {
        return Ok(out);
    }
    let t1 = std::time::Instant::now();
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut counts = Counts::new(req.penalties);
    let mut work = Vec::new();
    loop {
        let scores = req.logprobs.map(|k| StepScores::new(&logits, k));
        let tok = if req.penalties.is_off() {
            sampler.sample(&logits, &session.tokens)
        } else {
            work.clear();
            work.extend_from_slice(&logits);
            counts.apply(&mut work);
            sampler.sample(&work, &session.tokens)
        };
        if req.stop_ids.contains(&tok) {
            out.stop = StopReason::Eos;
            break;
        }
        out.tokens.push(tok);
        counts.add(tok);
        let lp = scores.map(|s| s.token(&logits, tok));
        let stop = if !on_token(tok, lp)? {
            Some(StopReason::Callback)
        } else if out.tokens.len() >= req.max_tokens {
            Some(StopReason::MaxTokens)
        } else if session.kv.remaining() == 0 {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        if let Some(s) = stop {
            out.stop = s;
            break;
        }
        logits.clear();
        logits.extend_from_slice(session.step(tok)?);
        out.decode_steps += 1;
    }
    out.decode_secs = t1.elapsed().as_secs_f64();
    Ok(out)
}
