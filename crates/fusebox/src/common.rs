//! Options and helpers shared by the subcommands.

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fusebox_core::cpu::CpuBackend;
use fusebox_core::cuda::{self, CudaBackend};
use fusebox_core::Backend;
use fusebox_engine::{BadSetting, SamplingParams};
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
    /// Model: a safetensors model directory (config.json, tokenizer.json,
    /// tokenizer_config.json and *.safetensors, sharded or MLX-quantized) or a .gguf file.
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

    /// Open the backend `--device` names (after checking that -m exists, so
    /// that a mistyped path is the only line printed).
    pub fn backend(&self) -> Result<Box<dyn Backend>> {
        check_model_path(&self.model)?;
        backend(self.device, self.threads)
    }
}

/// The error `Model::load` gives for a missing path, before a device is opened.
pub fn check_model_path(path: &std::path::Path) -> Result<()> {
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    Ok(())
}

/// Open the backend `--device` names. `auto` says on stderr, once, on one
/// short line, which device it chose (and, for the CPU, why in a few words);
/// `--device cuda` without a usable GPU is an error with the full reason.
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
                announce_device(&format!("cuda:0 ({})", info.name));
                Ok(Box::new(be))
            }
            Err(why) => {
                let be = CpuBackend::new(threads)?;
                announce_device(&format!("cpu ({})", short_reason(&why)));
                Ok(Box::new(be))
            }
        },
    }
}

/// `fusebox: device ...` on stderr, at most once a process.
fn announce_device(what: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("fusebox: device {what}"));
}

/// Why `--device auto` fell back to the CPU, in a few words. `cuda::probe`'s
/// reasons name every directory searched or the driver's error code; that
/// detail is for `--device cuda`, whose error carries it in full.
fn short_reason(why: &str) -> String {
    if why.starts_with("the CUDA driver (libcuda) not found") {
        return "no CUDA driver found".into();
    }
    if why == "the CUDA driver reports no GPU" {
        return "no GPU found".into();
    }
    if let Some((what, _)) = why.split_once(" not found (") {
        return format!("{what} not found");
    }
    match why.split_once(" (") {
        Some((head, _)) => format!("{head}; --device cuda gives the details"),
        None => why.to_string(),
    }
}

/// `-n, --max-tokens`: a whole number of at least 1 (0 would generate nothing).
pub fn max_tokens(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 would generate nothing)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number of at least 1".into()),
    }
}

/// Generated text for stdout. Into a pipe or file it goes unchanged; on a
/// terminal, control characters other than newline and tab are shown as
/// `\u{..}` escapes, so a model's output cannot move the cursor, retitle the
/// window or otherwise drive the terminal.
pub struct TextOut {
    out: std::io::StdoutLock<'static>,
    escape: bool,
}

impl TextOut {
    pub fn stdout() -> Self {
        let out = std::io::stdout().lock();
        let escape = std::io::IsTerminal::is_terminal(&out);
        TextOut { out, escape }
    }

    /// Write `text` (escaped on a terminal) and flush.
    pub fn text(&mut self, text: &str) -> Result<()> {
        let text = if self.escape { escape_controls(text) } else { text.into() };
        self.out.write_all(text.as_bytes()).context("writing to stdout")?;
        self.out.flush().context("writing to stdout")
    }

    /// Write `line` and a newline, unescaped (for our own output, such as JSON).
    pub fn line(&mut self, line: &str) -> Result<()> {
        writeln!(self.out, "{line}").context("writing to stdout")?;
        self.out.flush().context("writing to stdout")
    }
}

/// `s` with every control character but `\n` and `\t` written as `\u{..}`.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    let hidden = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !s.contains(hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hidden(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Sampling flags shared by `generate` and `run`.
#[derive(Args, Debug)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 means greedy (always the most likely token).
    /// Default: generation_config.json's temperature (1 if it gives none) if it
    /// sets do_sample: true, else 0, greedy (so also for .gguf files, which have none).
    #[arg(long = "temp", value_name = "T", allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to P (1 = off).
    /// Default: generation_config.json's top_p if it sets do_sample: true, else 1.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens (0 = off; 1 = greedy).
    /// Default: generation_config.json's top_k if it sets do_sample: true, else 0.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Drop tokens less likely than M times the most likely one (0 = off).
    /// Default: generation_config.json's min_p if it sets do_sample: true, else 0.
    #[arg(long, value_name = "M", allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Penalise tokens already in the recent context (1 = off; 1.1 is a common choice).
    /// Default: generation_config.json's repetition_penalty, else 1.
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,
    /// How many recent tokens --repeat-penalty looks at (0 = the whole context).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub repeat_last_n: usize,
    /// Random seed; the same seed and settings give the same tokens.
    /// Default: a new one from the clock each run (`generate` prints it on stderr and in --json).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The seed to use: `--seed`, or one from the clock.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(fusebox_engine::clock_seed)
    }

    /// Sampling settings: generation_config.json first, then the flags.
    pub fn resolve(&self, g: &GenerationConfig, seed: u64) -> Result<SamplingParams> {
        let a = self;
        let mut p = fusebox_engine::sampling_defaults(g);
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
        if let Err((what, msg)) = fusebox_engine::check_sampling(&p) {
            let flag = match what {
                BadSetting::Temperature => "--temp",
                BadSetting::TopP => "--top-p",
                BadSetting::MinP => "--min-p",
                BadSetting::RepeatPenalty => "--repeat-penalty",
            };
            bail!("{flag} {msg}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_controls_shows_control_characters_but_not_newlines_and_tabs() {
        assert!(matches!(escape_controls("plain text\n\tnext line, ünïcödé ✓"), Cow::Borrowed(_)));
        assert_eq!(escape_controls("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape_controls("\r\x00\x07\x7f\u{9b}x\n"), "\\u{d}\\u{0}\\u{7}\\u{7f}\\u{9b}x\n");
        assert_eq!(escape_controls("\u{fffd}ok\t"), "\u{fffd}ok\t");
    }

    #[test]
    fn short_reason_is_a_few_words() {
        let missing = "the CUDA driver (libcuda) not found (looked for libcuda.so.1, libcuda.so in CUDA_HOME, LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/local/nvidia/lib64 and the system library path)";
        assert_eq!(short_reason(missing), "no CUDA driver found");
        assert_eq!(short_reason("the CUDA driver reports no GPU"), "no GPU found");
        assert_eq!(
            short_reason("NVRTC (libnvrtc) not found (looked for libnvrtc.so.13 in CUDA_HOME)"),
            "NVRTC (libnvrtc) not found"
        );
        assert_eq!(
            short_reason("the CUDA driver failed to initialise (DriverError(CUDA_ERROR_NO_DEVICE, \"no device\"))"),
            "the CUDA driver failed to initialise; --device cuda gives the details"
        );
        // whatever this machine says
        if let Err(why) = cuda::probe(0) {
            assert!(short_reason(&why).len() < 80, "{why}");
        }
    }

    #[test]
    fn max_tokens_is_at_least_one() {
        assert_eq!(max_tokens("1"), Ok(1));
        assert_eq!(max_tokens("256"), Ok(256));
        assert!(max_tokens("0").unwrap_err().contains("at least 1"));
        assert!(max_tokens("-5").is_err());
        assert!(max_tokens("many").is_err());
    }
}
