//! The sampling op's device buffers ([`Backend::sample`]) and what the host
//! knows of them: the parameters, the token history the repetition penalty
//! reads, the draw counter, and the token drawn. A decode step that draws on
//! the device is one [`Backend::run_graph`] pass (forward and draw), and only
//! the token comes back. [`crate::Session`] draws with one; a
//! [`crate::BatchEngine`] draws with one for a lone decoding sequence.

use anyhow::{bail, Result};
use fusebox_core::sample::SAMPLE_PARAMS;
use fusebox_core::{Backend, DType, Tensor};

use crate::sampling::SamplingParams;

pub(crate) struct DeviceSampler {
    /// `F32 [SAMPLE_PARAMS]`.
    pub(crate) params: Tensor,
    /// `I32 [capacity]`: the context, then the token last drawn.
    pub(crate) history: Tensor,
    /// `I32 [2]`: history length, draw counter.
    pub(crate) state: Tensor,
    /// `I32 [1]`: the token drawn.
    pub(crate) token: Tensor,
    /// Host staging for `history` (written whole).
    staging: Vec<i32>,
    read: Vec<i32>,
    /// Draws since the parameters were set (the device counter).
    pub(crate) draws: u32,
    /// The token last drawn, when the device history is the context plus it.
    pub(crate) pending: Option<u32>,
}

impl DeviceSampler {
    /// Buffers for a context of up to `capacity` tokens, greedy parameters.
    pub(crate) fn new(be: &dyn Backend, capacity: usize) -> Result<DeviceSampler> {
        let mut params = be.zeros(&[SAMPLE_PARAMS], DType::F32)?;
        be.write_f32(&mut params, &SamplingParams::greedy().encode())?;
        Ok(DeviceSampler {
            params,
            history: be.zeros(&[capacity.max(1)], DType::I32)?,
            state: be.zeros(&[2], DType::I32)?,
            token: be.zeros(&[1], DType::I32)?,
            staging: vec![0; capacity.max(1)],
            read: Vec::with_capacity(1),
            draws: 0,
            pending: None,
        })
    }

    /// Set the parameters of the draws that follow and restart the random
    /// stream at counter `draws`.
    pub(crate) fn set_params(&mut self, be: &dyn Backend, p: &SamplingParams, draws: u32) -> Result<()> {
        be.write_f32(&mut self.params, &p.encode())?;
        self.draws = draws;
        self.pending = None;
        Ok(())
    }

    /// Put `context` (and `next`, the token about to be run) in the device
    /// history, and the state to match.
    pub(crate) fn write_history(&mut self, be: &dyn Backend, context: &[u32], next: Option<u32>) -> Result<()> {
        for (h, &t) in self.staging.iter_mut().zip(context) {
            *h = t as i32;
        }
        let mut len = context.len();
        if let Some(t) = next {
            if let Some(h) = self.staging.get_mut(len) {
                *h = t as i32;
            }
            len += 1;
        }
        be.write_i32(&mut self.history, &self.staging)?;
        be.write_i32(&mut self.state, &[len as i32, self.draws as i32])
    }

    /// Draw from `logits` (`[1, vocab]`) with the history already written.
    pub(crate) fn sample(&mut self, be: &dyn Backend, logits: &Tensor) -> Result<()> {
        be.sample(logits, &self.params, &mut self.history, &mut self.state, &mut self.token)
    }

    /// Read the drawn token back (checked against a vocabulary of `vocab`);
    /// the device history is now the context plus it.
    pub(crate) fn take_token(&mut self, be: &dyn Backend, vocab: usize) -> Result<u32> {
        self.draws = self.draws.wrapping_add(1);
        be.read_i32(&self.token, &mut self.read)?;
        let t = self.read[0];
        if t < 0 || t as usize >= vocab {
            bail!("the sampler returned token {t}, outside the vocabulary of {vocab}");
        }
        self.pending = Some(t as u32);
        Ok(t as u32)
    }

    /// The valid part of the device history and the draw counter, read back.
    pub(crate) fn read_history(&self, be: &dyn Backend) -> Result<(Vec<i32>, u32)> {
        let (mut h, mut st) = (vec![], vec![]);
        be.read_i32(&self.history, &mut h)?;
        be.read_i32(&self.state, &mut st)?;
        h.truncate((st[0].max(0) as usize).min(h.len()));
        Ok((h, st[1] as u32))
    }
}
