//! fusebox-core: the pieces every backend and model shares.
//!
//! * [`DType`] and [`Tensor`]: typed, shaped storage that lives on one device.
//! * [`Backend`]: the op set. Model code is written once against it; each
//!   backend (CPU today, CUDA later) implements every op.
//! * [`cpu::CpuBackend`]: the reference backend, f32 compute on all cores.
//! * [`rope`]: rotary-embedding frequency tables (default, linear, llama3).
//! * [`fixtures`]: how tests find `tests/fixtures` and the fetched assets.

pub mod backend;
pub mod clock;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod fixtures;
pub mod fusion;
pub mod kv;
pub mod quant;
pub mod rope;
pub mod sample;
pub mod tensor;

pub use backend::Backend;
pub use dtype::DType;
pub use kv::{LayerKv, Pages};
pub use quant::{GgmlType, Weight};
pub use rope::{RopeScaling, RopeStyle};
pub use tensor::{Storage, Tensor};
