//! `fusebox bench --batch-curve N`: continuous batching's decode cost by
//! batch size, through the engine the server runs ([`BatchEngine`]).

use std::time::Instant;

use anyhow::{ensure, Result};
use fusebox_core::Backend;
use fusebox_engine::{BatchEngine, BatchOptions, Request, SamplingParams, BLOCK_SIZE};
use fusebox_models::Decoder;
use serde_json::{json, Value};

use crate::bench::median;

/// Batch sizes 1, 2, 4, ... up to `max` (and `max` itself).
pub fn sizes(max: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |&b| Some(b * 2)).take_while(|&b| b < max).collect();
    v.push(max);
    v
}

/// For each batch size B: B copies of `prompt` prefilled, then `gen` decode
/// steps of B rows, each step timed; the median step against one sequence's.
pub fn batch_curve(decoder: &Decoder, be: &dyn Backend, prompt: &[u32], gen: usize, max: usize) -> Result<Vec<Value>> {
    ensure!(max >= 1, "--batch-curve N: N must be at least 1");
    ensure!(
        be.has_paged_attention(),
        "--batch-curve needs paged attention, which {} does not run yet (the CPU does)",
        be.name()
    );
    let mut out = vec![];
    let mut one = 0.0;
    for b in sizes(max) {
        // the first sequences decode while the last prefill: room for those extra tokens
        let extra = prompt.len() + b;
        let positions = prompt.len() + gen + extra + 2;
        let opts = BatchOptions {
            blocks: b * positions.div_ceil(BLOCK_SIZE),
            max_batch_tokens: prompt.len().max(b),
            max_seqs: b,
            max_len: positions,
        };
        let mut engine = BatchEngine::new(decoder, be, opts)?;
        let req = Request {
            prompt: prompt.to_vec(),
            max_new_tokens: gen + extra,
            stop_ids: vec![],
            sampling: SamplingParams::greedy(),
        };
        for _ in 0..b {
            engine.add(req.clone())?;
        }
        // prefill: until every sequence has its first token
        let mut started = std::collections::HashSet::new();
        while started.len() < b {
            started.extend(engine.step()?.iter().filter(|e| e.token.is_some()).map(|e| e.id));
        }
        let mut t = vec![];
        for _ in 0..gen {
            let t0 = Instant::now();
            let n = engine.step()?.len();
            ensure!(n == b, "batch of {b}: a decode step gave {n} tokens");
            t.push(t0.elapsed().as_secs_f64());
        }
        let step = median(&mut t);
        if b == 1 {
            one = step;
        }
        eprintln!(
            "  batch {b:>3}: {:.3} ms a step, {:.1} tok/s, {:.2} x one sequence's step",
            step * 1e3,
            b as f64 / step,
            step / one
        );
        out.push(json!({"batch": b, "step_secs": step, "tok_s": b as f64 / step, "ratio": step / one}));
    }
    Ok(out)
}
