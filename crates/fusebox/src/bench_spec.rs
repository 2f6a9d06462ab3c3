//! `fusebox bench --spec ...` and `--verify-curve`: speculative decoding
//! against plain decoding in one process, and what scoring k + 1 rows costs
//! against decoding one.

use std::time::Instant;

use anyhow::{ensure, Result};
use fusebox_engine::spec::MAX_SPEC_K;
use fusebox_engine::{BatchEngine, GenerateOptions, Session, Speculation};
use serde_json::{json, Value};

use crate::bench::median;

fn spread(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    let (lo, hi) = (s.iter().copied().fold(f64::MAX, f64::min), s.iter().copied().fold(0.0, f64::max));
    json!({"median": median(&mut s), "min": lo, "max": hi, "runs": v})
}

/// Decode speed of a generation: tokens after the first over the time after
/// the prefill (both variants measured alike).
fn tok_s(out: &fusebox_engine::GenerateOutput) -> f64 {
    out.tokens.len().saturating_sub(1) as f64 / out.decode_secs.max(1e-9)
}

/// Plain and speculative decoding alternated round by round on the same
/// prompt: tok/s of each, their ratio, and the acceptance.
pub fn spec_ab<'m>(
    engine: &mut BatchEngine<'m>,
    spec: &mut Option<Speculation<'m>>,
    prompt: &[u32],
    opts: &GenerateOptions,
    rounds: usize,
) -> Result<Value> {
    let plain_run = |engine: &mut BatchEngine<'m>| -> Result<fusebox_engine::GenerateOutput> {
        Ok(engine.generate(prompt, opts, &mut None, |_| Ok(true))?.0)
    };
    // warm both (kernel compilation, graph capture)
    let reference = plain_run(engine)?;
    engine.generate(prompt, opts, spec, |_| Ok(true))?;
    let (mut plain, mut specd, mut ratio) = (vec![], vec![], vec![]);
    let mut last = None;
    let mut same = true;
    for r in 0..rounds.max(1) {
        let p = tok_s(&plain_run(engine)?);
        let (out, stats) = engine.generate(prompt, opts, spec, |_| Ok(true))?;
        let stats = stats.expect("speculation was given");
        let s = tok_s(&out);
        same &= out.tokens == reference.tokens;
        eprintln!(
            "  round {}: plain {p:.1} tok/s, {} {s:.1} tok/s, ratio {:.3} | {:.2} accepted per round",
            r + 1,
            stats.method,
            s / p,
            stats.mean_accepted()
        );
        plain.push(p);
        specd.push(s);
        ratio.push(s / p);
        last = Some(stats);
    }
    let stats = last.expect("at least one round");
    Ok(json!({
        "plain_tok_s": spread(&plain), "spec_tok_s": spread(&specd), "ratio": spread(&ratio),
        "spec": stats.to_json(), "acceptance_rate": stats.acceptance_rate(),
        "tokens": reference.tokens.len(),
        // at temperature 0 the outputs must be equal; sampling makes them differ
        "same_tokens_as_plain": same,
    }))
}

/// Time of one verify pass of `m` rows against one decode step, at the
/// context `prompt` leaves, for m = 1 ..= max_k + 1 (`reps` passes each,
/// median).
pub fn verify_curve(session: &mut Session, prompt: &[u32], max_k: usize, reps: usize) -> Result<Vec<Value>> {
    ensure!((1..=MAX_SPEC_K).contains(&max_k), "--verify-curve K: K must be between 1 and {MAX_SPEC_K}");
    session.reset();
    session.prefill(prompt)?;
    let base = session.kv.len;
    let rows: Vec<u32> = prompt.iter().copied().cycle().take(max_k + 1).collect();
    let mut time = |m: usize| -> Result<f64> {
        let mut t = vec![];
        for i in 0..reps + 1 {
            session.truncate(base);
            let t0 = Instant::now();
            if m == 0 {
                session.decode(rows[0])?;
            } else {
                session.verify(&rows[..m])?;
            }
            if i > 0 {
                // the first pass of a size warms it (compilation, capture)
                t.push(t0.elapsed().as_secs_f64());
            }
        }
        Ok(median(&mut t))
    };
    let decode = time(0)?;
    let mut out = vec![];
    for m in 1..=max_k + 1 {
        let t = time(m)?;
        eprintln!("  verify {m:>2} rows (k = {:>2}): {:.3} ms = {:.2} x a decode step", m - 1, t * 1e3, t / decode);
        out.push(json!({"k": m - 1, "rows": m, "secs": t, "decode_secs": decode, "ratio": t / decode}));
    }
    session.truncate(base);
    Ok(out)
}
