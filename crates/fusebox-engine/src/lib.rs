//! fusebox-engine: the KV cache, sampling, and the generation loop.

pub mod generate;
pub mod kv_cache;
pub mod sampling;
pub mod verify;

pub use generate::{GenerateOptions, GenerateOutput, ParityCheck, Session, StopReason};
pub use kv_cache::KvCache;
pub use sampling::{Sampler, SamplingParams};
