//! `fusebox quantize`

use std::path::PathBuf;
use std::time::Instant;

use crate::common::human;
use anyhow::Result;
use clap::Args as ClapArgs;
use fusebox_models::mlx_quant::{quantize_dir, Progress, QuantizeOptions, MAX_SHARD_BYTES};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Quantize a Hugging Face model to an MLX affine checkpoint, like
/// `mlx_lm.convert -q`.
///
/// Every linear weight (`*_proj`, `lm_head`, the MoE router `mlp.gate`) and the
/// token embedding whose input size is a multiple of the group size becomes a
/// packed U32 weight plus scales and biases (in the source dtype, or in
/// config.json's `torch_dtype` when it names one); norms and other tensors are
/// copied. Qwen3-MoE experts are stacked into `mlp.switch_mlp.*`. The result
/// (model.safetensors, sharded past 5 GiB, config.json with a `quantization`
/// block, and the tokenizer files) loads in mlx-lm and in fusebox. It is
/// written into OUT_DIR.tmp-<pid> and renamed into place only on success.
#[derive(ClapArgs, Debug)]
#[command(
    after_help = "Examples:\n  fusebox quantize --from ./Qwen3-0.6B --to ./Qwen3-0.6B-4bit\n  fusebox quantize --from ./Qwen3-8B --to ./Qwen3-8B-8bit --bits 8 --group-size 32 --force"
)]
pub struct Args {
    /// Source model directory (Hugging Face: config.json with model_type llama,
    /// qwen3 or qwen3_moe, dense F32/F16/BF16 *.safetensors, sharded or not, and
    /// the tokenizer files).
    #[arg(long, value_name = "HF_DIR")]
    pub from: PathBuf,
    /// Output directory. It must not exist or must be empty, unless --force.
    #[arg(long, value_name = "OUT_DIR")]
    pub to: PathBuf,
    /// Bits per quantized weight: 2, 3, 4, 5, 6 or 8.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub bits: u32,
    /// Consecutive inputs sharing one scale and bias: 32, 64 or 128 (smaller is
    /// more accurate and larger on disk).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub group_size: usize,
    /// Bits of the Qwen3-MoE router (`mlp.gate`, group size 64), written as a
    /// per-module override in config.json as mlx-lm does.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub router_bits: u32,
    /// Replace OUT_DIR if it exists and is not empty (only once the new
    /// checkpoint is complete).
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    let opts = QuantizeOptions {
        bits: a.bits,
        group_size: a.group_size,
        router_bits: a.router_bits,
        force: a.force,
        max_shard_bytes: MAX_SHARD_BYTES,
    };
    opts.validate()?;
    let start = Instant::now();
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {binary_bytes}/{binary_total_bytes} {eta} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut on_progress = |p: &Progress| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!("({}/{}) {}", p.done, p.total, p.name));
    };
    let result = quantize_dir(&a.from, &a.to, &opts, &mut on_progress);
    bar.finish_and_clear();
    let s = result?;
    eprintln!(
        "fusebox: {} -> {}: {} -> {} ({:.3} bits per weight; {} quantized to {}-bit g{}, {} kept; {} file{}) in {:.1} s",
        a.from.display(),
        a.to.display(),
        human(s.input_bytes as usize),
        human(s.output_bytes as usize),
        s.bits_per_weight(),
        s.quantized,
        a.bits,
        a.group_size,
        s.kept,
        s.shards,
        if s.shards == 1 { "" } else { "s" },
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
