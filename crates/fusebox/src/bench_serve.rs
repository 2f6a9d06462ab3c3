//! `fusebox bench --serve C1,C2,...`: serving under load through the
//! engine `fusebox serve` runs ([`BatchEngine`]), in process (no HTTP): for
//! each concurrency C, C requests in flight at once (a new one joins as one
//! finishes, `2 C` in all, at least 4), each the prompt and `--gen` greedy
//! tokens; reports the output tok/s over the wall time, the time to first
//! token and the inter-token latency (p50 and p99), as
//! `scripts/bench-serve.py` does for a running server.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{ensure, Result};
use fusebox_core::Backend;
use fusebox_engine::{BatchEngine, BatchOptions, Request, SamplingParams, SeqId, BLOCK_SIZE};
use fusebox_models::Decoder;
use serde_json::{json, Value};

/// The `p`-th percentile of `xs` (nearest rank; 0 for none).
fn pct(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let i = ((p / 100.0 * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i]
}

/// One request's clock: when it joined and when each token came.
struct Clock {
    joined: Instant,
    tokens: Vec<Instant>,
}

/// The load at each concurrency of `levels`: one JSON row each.
pub fn serve_curve(
    decoder: &Decoder,
    be: &dyn Backend,
    prompt: &[u32],
    gen: usize,
    levels: &[usize],
    max_batch_tokens: usize,
) -> Result<Vec<Value>> {
    ensure!(gen >= 1, "--serve needs --gen of at least 1");
    ensure!(!levels.is_empty() && levels.iter().all(|&c| c >= 1), "--serve C1,C2,...: every concurrency at least 1");
    let mut out = vec![];
    for &c in levels {
        let len = prompt.len() + gen + 1;
        let opts = BatchOptions {
            blocks: c * len.div_ceil(BLOCK_SIZE),
            max_batch_tokens: max_batch_tokens.max(c),
            max_seqs: c,
            max_len: len,
        };
        let mut engine = BatchEngine::new(decoder, be, opts)?;
        let req = Request {
            prompt: prompt.to_vec(),
            max_new_tokens: gen,
            stop_ids: vec![],
            sampling: SamplingParams::greedy(),
        };
        // warm-up: kernels, graphs and workspaces of this engine's step shapes
        for _ in 0..c {
            engine.add(req.clone())?;
        }
        while !engine.is_idle() {
            engine.step()?;
        }
        let total = (2 * c).max(4);
        let (mut added, mut clocks) = (0, HashMap::<SeqId, Clock>::new());
        let mut done: Vec<Clock> = vec![];
        let t0 = Instant::now();
        while done.len() < total {
            while added < total && engine.running() + engine.waiting() < c {
                let id = engine.add(req.clone())?;
                clocks.insert(id, Clock { joined: Instant::now(), tokens: Vec::with_capacity(gen) });
                added += 1;
            }
            let events = engine.step()?;
            let now = Instant::now();
            for e in events {
                let clock = clocks.get_mut(&e.id).expect("a request of this run");
                if e.token.is_some() {
                    clock.tokens.push(now);
                }
                if e.finished.is_some() {
                    done.push(clocks.remove(&e.id).expect("running"));
                }
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let tokens: usize = done.iter().map(|c| c.tokens.len()).sum();
        let mut ttft: Vec<f64> = done.iter().map(|c| (c.tokens[0] - c.joined).as_secs_f64()).collect();
        let mut itl: Vec<f64> =
            done.iter().flat_map(|c| c.tokens.windows(2).map(|w| (w[1] - w[0]).as_secs_f64())).collect();
        let row = json!({
            "concurrency": c, "requests": total, "output_tokens": tokens, "wall_secs": wall,
            "output_tok_s": tokens as f64 / wall,
            "ttft_p50_ms": 1e3 * pct(&mut ttft, 50.0), "ttft_p99_ms": 1e3 * pct(&mut ttft, 99.0),
            "itl_p50_ms": 1e3 * pct(&mut itl, 50.0), "itl_p99_ms": 1e3 * pct(&mut itl, 99.0),
            "preemptions": engine.preemptions(),
        });
        eprintln!(
            "  concurrency {c:>3}: {:.1} tok/s, TTFT p50 {:.1} ms, ITL p50 {:.2} ms",
            row["output_tok_s"].as_f64().unwrap_or(0.0),
            row["ttft_p50_ms"].as_f64().unwrap_or(0.0),
            row["itl_p50_ms"].as_f64().unwrap_or(0.0)
        );
        out.push(row);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::pct;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(pct(&mut v, 50.0), 3.0);
        assert_eq!(pct(&mut v, 99.0), 5.0);
        assert_eq!(pct(&mut v, 0.0), 1.0);
        assert_eq!(pct(&mut [], 50.0), 0.0);
    }
}
