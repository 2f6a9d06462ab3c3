//! Continuous batching on the GPU (bf16, the tiny fixtures): the scenarios
//! of `tests/batch.rs` through [`fusebox_engine::BatchEngine`] on CUDA's paged
//! attention, every request's greedy output equal to the request run alone
//! on CUDA, every KV block free at the end. Skips without a GPU; fails when
//! `FUSEBOX_REQUIRE_CUDA=1` and no GPU is usable. (The server batches on
//! CUDA only with `FUSEBOX_CUDA_BATCHING=1` until these pass on hardware;
//! the batching tests here switch it on.)

mod common;

use common::batch::{check, CROWDED, CROWDED_OPTS, MIXED, MIXED_OPTS};
use fusebox_core::cuda::backend_for_tests;

#[test]
fn cuda_batched_greedy_equals_each_request_alone() {
    let Some(g) = backend_for_tests() else { return };
    g.set_batching(true);
    for name in ["tiny-qwen3", "tiny-llama", "tiny-qwen3-moe", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-4bit-g64"] {
        check(&g, name, MIXED_OPTS, &MIXED);
        eprintln!("{name}: batched greedy == alone on CUDA");
    }
}

#[test]
fn cuda_preempted_sequences_are_recomputed_to_the_same_output() {
    let Some(g) = backend_for_tests() else { return };
    g.set_batching(true);
    assert!(check(&g, "tiny-qwen3", CROWDED_OPTS, &CROWDED) > 0, "the scenario was meant to preempt");
}

/// A batch of one runs the contiguous kernels and decodes in one repeating
/// pass with the draw on the GPU (a CUDA graph), as a `Session` does: the
/// same tokens, greedy and seeded, with no paged attention needed.
#[test]
fn cuda_a_lone_sequence_in_the_engine_decodes_as_a_session() {
    let Some(g) = backend_for_tests() else { return };
    for name in ["tiny-qwen3", "tiny-qwen3-moe", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-4bit-g64"] {
        common::batch::lone_equals_session(&g, name);
        eprintln!("{name}: the engine's lone sequence == a Session on CUDA");
    }
}

/// `BatchEngine::generate` alone, plain and speculative, replays its
/// decode and round passes as CUDA graphs with the draw and the argmax on
/// the GPU, as the `Session` loop does: the same tokens.
#[test]
fn cuda_generate_alone_equals_the_session_loop() {
    let Some(g) = backend_for_tests() else { return };
    for name in ["tiny-qwen3", "tiny-qwen3-moe", "gguf/tiny-qwen3.gguf", "mlx/tiny-qwen3-4bit-g64"] {
        common::batch::generate_equals_session(&g, name);
        eprintln!("{name}: BatchEngine::generate == the Session loop on CUDA");
    }
}
