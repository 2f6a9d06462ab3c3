//! OpenAI API request and response bodies (the fields this server reads and
//! writes; unknown request fields are ignored).

use serde::{Deserialize, Serialize};

use crate::engine::Usage;

/// Sampling fields shared by completions and chat completions. Absent ones
/// come from the model's generation_config.json (greedy when it has none).
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 or negative: off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// OpenAI's penalties on tokens generated so far, in [-2, 2].
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<i64>,
    /// vLLM's extension: keep generating past the model's EOS tokens (for
    /// benchmarks that need exactly `max_tokens`).
    pub ignore_eos: Option<bool>,
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn strings(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// `prompt`: text or token ids; the batch forms hold one prompt at most here.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stream` and `stream_options`, shared by completions and chat completions.
#[derive(Debug, Default, Deserialize)]
pub struct StreamFields {
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

impl StreamFields {
    pub fn stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// A last chunk with `usage` (and `"usage": null` on the others).
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Fields that name features this server does not have yet; a request that
/// turns one on is refused rather than silently answered without it.
#[derive(Debug, Default, Deserialize)]
pub struct Unsupported {
    pub n: Option<u32>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
}

/// `POST /v1/completions`
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Default 16, as OpenAI's.
    pub max_tokens: Option<usize>,
    pub stop: Option<Stop>,
    /// The log-probabilities of each token and of this many most likely
    /// alternatives (0 to 5).
    pub logprobs: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    pub streaming: StreamFields,
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

/// Message content: a string, or parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// `chat_template_kwargs` (vLLM's extension): what the template may read.
#[derive(Debug, Default, Deserialize)]
pub struct ChatTemplateKwargs {
    pub enable_thinking: Option<bool>,
}

/// `POST /v1/chat/completions`
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub stop: Option<Stop>,
    pub chat_template_kwargs: Option<ChatTemplateKwargs>,
    /// The log-probability of each token.
    pub logprobs: Option<bool>,
    /// And of this many most likely alternatives (0 to 20; needs `logprobs`).
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    pub streaming: StreamFields,
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

/// A completion's `logprobs` (the legacy shape): per token its text, its
/// log-probability, the most likely alternatives by text, and where the
/// token's text starts in the completion.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

/// One token of a chat answer's `logprobs.content`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes (a character may span tokens).
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// A chat answer's `logprobs`.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: String,
}

/// The `text_completion` object.
#[derive(Debug, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: String,
}

/// The `chat.completion` object.
#[derive(Debug, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// One server-sent chunk of a streamed response: `chat.completion.chunk`
/// with [`ChatChunkChoice`]s or `text_completion` with
/// [`CompletionChunkChoice`]s.
#[derive(Debug, Serialize)]
pub struct Chunk<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    /// Absent unless `stream_options.include_usage`; then `null` but on the
    /// last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// What a chat chunk adds to the message.
#[derive(Debug, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChunkChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The context length in tokens, prompt included (vLLM's field).
    pub max_model_len: usize,
    /// Where the model runs (`cpu (2 threads)`, `cuda:0 (...)`): fusebox's own field.
    pub device: String,
}

/// `GET /v1/models`
#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}
