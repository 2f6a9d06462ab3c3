//! Random-weight models with the exact shapes of real ones, built in memory
//! (no checkpoint written), for benchmarks: decode speed does not depend on
//! the weight values, only on their shapes and formats.

use anyhow::{bail, Result};
use fusebox_core::{DType, Tensor, Weight};
use rayon::prelude::*;
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
    /// MLX affine, `bits` bits, group 64.
    Affine {
        bits: u32,
    },
}

impl Quant {
    pub fn parse(s: &str) -> Result<Quant> {
        Ok(match s {
            "bf16" => Quant::Bf16,
            "q4g64" => Quant::Affine { bits: 4 },
            "q8g64" => Quant::Affine { bits: 8 },
            other => bail!("unknown --quant \"{other}\" (known: bf16, q4g64, q8g64)"),
        })
    }
}

/// Fill `out` with pseudo-random 16-bit words from `seed` (splitmix64), in parallel.
fn random_words(out: &mut [u16], seed: u64, f: impl Fn(u64) -> u16 + Sync) {
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(ci, c)| {
        let mut s = seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for o in c {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *o = f(z ^ (z >> 31));
        }
    });
}

/// bf16 values of magnitude about `scale`, random sign.
fn bf16_tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut t = Tensor::zeros(shape, DType::BF16);
    let words: &mut [u16] = bytemuck::cast_slice_mut(t.host_bytes_mut().expect("owned"));
    random_words(words, seed, |z| {
        let u = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        half::bf16::from_f32(u * scale).to_bits()
    });
    t
}

/// A source of random weights for one config and format.
pub struct SyntheticSource {
    pub quant: Quant,
    seed: std::sync::atomic::AtomicU64,
}

impl SyntheticSource {
    pub fn new(quant: Quant) -> Self {
        SyntheticSource { quant, seed: std::sync::atomic::AtomicU64::new(1) }
    }

    fn next_seed(&self) -> u64 {
        self.seed.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn weight(&self, experts: usize, rows: usize, cols: usize) -> Result<Weight> {
        let lead: Vec<usize> = if experts > 1 { vec![experts, rows] } else { vec![rows] };
        let shape = |last: usize| [lead.clone(), vec![last]].concat();
        match self.quant {
            Quant::Bf16 => Weight::dense(bf16_tensor(&shape(cols), self.next_seed(), 0.02)),
            Quant::Affine { bits } => {
                let group = 64;
                let mut q = Tensor::zeros(&shape(cols * bits as usize / 32), DType::U32);
                let words: &mut [u16] = bytemuck::cast_slice_mut(q.host_bytes_mut()?);
                random_words(words, self.next_seed(), |z| z as u16);
                let s = bf16_tensor(&shape(cols / group), self.next_seed(), 0.002);
                let b = bf16_tensor(&shape(cols / group), self.next_seed(), 0.01);
                Weight::affine(q, s, b, bits, group)
            }
        }
    }
}

impl WeightSource for SyntheticSource {
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
