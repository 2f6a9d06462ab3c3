//! The `fusebox` command-line interface.

mod bench;
mod bench_batch;
mod bench_serve;
mod bench_spec;
mod common;
mod generate;
mod inspect;
mod quantize;
mod run;
mod serve;
mod spec;
mod tune;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// fusebox: a fast LLM inference runtime for Qwen3 and Llama checkpoints.
///
/// Loads Hugging Face safetensors model directories, MLX affine-quantized
/// checkpoints and GGUF files (Llama, Qwen3, Qwen3-MoE) and decodes on an
/// NVIDIA GPU through CUDA (loaded at run time; no toolkit needed) or on the
/// CPU (all cores). `--device auto` picks the GPU when one is present. Errors
/// name the file, tensor or field at fault and exit with status 2.
#[derive(Parser)]
#[command(name = "fusebox", version, about, long_about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat with a model (interactive, or one-shot with -p); defaults to SmolLM2-135M-Instruct.
    Run(run::Args),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(generate::Args),
    /// Describe a model: architecture, size, dtype, bytes per token.
    Inspect(inspect::Args),
    /// Measure prefill and decode speed against the memory roofline.
    Bench(bench::Args),
    /// A/B every fused decode site on this GPU and write its fusion policy file.
    ///
    /// For every model and every fusible site that occurs in it, decode alternates between the site
    /// fused (all other sites on the graph path) and every site on the graph path, --rounds times
    /// each, with CUDA graphs on. A site is switched on only if it wins on every model where it
    /// occurs: a median speed-up of at least --min-gain, with the spread of the rounds' ratios
    /// ((max - min) / 2) below the gain; otherwise it stays on the graph path. The decisions go to
    /// ~/.cache/fusebox/policy/<gpu>.json (or $FUSEBOX_POLICY_DIR/<gpu>.json), which every later run
    /// on this GPU reads: it sits between the built-in defaults and FUSEBOX_FUSED_<SITE>=0|1, which
    /// still overrides it. Delete the file to return to the built-in defaults.
    Tune(tune::Args),
    /// Quantize a Hugging Face model to an MLX affine checkpoint (like `mlx_lm.convert -q`).
    Quantize(quantize::Args),
    /// Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).
    ///
    /// Endpoints: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions
    /// and POST /v1/chat/completions, whole or streamed as server-sent events (`stream: true`;
    /// `stream_options.include_usage` adds a usage chunk), with `stop` (up to 4 strings, matched on
    /// the text and not returned) and `logprobs` (chat: `logprobs: true`, `top_logprobs` 0-20;
    /// completions: `logprobs` 0-5; the log-softmax of the model's raw logits, before temperature
    /// and penalties); POST /tokenize and POST /detokenize (vLLM's). Requests with logprobs or a
    /// frequency_penalty / presence_penalty decode plainly even under --spec.
    /// The model's id is its directory or file name. One worker thread runs
    /// one request at a time on a fresh context; the others wait in a queue of --max-queue, and a
    /// request that finds the queue full gets 429 with Retry-After. Sampling fields a request
    /// leaves out come from the model's generation_config.json (greedy if it has none); requests
    /// without max_tokens get 16 new tokens (completions) or all that fit in the context (chat).
    /// Errors are OpenAI error objects: 400 for a bad request (naming the field), 401 for a
    /// missing or wrong --api-key, 413 for a body over 16 MiB, 429 when the queue is full. A
    /// client that disconnects has its generation cancelled at the next token. --spec and its
    /// flags decode speculatively, as in `fusebox generate` (greedy output is unchanged).
    /// SIGINT (Ctrl-C) or SIGTERM shuts down: the server stops accepting, ends the running and
    /// queued requests with an error, waits up to 3 s for connections to close and exits 0.
    Serve(serve::Args),
}

fn main() -> ExitCode {
    // A bug should still end in one readable line, not a backtrace dump.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let loc = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("fusebox: internal error{loc}: {msg} (please report this)");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Tune(a) => tune::run(a),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
