//! The HTTP handlers.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::chunks::{Api, Chunks};
use crate::collect::collect;
use crate::engine::GenRequest;
use crate::error::ApiError;
use crate::json::ApiJson;
use crate::logprob_json::Formatter;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatRequest, ChatResponse, CompletionChoice, CompletionRequest, CompletionResponse,
    ModelCard, ModelList, SamplingFields, Stop,
};
use crate::output::Output;
use crate::state::{unix_now, AppState};
use crate::{prepare, stream};

/// `GET /health`
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /v1/models`
pub async fn models(State(st): State<AppState>) -> Json<ModelList> {
    let card = ModelCard {
        id: st.model_id.clone(),
        object: "model",
        created: st.created,
        owned_by: "fusebox",
        max_model_len: st.info.ctx,
        device: st.info.device.clone(),
    };
    Json(ModelList { object: "list", data: vec![card] })
}

/// `GET /metrics`
pub async fn metrics(State(st): State<AppState>) -> Response {
    let text = st.metrics.render(st.engine.stats());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// `POST /v1/completions`
pub async fn completions(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    st.check_model(req.model.as_deref())?;
    let n = prepare::check_unsupported(&req.unsupported)?;
    let logprobs = prepare::completion_logprobs(req.logprobs)?;
    let prompt = prepare::completion_prompt(&st.info, &req.prompt)?;
    let max_tokens = Some(req.max_tokens.unwrap_or(16));
    let out = start(&st, prompt, max_tokens, &req.sampling, logprobs, req.stop.as_ref(), n)?;
    let (id, created) = (new_id("cmpl"), unix_now());
    let formatter = logprobs.map(|_| Formatter { tokenizer: st.info.tokenizer.clone() });
    if req.streaming.stream() {
        let include_usage = req.streaming.include_usage();
        let chunks = Chunks {
            api: Api::Completion,
            id,
            created,
            model: st.model_id.clone(),
            include_usage,
            logprobs: formatter,
        };
        return Ok(stream::sse(out, chunks));
    }
    let (done, usage) = collect_all(out).await?;
    let choices = done
        .into_iter()
        .enumerate()
        .map(|(index, d)| CompletionChoice {
            text: d.text,
            index,
            logprobs: formatter.as_ref().map(|f| f.completion(&d.scored)),
            finish_reason: d.finish_reason.as_str().into(),
        })
        .collect();
    Ok(Json(CompletionResponse { id, object: "text_completion", created, model: st.model_id.clone(), choices, usage })
        .into_response())
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    st.check_model(req.model.as_deref())?;
    let n = prepare::check_unsupported(&req.unsupported)?;
    let logprobs = prepare::chat_logprobs(req.logprobs, req.top_logprobs)?;
    let thinking = req.chat_template_kwargs.as_ref().and_then(|k| k.enable_thinking);
    let prompt = prepare::chat_prompt(&st.info, &req.messages, thinking)?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let out = start(&st, prompt, max_tokens, &req.sampling, logprobs, req.stop.as_ref(), n)?;
    let (id, created) = (new_id("chatcmpl"), unix_now());
    let formatter = logprobs.map(|_| Formatter { tokenizer: st.info.tokenizer.clone() });
    if req.streaming.stream() {
        let include_usage = req.streaming.include_usage();
        let chunks =
            Chunks { api: Api::Chat, id, created, model: st.model_id.clone(), include_usage, logprobs: formatter };
        return Ok(stream::sse(out, chunks));
    }
    let (done, usage) = collect_all(out).await?;
    let choices = done
        .into_iter()
        .enumerate()
        .map(|(index, d)| ChatChoice {
            index,
            message: AssistantMessage { role: "assistant", content: d.text },
            logprobs: formatter.as_ref().map(|f| f.chat(&d.scored)),
            finish_reason: d.finish_reason.as_str().into(),
        })
        .collect();
    Ok(Json(ChatResponse { id, object: "chat.completion", created, model: st.model_id.clone(), choices, usage })
        .into_response())
}

/// Check the rest of a generation request and submit its `n` choices
/// (choice `i` samples with the seed plus `i`; one that cannot be queued
/// cancels the others).
#[allow(clippy::too_many_arguments)]
fn start(
    st: &AppState,
    prompt: Vec<u32>,
    max_tokens: Option<usize>,
    fields: &SamplingFields,
    logprobs: Option<usize>,
    stop: Option<&Stop>,
    n: usize,
) -> Result<Vec<Output>, ApiError> {
    let sampling = prepare::sampling(&st.info, fields)?;
    let penalties = prepare::penalties(fields)?;
    let stops = stop_strings(stop)?;
    let mut gen = GenRequest { penalties, logprobs, ..prepare::gen_request(&st.info, prompt, max_tokens, sampling)? };
    if fields.ignore_eos == Some(true) {
        gen.stop_ids.clear();
    }
    (0..n)
        .map(|i| {
            let mut g = gen.clone();
            g.sampling.seed = g.sampling.seed.wrapping_add(i as u64);
            Output::start(&*st.engine, g, stops.clone(), st.metrics.clone())
        })
        .collect()
}

/// Every choice to its end, and the usage of all of them (the prompt counted once).
async fn collect_all(outs: Vec<Output>) -> Result<(Vec<crate::collect::Finished>, crate::engine::Usage), ApiError> {
    let done: Vec<_> =
        futures_util::future::join_all(outs.into_iter().map(collect)).await.into_iter().collect::<Result<_, _>>()?;
    let prompt = done.first().map_or(0, |d: &crate::collect::Finished| d.usage.prompt_tokens);
    let completion = done.iter().map(|d| d.usage.completion_tokens).sum();
    Ok((done, crate::engine::Usage::new(prompt, completion)))
}

pub async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(req.uri().path())
}

pub async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::method_not_allowed(req.method().as_str(), req.uri().path())
}

/// `stop`, checked: at most 4 non-empty strings.
fn stop_strings(stop: Option<&Stop>) -> Result<Vec<String>, ApiError> {
    let v = stop.map(|s| s.strings()).unwrap_or_default();
    if v.len() > 4 || v.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop takes at most 4 non-empty strings").param("stop"));
    }
    Ok(v)
}

/// A response id: `prefix-` and a number unique in this process.
fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    format!("{prefix}-{t:x}{n:04x}")
}
