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

/// The SmolLM2-135M-Instruct Q4_1 asset, or `None` after printing why `test` skips.
pub fn smollm2(test: &str) -> Option<std::path::PathBuf> {
    fusebox_core::fixtures::asset_or_skip("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf", test)
}

/// `text` as a user message in the model's chat template, tokenized.
pub fn chat_prompt(model: &Model, text: &str) -> Vec<u32> {
    let t = model.chat_template.as_ref().expect("the model has a chat template");
    let s = t.render(&[fusebox_models::Message::new("user", text)], true, None).unwrap();
    model.tokenizer.encode(&s, false).unwrap()
}

/// A prompt that asks for a paragraph back with one word changed: prompt
/// lookup's best case.
pub const EDIT_PROMPT: &str = "Repeat the following paragraph word for word, changing only 'Tuesday' to 'Friday'. Paragraph: On Tuesday morning the library opened an hour late because the heating had failed overnight. The staff set up a table of hot drinks by the entrance, and the children's reading group moved into the sunny room upstairs, where they read stories about dragons, ships and faraway islands until lunch.";
