//! Options and helpers shared by the subcommands.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use fusebox_core::cpu::CpuBackend;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceArg {
    /// The best available device (today: the CPU).
    Auto,
    /// The CPU backend (all cores unless --threads says otherwise).
    Cpu,
    /// An NVIDIA GPU (not in this build yet).
    Cuda,
}

/// Where the model is and what runs it.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Model directory: config.json, tokenizer.json, tokenizer_config.json and
    /// *.safetensors (sharded checkpoints with model.safetensors.index.json work too).
    #[arg(short, long, value_name = "PATH")]
    pub model: PathBuf,
    /// Device to run on.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
}

impl ModelArgs {
    pub fn backend(&self) -> Result<CpuBackend> {
        match self.device {
            DeviceArg::Auto | DeviceArg::Cpu => CpuBackend::new(self.threads),
            DeviceArg::Cuda => bail!("--device cuda: this build of fusebox has no CUDA backend yet; use --device cpu"),
        }
    }
}
