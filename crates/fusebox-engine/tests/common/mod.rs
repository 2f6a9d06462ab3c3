//! Helpers shared by this crate's tests.
#![allow(dead_code)]

use fusebox_core::cpu::CpuBackend;
use fusebox_core::fixtures::fixture;
use fusebox_core::Backend;
use fusebox_models::Model;

/// Every tiny fixture model: safetensors, GGUF and MLX-quantized, dense and MoE.
pub const ALL_MODELS: [&str; 9] = [
    "tiny-qwen3",
    "tiny-llama",
    "tiny-llama-linear",
    "tiny-qwen3-moe",
    "gguf/tiny-qwen3.gguf",
    "gguf/tiny-llama.gguf",
    "gguf/tiny-qwen3-moe.gguf",
    "mlx/tiny-qwen3-4bit-g64",
    "mlx/tiny-qwen3-moe-4bit-g64",
];

pub fn cpu() -> CpuBackend {
    CpuBackend::new(0).unwrap()
}

/// A fixture model (a path under `tests/fixtures`), with the file named on failure.
pub fn load(name: &str, be: &dyn Backend) -> Model {
    let path = fixture(name);
    Model::load(&path, be).unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

/// `n` token ids below `vocab`, the same for a seed.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    fusebox_core::dtype::random_tokens(n, vocab, seed)
}
