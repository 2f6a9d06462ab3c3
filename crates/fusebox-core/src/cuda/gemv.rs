//! Matmul (decode GEMV and cuBLAS prefill), expert matmul, embedding, and
//! weight upload (kernels: `gemv.cu`).

use anyhow::{bail, Result};

use super::CudaBackend;
use crate::quant::Weight;
use crate::tensor::Tensor;

impl CudaBackend {
    pub(crate) fn upload_weight_impl(&self, w: Weight) -> Result<Weight> {
        let _ = w;
        bail!("cuda upload_weight: not written yet")
    }
    pub(crate) fn matmul_impl(&self, x: &Tensor, w: &Weight, out: &mut Tensor) -> Result<()> {
        let _ = (x, w, out);
        bail!("cuda matmul: not written yet")
    }
    pub(crate) fn expert_matmul_impl(&self, x: &Tensor, w: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()> {
        let _ = (x, w, ids, out);
        bail!("cuda expert_matmul: not written yet")
    }
    pub(crate) fn embedding_impl(&self, table: &Weight, ids: &Tensor, out: &mut Tensor) -> Result<()> {
        let _ = (table, ids, out);
        bail!("cuda embedding: not written yet")
    }
}
