//! fusebox-engine: the KV cache (and the paged cache's block manager), sampling, the generation loop and
//! speculative decoding.

pub mod batch;
mod batch_spec;
pub mod block_manager;
mod device_sampler;
pub mod generate;
pub mod kv_cache;
mod lone;
pub mod sampling;
pub mod sampling_config;
pub mod spec;
pub mod verify;

pub use batch::{BatchEngine, BatchOptions, Event, Observer, Request, SeqId};
pub use block_manager::{BlockManager, BlockTable, OutOfBlocks, BLOCK_SIZE};
pub use generate::{GenerateOptions, GenerateOutput, ParityCheck, Session, StopReason};
pub use kv_cache::KvCache;
pub use sampling::{Sampler, SamplingParams};
pub use sampling_config::{check_sampling, clock_seed, sampling_defaults, BadSetting};
pub use spec::{DFlash, DraftModel, PromptLookup, Proposer, SpecOptions, SpecStats, Speculation};
