//! Random-weight models with the exact shapes of real ones, built in memory
//! (no checkpoint written), for benchmarks: decode speed does not depend on
//! the weight values, only on their shapes and formats.

use anyhow::{bail, Result};
use fusebox_core::{Backend, DType, Tensor, Weight};
use serde_json::json;

use crate::config::ModelConfig;
use crate::source::WeightSource;

/// The shapes `fusebox bench --synthetic` knows, from the models' config.json.
pub const SHAPES: [&str; 4] = ["qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b", "llama-3.1-8b"];

/// The config of a named shape.
pub fn config(shape: &str) -> Result<ModelConfig> {
    let v = match shape {
        "qwen3-0.6b" => json!({"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 151936, "tie_word_embeddings": true, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "max_position_embeddings": 40960, "eos_token_id": 151645}),
        "qwen3-8b" => json!({"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 151936, "tie_word_embeddings": false, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "max_position_embeddings": 40960, "eos_token_id": 151645}),
        "qwen3-30b-a3b" => json!({"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
            "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": false,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 40960, "eos_token_id": 151645}),
        "llama-3.1-8b" => json!({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": false, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192},
            "max_position_embeddings": 131072, "eos_token_id": 128009}),
        other => bail!("unknown synthetic shape \"{other}\" (known: {})", SHAPES.join(", ")),
    };
    ModelConfig::from_value(&v, shape)
}

/// Weight formats a synthetic model can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Bf16,
    /// MLX affine: `bits` bits, groups of `group` (`q4g32` is the layout GGUF
    /// Q4_0, Q4_1 and Q4_K take on the GPU).
    Affine {
        bits: u32,
        group: usize,
    },
}

impl Quant {
    /// `bf16`, or `q<bits>g<group>` with bits 2-6 or 8 and a group of 32, 64 or 128.
    pub fn parse(s: &str) -> Result<Quant> {
        if s == "bf16" {
            return Ok(Quant::Bf16);
        }
        let parsed = s.strip_prefix('q').and_then(|r| r.split_once('g')).and_then(|(b, g)| {
            let (bits, group) = (b.parse::<u32>().ok()?, g.parse::<usize>().ok()?);
            ((2..=8).contains(&bits) && bits != 7 && [32, 64, 128].contains(&group)).then_some((bits, group))
        });
        match parsed {
            Some((bits, group)) => Ok(Quant::Affine { bits, group }),
            None => bail!(
                "unknown --quant \"{s}\" (known: bf16, or q<bits>g<group> with bits 2, 3, 4, 5, 6 or 8 and group 32, 64 \
                 or 128: q4g64, q8g64, q4g32, ...)"
            ),
        }
    }
}

/// A source of random weights for one config and format, created directly
/// on the backend's device with [`Backend::fill_random`] (so an 8B model
/// never passes through host memory). The values are the same on every
/// backend for the same seed.
pub struct SyntheticSource<'a> {
    pub quant: Quant,
    be: &'a dyn Backend,
    seed: std::sync::atomic::AtomicU64,
}

impl<'a> SyntheticSource<'a> {
    pub fn new(quant: Quant, be: &'a dyn Backend) -> Self {
        SyntheticSource { quant, be, seed: std::sync::atomic::AtomicU64::new(1) }
    }

    fn next_seed(&self) -> u64 {
        self.seed.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn random(&self, shape: &[usize], dtype: DType, lo: f32, hi: f32) -> Result<Tensor> {
        let mut t = self.be.zeros(shape, dtype)?;
        self.be.fill_random(&mut t, self.next_seed(), lo, hi)?;
        Ok(t)
    }

    fn weight(&self, experts: usize, rows: usize, cols: usize) -> Result<Weight> {
        let lead: Vec<usize> = if experts > 1 { vec![experts, rows] } else { vec![rows] };
        let shape = |last: usize| [lead.clone(), vec![last]].concat();
        match self.quant {
            Quant::Bf16 => Weight::dense(self.random(&shape(cols), DType::BF16, -0.02, 0.02)?),
            Quant::Affine { bits, group } => {
                let q = self.random(&shape(cols * bits as usize / 32), DType::U32, 0.0, 0.0)?;
                let s = self.random(&shape(cols / group), DType::BF16, 0.001, 0.003)?;
                let b = self.random(&shape(cols / group), DType::BF16, -0.01, 0.01)?;
                Weight::affine(q, s, b, bits, group)
            }
        }
    }
}

impl WeightSource for SyntheticSource<'_> {
    fn linear(&self, _module: &str, rows: usize, cols: usize) -> Result<Weight> {
        self.weight(1, rows, cols)
    }
    fn norm(&self, _module: &str, n: usize) -> Result<Tensor> {
        Tensor::from_f32(&[n], &vec![1.0; n])
    }
    fn experts(&self, _mlp: &str, _proj: &str, experts: usize, rows: usize, cols: usize) -> Result<Weight> {
        self.weight(experts, rows, cols)
    }
    fn has(&self, _module: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Quant;

    #[test]
    fn quant_names_parse() {
        assert_eq!(Quant::parse("bf16").unwrap(), Quant::Bf16);
        assert_eq!(Quant::parse("q4g64").unwrap(), Quant::Affine { bits: 4, group: 64 });
        assert_eq!(Quant::parse("q4g32").unwrap(), Quant::Affine { bits: 4, group: 32 });
        assert_eq!(Quant::parse("q8g128").unwrap(), Quant::Affine { bits: 8, group: 128 });
        for bad in ["q7g64", "q4g48", "q4", "g64", "f16", "q4g64x"] {
            let e = Quant::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("q4g64"), "{e}");
        }
    }
}
