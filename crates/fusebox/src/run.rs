//! `fusebox run`: chat with a model, interactively or one-shot.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use fusebox_core::fixtures::assets_dir;
use fusebox_engine::{BatchEngine, GenerateOptions, StopReason};
use fusebox_models::{Message, Model, StreamDecoder};

use crate::common::{backend, check_model_path, context_size, max_tokens, ChatArgs, DeviceArg, SamplingArgs, TextOut};
use crate::spec::SpecArgs;

/// The model `run` uses when none is given (fetched by scripts/fetch-assets.sh).
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Chat with a model. With -p, answer one prompt and exit; otherwise read
/// messages from stdin, one per line, keeping the conversation (the KV cache
/// is reused for the part of the conversation already processed).
///
/// Commands in the chat: /clear starts a new conversation, /exit (or Ctrl-D)
/// quits. Without -m, the SmolLM2-135M-Instruct GGUF from
/// scripts/fetch-assets.sh is used.
#[derive(ClapArgs, Debug)]
#[command(
    after_help = "Examples:\n  fusebox run\n  fusebox run -p 'What is the capital of France?'\n  fusebox run -m ./Qwen3-0.6B --no-think --temp 0.7"
)]
pub struct Args {
    /// Model: a safetensors model directory (Hugging Face or MLX-quantized) or a
    /// .gguf file (default: SmolLM2-135M-Instruct from the assets cache).
    #[arg(short, long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Answer this one message and exit.
    #[arg(short, long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Maximum new tokens per answer (at least 1).
    #[arg(
        short = 'n',
        long = "max-tokens",
        default_value_t = 512,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = max_tokens
    )]
    pub max_tokens: usize,
    #[command(flatten)]
    pub chat: ChatArgs,
    /// Context length in tokens (default: the model's maximum, at most 4096).
    #[arg(short = 'c', long, value_name = "N")]
    pub ctx_size: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Device: auto (a CUDA GPU when one is present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceArg,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    #[command(flatten)]
    pub spec: SpecArgs,
}

fn default_model() -> Result<PathBuf> {
    let p = assets_dir().join(DEFAULT_MODEL);
    if !p.exists() {
        bail!(
            "no model given and the default model (SmolLM2-135M-Instruct) is not at {}: run scripts/fetch-assets.sh, or pass -m PATH",
            p.display()
        );
    }
    Ok(p)
}

pub fn run(a: Args) -> Result<()> {
    let path = match &a.model {
        Some(p) => p.clone(),
        None => default_model()?,
    };
    a.spec.method()?;
    check_model_path(&path)?;
    let be = backend(a.device, a.threads)?;
    let be = &*be;
    let model = Model::load(&path, be)?;
    let Some(template) = &model.chat_template else {
        bail!("{}: the model has no chat template; use `fusebox generate --no-chat-template`", path.display())
    };
    let ctx = context_size(a.ctx_size, &model)?;
    let sampling = a.sampling.resolve(&model.generation, a.sampling.seed())?;
    let enable_thinking = a.chat.enable_thinking();
    let opts = GenerateOptions { max_new_tokens: a.max_tokens, stop_ids: model.eos_token_ids(), sampling };
    let draft = a.spec.load_draft(be)?;
    let mut spec = a.spec.build(Some(&model), draft.as_ref(), be, ctx)?;
    let mut engine = BatchEngine::lone(&model.decoder, be, ctx)?;
    engine.set_prefix_reuse(true);
    let mut history: Vec<Message> = a.chat.system.iter().map(|s| Message::new("system", s)).collect();
    let interactive = a.prompt.is_none();
    if interactive {
        eprintln!(
            "fusebox: chatting with {} on {} (/clear: new conversation, /exit or Ctrl-D: quit)",
            path.display(),
            fusebox_core::Backend::name(be)
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        let user = match &a.prompt {
            Some(p) => p.clone(),
            None => {
                eprint!("> ");
                std::io::stderr().flush().ok();
                match lines.next() {
                    None => break,
                    Some(l) => l.context("reading stdin")?,
                }
            }
        };
        match user.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                history.retain(|m| m.role == "system");
                engine.forget_prefix();
                eprintln!("(new conversation)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", &user));
        let ids = model.tokenizer.encode(&template.render(&history, true, enable_thinking)?, false)?;
        if ids.len() >= ctx {
            history.pop();
            let msg = format!("the conversation is {} tokens, more than the context of {ctx}", ids.len());
            if interactive {
                eprintln!("{msg}; /clear to start over or raise --ctx-size");
                continue;
            }
            bail!("{msg}; raise --ctx-size");
        }
        // the engine reuses the cached part of the conversation
        let mut stream = StreamDecoder::new();
        let mut out = TextOut::stdout();
        let (res, stats) = engine.generate(&ids, &opts, &mut spec, |tok| {
            if let Some(piece) = stream.push(&model.tokenizer, tok)? {
                out.text(&piece)?;
            }
            Ok(true)
        })?;
        if let Some(rest) = stream.flush(&model.tokenizer)? {
            out.text(&rest)?;
        }
        out.line("")?;
        let reply = model.tokenizer.decode(&res.tokens, true)?;
        if let Some(p) = engine.parity() {
            eprintln!("{}", p.report());
        }
        history.push(Message::new("assistant", &reply));
        eprintln!(
            "[{} new prompt tokens, {:.1} tok/s | {} tokens, {:.1} tok/s{}]",
            res.prompt_tokens,
            res.prefill_tok_s(),
            res.tokens.len(),
            res.decode_tok_s(),
            if res.stop == StopReason::ContextFull { " | context full: /clear to start over" } else { "" }
        );
        if let Some(st) = &stats {
            eprintln!("[{}]", st.summary());
        }
        if !interactive {
            break;
        }
    }
    Ok(())
}
