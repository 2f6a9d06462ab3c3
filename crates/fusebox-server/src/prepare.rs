//! Checking a request and turning it into a [`GenRequest`]: the prompt's
//! token ids, sampling settings and token budget.

use fusebox_engine::{BadSetting, SamplingParams};
use fusebox_models::Message;

use crate::engine::GenRequest;
use crate::error::ApiError;
use crate::model::ModelInfo;
use crate::openai::{ChatMessage, Content, Prompt, SamplingFields, Unsupported};
use crate::penalties::Penalties;

/// The most choices one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;

/// Refuse the features that are not there, and return how many choices
/// (`n`) the request asks for.
pub fn check_unsupported(u: &Unsupported) -> Result<usize, ApiError> {
    if let Some(b) = u.best_of.filter(|&b| b != 1) {
        return Err(ApiError::invalid(format!("best_of = {b}: best_of is not supported")).param("best_of"));
    }
    if u.echo == Some(true) {
        return Err(ApiError::invalid("echo is not supported").param("echo"));
    }
    match u.n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => Ok(n as usize),
        n => Err(ApiError::invalid(format!("n must be between 1 and {MAX_CHOICES}, got {n}")).param("n")),
    }
}

/// The most alternatives a chat answer reports per token (`top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// The most a completion reports per token (`logprobs`).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

/// A chat request's `logprobs` and `top_logprobs`: how many alternatives
/// to report per token (`None`: no log-probabilities).
pub fn chat_logprobs(logprobs: Option<bool>, top: Option<usize>) -> Result<Option<usize>, ApiError> {
    if let Some(n) = top.filter(|&n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"))
            .param("top_logprobs"));
    }
    match (logprobs == Some(true), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(n)) if n > 0 => Err(ApiError::invalid("top_logprobs needs logprobs: true").param("top_logprobs")),
        (false, _) => Ok(None),
    }
}

/// A completion request's `logprobs`: how many alternatives to report.
pub fn completion_logprobs(n: Option<usize>) -> Result<Option<usize>, ApiError> {
    match n {
        Some(n) if n > MAX_COMPLETION_LOGPROBS => {
            Err(ApiError::invalid(format!("logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {n}"))
                .param("logprobs"))
        }
        n => Ok(n),
    }
}

/// `frequency_penalty` and `presence_penalty`, each in [-2, 2].
pub fn penalties(f: &SamplingFields) -> Result<Penalties, ApiError> {
    let check = |name: &str, v: Option<f32>| match v {
        None => Ok(0.0),
        Some(v) if v.abs() <= Penalties::MAX => Ok(v),
        Some(v) => Err(ApiError::invalid(format!("{name} must be between -2 and 2, got {v}")).param(name)),
    };
    Ok(Penalties {
        frequency: check("frequency_penalty", f.frequency_penalty)?,
        presence: check("presence_penalty", f.presence_penalty)?,
    })
}

/// Sampling settings: generation_config.json first, then the request's
/// fields, then one range check of the merged settings (as the CLI does).
pub fn sampling(info: &ModelInfo, f: &SamplingFields) -> Result<SamplingParams, ApiError> {
    let mut p = fusebox_engine::sampling_defaults(&info.generation);
    if let Some(t) = f.temperature {
        p.temperature = t;
    }
    if let Some(v) = f.top_p {
        p.top_p = v;
    }
    if let Some(k) = f.top_k {
        // 0 or negative: off
        p.top_k = usize::try_from(k).unwrap_or(0);
    }
    if let Some(v) = f.min_p {
        p.min_p = v;
    }
    if let Some(v) = f.repetition_penalty {
        p.repeat_penalty = v;
    }
    p.seed = f.seed.map_or_else(fusebox_engine::clock_seed, |s| s as u64);
    if let Err((what, msg)) = fusebox_engine::check_sampling(&p) {
        let field = match what {
            BadSetting::Temperature => "temperature",
            BadSetting::TopP => "top_p",
            BadSetting::MinP => "min_p",
            BadSetting::RepeatPenalty => "repetition_penalty",
        };
        return Err(ApiError::invalid(format!("{field} {msg}")).param(field));
    }
    Ok(p)
}

/// The token ids of a completion prompt (text is tokenized with the
/// tokenizer's special tokens, as `fusebox generate --no-chat-template`).
pub fn completion_prompt(info: &ModelInfo, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
    let one = |n: usize| {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid("one prompt per request is supported (batched prompts are not)").param("prompt"))
        }
    };
    let text = match prompt {
        Prompt::Tokens(ids) => return Ok(ids.clone()),
        Prompt::TokenLists(v) => return one(v.len()).map(|()| v[0].clone()),
        Prompt::Text(t) => t,
        Prompt::Texts(v) => {
            one(v.len())?;
            &v[0]
        }
    };
    info.tokenizer.encode(text, true).map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e:#}")))
}

/// The token ids of a conversation rendered by the model's chat template,
/// ending with the assistant's turn opening.
pub fn chat_prompt(
    info: &ModelInfo,
    messages: &[ChatMessage],
    enable_thinking: Option<bool>,
) -> Result<Vec<u32>, ApiError> {
    let text = chat_text(info, messages, true, enable_thinking)?;
    info.tokenizer.encode(&text, false).map_err(|e| ApiError::invalid(format!("tokenizing the conversation: {e:#}")))
}

/// A conversation rendered by the model's chat template.
pub fn chat_text(
    info: &ModelInfo,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    enable_thinking: Option<bool>,
) -> Result<String, ApiError> {
    let Some(template) = &info.chat_template else {
        return Err(ApiError::invalid("this model has no chat template; use /v1/completions"));
    };
    if messages.is_empty() {
        return Err(ApiError::invalid("messages is empty").param("messages"));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for m in messages {
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(format!(
                                "message content of type \"{}\" is not supported (only text)",
                                p.kind
                            ))
                            .param("messages"))
                        }
                    }
                }
                s
            }
        };
        msgs.push(Message::new(&m.role, &content));
    }
    template
        .render(&msgs, add_generation_prompt, enable_thinking)
        .map_err(|e| ApiError::invalid(format!("{e:#}")).param("messages"))
}

/// A generation request for `prompt`: at most `max_tokens` new tokens (all
/// that fit in the context when `None`), stopping at the model's EOS tokens.
pub fn gen_request(
    info: &ModelInfo,
    prompt: Vec<u32>,
    max_tokens: Option<usize>,
    sampling: SamplingParams,
) -> Result<GenRequest, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty (no tokens)").param("prompt"));
    }
    if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= info.vocab_size) {
        return Err(ApiError::invalid(format!("token id {bad} is outside the vocabulary of {}", info.vocab_size))
            .param("prompt"));
    }
    if prompt.len() >= info.ctx {
        return Err(ApiError::invalid(format!(
            "the prompt is {} tokens but the context holds {} (room is needed for at least one new token)",
            prompt.len(),
            info.ctx
        ))
        .param("prompt")
        .code("context_length_exceeded"));
    }
    let room = info.ctx - prompt.len();
    let max_tokens = max_tokens.unwrap_or(room).min(room);
    Ok(GenRequest { prompt, max_tokens, sampling, stop_ids: info.eos_token_ids.clone(), ..GenRequest::default() })
}
