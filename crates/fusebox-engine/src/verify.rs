//! Multi-token scoring for speculative decoding: run `m` tokens after the
//! context in one forward pass and keep the logits of every row, then roll
//! the KV cache back to the last accepted position (a length change; nothing
//! is copied).
//!
//! Row `i` of a verify pass over `[t0, d1, .., dk]` is the distribution of
//! the token after `t0, d1, .., di`. On the CPU every row is bitwise what a
//! one-token decode step at that position computes (matmuls of up to
//! [`fusebox_core::cpu::ROW_EXACT_MAX`] rows use the decode dot product), so
//! greedy speculative output equals plain greedy output by construction.

use anyhow::{bail, ensure, Result};
use fusebox_core::{DType, Tensor};
use fusebox_models::{Logits, Workspace};

use crate::generate::Session;

/// Graph keys of verify passes: this plus the row count.
const PASS_VERIFY: u64 = 0x5645_5249_0000;

/// The most rows one verify pass scores (the pending token and up to
/// `MAX_VERIFY_ROWS - 1` drafts).
pub const MAX_VERIFY_ROWS: usize = 32;

/// The buffers of one verify pass size.
pub(crate) struct VerifyPass {
    ws: Workspace,
    /// `I32 [m]`: each row's argmax.
    argmax: Tensor,
}

/// Verify buffers by row count, made at first use and kept, so a round
/// allocates nothing once each size it uses has been seen.
#[derive(Default)]
pub struct VerifyPasses {
    passes: Vec<Option<VerifyPass>>,
    /// Row count of the last pass (0: none yet).
    last_m: usize,
    /// Each row's argmax, read back.
    argmax: Vec<i32>,
    /// Each row's logits, read back on request (`[m, vocab]`).
    logits: Vec<f32>,
}

impl Session<'_> {
    /// Run `ids` (the pending token, then drafts) after the context in one
    /// forward pass, keeping every row's logits; the tokens join the context
    /// (roll back the rejected ones with [`Session::truncate`]). Returns each
    /// row's argmax (the first largest logit, as plain greedy decoding picks).
    pub fn verify(&mut self, ids: &[u32]) -> Result<&[i32]> {
        let m = ids.len();
        if m == 0 {
            bail!("verify: no tokens to score");
        }
        ensure!(m <= MAX_VERIFY_ROWS, "verify: {m} rows, at most {MAX_VERIFY_ROWS} (the pending token and 31 drafts)");
        self.check_room(m)?;
        if self.verify.passes.len() <= m {
            self.verify.passes.resize_with(m + 1, || None);
        }
        if self.verify.passes[m].is_none() {
            let ws = self.workspace(m, Logits::All)?;
            let argmax = self.be.zeros(&[m], DType::I32)?;
            self.verify.passes[m] = Some(VerifyPass { ws, argmax });
        }
        let key = self.graph_key(PASS_VERIFY + m as u64);
        let (model, be) = (self.model, self.be);
        let pass = self.verify.passes[m].as_mut().expect("made above");
        pass.ws.set_tokens(be, ids, self.kv.len)?;
        let (ws, am, kv) = (&mut pass.ws, &mut pass.argmax, &mut self.kv.layers);
        be.run_graph(key, &mut || {
            model.forward(be, ws, kv)?;
            be.argmax(&ws.logits, am)
        })?;
        self.kv.len += m;
        self.tokens.extend_from_slice(ids);
        self.sampler.pending = None;
        self.verify.last_m = m;
        be.read_i32(&pass.argmax, &mut self.verify.argmax)?;
        Ok(&self.verify.argmax)
    }

    /// The logits of every row of the last verify pass (`[m, vocab]`,
    /// row-major), read back to the host.
    pub fn verify_logits(&mut self) -> Result<&[f32]> {
        let m = self.verify.last_m;
        let Some(Some(pass)) = self.verify.passes.get(m) else { bail!("verify_logits: no verify pass has run") };
        self.be.read_f32(&pass.ws.logits, &mut self.verify.logits)?;
        Ok(&self.verify.logits)
    }
}
