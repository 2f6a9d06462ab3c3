//! `fusebox serve`

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use fusebox_core::Backend;
use fusebox_engine::Speculation;
use fusebox_models::Model;
use fusebox_server::{Batching, Loaded, MakeSpeculation, ServerOptions, SpecSetup};

use crate::common::{context_size, ModelArgs};
use crate::spec::{SpecArgs, SpecMethod};

/// `fusebox serve` (its help text is on `Command::Serve` in main.rs).
#[derive(ClapArgs, Debug)]
#[command(
    mut_arg("spec_trace", |a| a.hide(true)),
    after_help = "Examples:\n  fusebox serve -m tests/fixtures/tiny-qwen3 --device cpu\n  fusebox serve -m ./Qwen3-0.6B --host 0.0.0.0 --port 8000 --api-key secret\n  fusebox serve -m ./Qwen3-8B --draft ./Qwen3-0.6B\n  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 32}'"
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub host: String,
    /// Port to listen on (0: any free port; the startup line says which).
    #[arg(long, default_value_t = 8080, value_name = "PORT")]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/, /tokenize and /detokenize (not /health or
    /// /metrics; default: no key needed).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Requests that may wait while one runs; more get 429 (at least 1).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queue: usize,
    /// Context length in tokens, prompt included (default: the model's
    /// max_position_embeddings, at most 4096).
    #[arg(short = 'c', long, value_name = "N")]
    pub ctx_size: Option<usize>,
    /// KV cache blocks of 16 positions that the running requests share (default: enough for
    /// --max-seqs requests at the full context, or what half the free memory holds if less, at
    /// least one context; a request that finds none free waits, or the youngest running one is
    /// preempted and recomputed later).
    #[arg(long, value_name = "N", conflicts_with = "kv_mem")]
    pub kv_blocks: Option<usize>,
    /// The KV cache's size in GiB instead of --kv-blocks (keys and values of every layer).
    #[arg(long, value_name = "GIB")]
    pub kv_mem: Option<f64>,
    /// Tokens one step may run: decode rows and prompt chunks together, so a long prompt is
    /// prefilled in chunks beside the running requests.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_batch_tokens: usize,
    /// Requests generated at once (continuous batching: they join and leave at every step).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_seqs: usize,
    /// Run one request at a time on its own contiguous KV cache, as before continuous batching
    /// (always so with --spec, and on CUDA until its paged attention lands).
    #[arg(long)]
    pub no_batching: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
}

pub fn run(a: Args) -> Result<()> {
    if a.max_queue == 0 {
        bail!("--max-queue must be at least 1");
    }
    if a.spec.spec_trace {
        bail!("--spec-trace is for `generate --json` and `bench`; the server does not record rounds");
    }
    if a.max_batch_tokens == 0 || a.max_seqs == 0 {
        bail!("--max-batch-tokens and --max-seqs must be at least 1");
    }
    if a.kv_blocks == Some(0) || a.kv_mem.is_some_and(|g| !(g > 0.0 && g.is_finite())) {
        bail!("--kv-blocks and --kv-mem must be above 0");
    }
    let speculative = a.spec.method()?.is_some();
    let (model, ctx_size, spec) = (a.model, a.ctx_size, a.spec);
    let (kv_blocks, kv_mem) = (a.kv_blocks, a.kv_mem);
    let batching =
        Batching { kv_blocks, max_batch_tokens: a.max_batch_tokens, max_seqs: a.max_seqs, enabled: !a.no_batching };
    let load = move || {
        let backend = model.backend()?;
        let model = model.load(&*backend)?;
        let ctx = context_size(ctx_size, &model)?;
        let mut loaded = Loaded::new(backend, model, ctx);
        loaded.batching = batching;
        if let Some(gib) = kv_mem {
            let elem = loaded.backend.kv_dtype().size();
            let per_block = fusebox_engine::BLOCK_SIZE * loaded.model.decoder.cfg.kv_bytes_per_token(elem);
            let blocks = (gib * (1u64 << 30) as f64 / per_block as f64) as usize;
            if blocks == 0 {
                bail!("--kv-mem {gib} GiB holds no KV block of this model ({per_block} bytes each)");
            }
            loaded.batching.kv_blocks = Some(blocks);
        }
        if speculative {
            let draft = spec.load_draft(&*loaded.backend)?;
            // a DFlash draft's weights are loaded once; each request's proposer shares them
            let dflash = match spec.method()? {
                Some(SpecMethod::Dflash) => Some(spec.load_dflash(&loaded.model, &*loaded.backend)?),
                _ => None,
            };
            loaded.spec = Some(SpecSetup { draft, make: Box::new(ServeSpec { args: spec, dflash }) });
        }
        Ok(loaded)
    };
    fusebox_server::run(load, a.max_queue, &a.host, a.port, ServerOptions { api_key: a.api_key })
}

/// `--spec` and its flags, with a DFlash draft's weights loaded once.
struct ServeSpec {
    args: SpecArgs,
    dflash: Option<std::sync::Arc<fusebox_models::dflash::DFlashDraft>>,
}

/// The worker speculates as `--spec` and its flags say, a proposer per
/// request.
impl MakeSpeculation for ServeSpec {
    fn make<'m>(
        &self,
        target: &'m Model,
        draft: Option<&'m Model>,
        be: &'m dyn Backend,
        ctx: usize,
    ) -> Result<Speculation<'m>> {
        match &self.dflash {
            Some(d) => self.args.dflash(d.clone(), target, be, ctx),
            None => self.args.build(Some(target), draft, be, ctx)?.context("no --spec method"),
        }
    }
}
