//! MoE routing and combining, softmax, argmax and sampling (kernels:
//! `moe.cu`, `sample.cu`).

use anyhow::{bail, Result};

use super::CudaBackend;
use crate::tensor::Tensor;

impl CudaBackend {
    pub(crate) fn topk_router_impl(
        &self,
        logits: &Tensor,
        renormalize: bool,
        ids: &mut Tensor,
        weights: &mut Tensor,
    ) -> Result<()> {
        let _ = (logits, renormalize, ids, weights);
        bail!("cuda topk_router: not written yet")
    }
    pub(crate) fn moe_combine_impl(&self, y: &Tensor, weights: &Tensor, out: &mut Tensor) -> Result<()> {
        let _ = (y, weights, out);
        bail!("cuda moe_combine: not written yet")
    }
    pub(crate) fn softmax_impl(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        let _ = (x, out);
        bail!("cuda softmax: not written yet")
    }
    pub(crate) fn argmax_impl(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        let _ = (x, out);
        bail!("cuda argmax: not written yet")
    }
    pub(crate) fn sample_impl(
        &self,
        logits: &Tensor,
        params: &Tensor,
        history: &mut Tensor,
        state: &mut Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let _ = (logits, params, history, state, out);
        bail!("cuda sample: not written yet")
    }
}
