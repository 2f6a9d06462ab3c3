//! `fusebox generate`

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use fusebox_engine::{BatchEngine, GenerateOptions};
use fusebox_models::{Message, Model, StreamDecoder};
use serde_json::json;

use crate::common::{context_size, max_tokens, ChatArgs, ModelArgs, SamplingArgs, TextOut};
use crate::spec::SpecArgs;

/// Generate text from a prompt, streaming it to stdout as it is produced.
///
/// By default the prompt is wrapped in the model's chat template (from
/// tokenizer_config.json) as a user message, and sampling uses the model's
/// generation_config.json (greedy if it has none); every flag below
/// overrides the matching setting. Timings go to stderr.
#[derive(ClapArgs, Debug)]
#[command(
    after_help = "Examples:\n  fusebox generate -m tests/fixtures/tiny-qwen3 -p Hello -n 16 --seed 1\n  fusebox generate -m ./Qwen3-0.6B -p 'Why is the sky blue?' --temp 0.7 --top-p 0.9 --no-think"
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (a user message, unless --no-chat-template).
    #[arg(short, long, value_name = "TEXT")]
    pub prompt: String,
    /// Maximum number of new tokens (at least 1).
    #[arg(
        short = 'n',
        long = "max-tokens",
        default_value_t = 256,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = max_tokens
    )]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Send the prompt as raw text, without the chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    #[command(flatten)]
    pub chat: ChatArgs,
    /// Context length in tokens, prompt included (default: the model's
    /// max_position_embeddings, at most 4096).
    #[arg(short = 'c', long, value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Keep going past end-of-sequence tokens (for benchmarking).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (token ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// The prompt's token ids (chat-templated unless told otherwise).
pub fn prompt_ids(model: &Model, a: &Args) -> Result<Vec<u32>> {
    let enable_thinking = a.chat.enable_thinking();
    match (&model.chat_template, a.no_chat_template) {
        (Some(t), false) => {
            let mut msgs = vec![];
            if let Some(s) = &a.chat.system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", &a.prompt));
            let text = t.render(&msgs, true, enable_thinking)?;
            model.tokenizer.encode(&text, false)
        }
        (None, false) if a.chat.system.is_some() => {
            bail!("--system needs a chat template, and {} has none", model.path.join("tokenizer_config.json").display())
        }
        _ => model.tokenizer.encode(&a.prompt, true),
    }
}

pub fn run(a: Args) -> Result<()> {
    a.spec.method()?;
    let be = a.model.backend()?;
    let be = &*be;
    let model = a.model.load(be)?;
    let draft = a.spec.load_draft(be)?;
    let cfg = model.config();
    let ctx = context_size(a.ctx_size, &model)?;
    let seed = a.sampling.seed();
    let sampling = a.sampling.resolve(&model.generation, seed)?;
    let prompt = prompt_ids(&model, &a)?;
    if prompt.len() >= ctx {
        bail!(
            "the prompt is {} tokens but the context holds {ctx} (room is needed for at least one new token); raise --ctx-size (at most {}) or shorten the prompt",
            prompt.len(),
            cfg.max_position_embeddings
        );
    }
    let stop_ids = if a.ignore_eos { vec![] } else { model.eos_token_ids() };
    let opts = GenerateOptions { max_new_tokens: a.max_tokens, stop_ids, sampling: sampling.clone() };
    let mut engine = BatchEngine::lone(&model.decoder, be, ctx)?;
    let mut spec = a.spec.build(Some(&model), draft.as_ref(), be, ctx)?;
    if !a.json {
        eprintln!(
            "fusebox: {} on {} | {} prompt tokens | seed {seed}",
            model.path.display(),
            fusebox_core::Backend::name(be),
            prompt.len()
        );
    }

    let mut stream = StreamDecoder::new();
    let mut stdout = TextOut::stdout();
    let json = a.json;
    let (out, stats) = engine.generate(&prompt, &opts, &mut spec, |tok| {
        if !json {
            if let Some(piece) = stream.push(&model.tokenizer, tok)? {
                stdout.text(&piece)?;
            }
        }
        Ok(true)
    })?;
    let text = model.tokenizer.decode(&out.tokens, true)?;
    if let Some(p) = engine.parity() {
        eprintln!("{}", p.report());
    }
    if json {
        let v = json!({
            "model": model.path.display().to_string(),
            "prompt_tokens": prompt,
            "tokens": out.tokens,
            "text": text,
            "stop": out.stop.as_str(),
            "seed": seed,
            "sampling": {
                "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                "min_p": sampling.min_p, "repeat_penalty": sampling.repeat_penalty,
                "repeat_last_n": sampling.repeat_last_n,
            },
            "timings": {
                "prefill_tokens": out.prompt_tokens, "prefill_secs": out.prefill_secs,
                "prefill_tok_s": out.prefill_tok_s(), "decode_tokens": out.decode_steps,
                "decode_secs": out.decode_secs, "decode_tok_s": out.decode_tok_s(),
            },
        });
        let mut v = v;
        if let Some(st) = &stats {
            v["spec"] = st.to_json();
        }
        stdout.line(&v.to_string())?;
    } else {
        if let Some(rest) = stream.flush(&model.tokenizer)? {
            stdout.text(&rest)?;
        }
        stdout.line("")?;
        eprintln!(
            "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | stop: {}",
            out.prompt_tokens,
            out.prefill_tok_s(),
            out.tokens.len(),
            out.decode_tok_s(),
            out.stop.as_str()
        );
        if let Some(st) = &stats {
            eprintln!("{}", st.summary());
        }
    }
    Ok(())
}
