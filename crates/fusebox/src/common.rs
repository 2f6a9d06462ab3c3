//! Options and helpers shared by the subcommands.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use fusebox_core::cpu::CpuBackend;
use fusebox_core::cuda::{self, CudaBackend};
use fusebox_core::Backend;
use fusebox_engine::SamplingParams;
use fusebox_models::GenerationConfig;

/// `--device`: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA GPU 0 when a GPU and its driver are present, else the CPU.
    Auto,
    /// The CPU backend (all cores unless --threads says otherwise).
    Cpu,
    /// NVIDIA GPU number N.
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Ok(DeviceArg::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceArg::Cuda(n)),
                _ => Err(format!("unknown device \"{s}\" (expected auto, cpu, cuda or cuda:N)")),
            },
        }
    }
}

/// Where the model is and what runs it.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Model directory: config.json, tokenizer.json, tokenizer_config.json and
    /// *.safetensors (sharded checkpoints with model.safetensors.index.json work too).
    #[arg(short, long, value_name = "PATH")]
    pub model: PathBuf,
    /// Device: auto (a CUDA GPU when one is present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceArg,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// Dequantize every weight to f32 at load: a quantized model's
    /// full-precision reference (4 bytes a parameter, slow).
    #[arg(long)]
    pub f32: bool,
}

impl ModelArgs {
    /// Load the model on `be` (dequantized with --f32).
    pub fn load(&self, be: &dyn Backend) -> Result<fusebox_models::Model> {
        fusebox_models::Model::load_with(&self.model, be, self.f32)
    }

    pub fn backend(&self) -> Result<Box<dyn Backend>> {
        backend(self.device, self.threads)
    }
}

/// Open the backend `--device` names. `auto` says on stderr which device it
/// chose and why.
pub fn backend(device: DeviceArg, threads: usize) -> Result<Box<dyn Backend>> {
    match device {
        DeviceArg::Cpu => Ok(Box::new(CpuBackend::new(threads)?)),
        DeviceArg::Cuda(n) => match cuda::probe(n) {
            Ok(_) => Ok(Box::new(CudaBackend::new(n)?)),
            Err(why) => {
                bail!("--device cuda{}: {why}; use --device cpu", if n > 0 { format!(":{n}") } else { String::new() })
            }
        },
        DeviceArg::Auto => match cuda::probe(0) {
            Ok(info) => {
                let be = CudaBackend::new(0)?;
                eprintln!("fusebox: device cuda:0 ({}), found by --device auto", info.name);
                Ok(Box::new(be))
            }
            Err(why) => {
                let be = CpuBackend::new(threads)?;
                eprintln!("fusebox: device cpu ({} threads): no usable GPU ({why})", be.threads());
                Ok(Box::new(be))
            }
        },
    }
}

/// Sampling flags shared by `generate` and `run`.
#[derive(Args, Debug)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 means greedy (always the most likely token).
    #[arg(long = "temp", value_name = "T", allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to P (1 = off).
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 = off; 1 = greedy).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Drop tokens less likely than M times the most likely one (0 = off).
    #[arg(long, value_name = "M", allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Penalise tokens already in the recent context (1 = off; 1.1 is a common choice).
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,
    /// How many recent tokens --repeat-penalty looks at (0 = the whole context).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub repeat_last_n: usize,
    /// Random seed; the same seed and settings give the same tokens.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The seed to use: `--seed`, or one from the clock.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        })
    }

    /// Sampling settings: generation_config.json first, then the flags.
    pub fn resolve(&self, g: &GenerationConfig, seed: u64) -> Result<SamplingParams> {
        let a = self;
        let mut p = SamplingParams::greedy();
        if g.do_sample == Some(true) {
            p.temperature = g.temperature.unwrap_or(1.0) as f32;
            p.top_k = g.top_k.unwrap_or(0);
            p.top_p = g.top_p.unwrap_or(1.0) as f32;
            p.min_p = g.min_p.unwrap_or(0.0) as f32;
        }
        p.repeat_penalty = g.repetition_penalty.unwrap_or(1.0) as f32;
        if let Some(t) = a.temperature {
            p.temperature = t;
        }
        if let Some(k) = a.top_k {
            p.top_k = k;
        }
        if let Some(v) = a.top_p {
            p.top_p = v;
        }
        if let Some(v) = a.min_p {
            p.min_p = v;
        }
        if let Some(v) = a.repeat_penalty {
            p.repeat_penalty = v;
        }
        p.repeat_last_n = a.repeat_last_n;
        p.seed = seed;
        if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
            bail!("--temp must be a number >= 0, got {}", p.temperature);
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", p.top_p);
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            bail!("--min-p must be in [0, 1], got {}", p.min_p);
        }
        if !(p.repeat_penalty > 0.0 && p.repeat_penalty.is_finite()) {
            bail!("--repeat-penalty must be > 0, got {}", p.repeat_penalty);
        }
        Ok(p)
    }
}

/// The context length: `--ctx-size`, else the model's maximum capped at 4096.
pub fn context_size(arg: Option<usize>, model: &fusebox_models::Model) -> Result<usize> {
    let max = model.config().max_position_embeddings;
    let ctx = arg.unwrap_or(max.min(4096));
    if ctx == 0 || ctx > max {
        bail!("--ctx-size {ctx} is outside 1..={max} (the model's max_position_embeddings)");
    }
    Ok(ctx)
}

/// Bytes in human units (B, KB, MB, GB; powers of 1000).
pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} KB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// How the prompt is wrapped in the chat template (`generate` and `run`).
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A system message placed before the prompt (chat template only).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Qwen3 templates: let the model think first (`enable_thinking=True`).
    #[arg(long, conflicts_with = "no_think")]
    pub think: bool,
    /// Qwen3 templates: answer without thinking (`enable_thinking=False`).
    #[arg(long)]
    pub no_think: bool,
}

impl ChatArgs {
    /// `enable_thinking` for the template (`None`: the template's default).
    pub fn enable_thinking(&self) -> Option<bool> {
        if self.think {
            Some(true)
        } else if self.no_think {
            Some(false)
        } else {
            None
        }
    }
}
