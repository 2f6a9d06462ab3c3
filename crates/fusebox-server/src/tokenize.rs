//! `POST /tokenize` and `POST /detokenize`, as vLLM has them: text or a
//! conversation (through the chat template) to token ids, and back.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::json::ApiJson;
use crate::openai::{ChatMessage, ChatTemplateKwargs};
use crate::prepare;
use crate::state::AppState;

/// `POST /tokenize`: `prompt`, or `messages` rendered by the chat template.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// Open the assistant's turn after the messages (default true).
    pub add_generation_prompt: Option<bool>,
    pub chat_template_kwargs: Option<ChatTemplateKwargs>,
    /// Add the tokenizer's special tokens (a BOS token); default true for a
    /// prompt, false for messages (the template writes its own).
    pub add_special_tokens: Option<bool>,
    /// Also return each token's vocabulary entry.
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    /// The context length in tokens.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

pub async fn tokenize(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    st.check_model(req.model.as_deref())?;
    let info = &st.info;
    let (text, add_special) = match (&req.prompt, &req.messages) {
        (Some(p), None) => (p.clone(), req.add_special_tokens.unwrap_or(true)),
        (None, Some(m)) => {
            let thinking = req.chat_template_kwargs.as_ref().and_then(|k| k.enable_thinking);
            let text = prepare::chat_text(info, m, req.add_generation_prompt.unwrap_or(true), thinking)?;
            (text, req.add_special_tokens.unwrap_or(false))
        }
        _ => return Err(ApiError::invalid("send either `prompt` or `messages`").param("prompt")),
    };
    let tokens = info.tokenizer.encode(&text, add_special).map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    let token_strs = (req.return_token_strs == Some(true))
        .then(|| tokens.iter().map(|&t| info.tokenizer.id_to_token(t).unwrap_or_default()).collect());
    Ok(Json(TokenizeResponse { count: tokens.len(), max_model_len: info.ctx, tokens, token_strs }))
}

pub async fn detokenize(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    st.check_model(req.model.as_deref())?;
    let info = &st.info;
    if let Some(bad) =
        req.tokens.iter().find(|&&t| t as usize >= info.vocab_size || info.tokenizer.id_to_token(t).is_none())
    {
        return Err(ApiError::invalid(format!("token id {bad} is not in the vocabulary")).param("tokens"));
    }
    let prompt = info.tokenizer.decode(&req.tokens, false).map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
