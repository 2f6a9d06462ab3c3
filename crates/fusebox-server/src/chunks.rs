//! The chunks of a streamed response in OpenAI's shapes, as JSON text:
//! `chat.completion.chunk` for chat, `text_completion` for completions.

use serde::Serialize;

use crate::engine::{FinishReason, Usage};
use crate::logprob_json::Formatter;
use crate::openai::{ChatChunkChoice, ChatDelta, Chunk, CompletionChunkChoice};
use crate::output::Scored;

/// Which API a stream answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completion,
}

/// Makes the chunks of one response; they share its `id`, `created` and `model`.
pub struct Chunks {
    pub api: Api,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Formats log-probabilities, when the request asked for them.
    pub logprobs: Option<Formatter>,
}

impl Chunks {
    /// What opens choice `index`'s stream: chat announces the assistant's role.
    pub fn opening(&self, index: usize) -> Option<String> {
        let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()) };
        (self.api == Api::Chat).then(|| self.choice(index, delta, "", None, None))
    }

    /// A piece of choice `index`'s text, and the scores of its tokens.
    pub fn text(&self, index: usize, text: String, scored: &[Scored]) -> String {
        self.choice(index, ChatDelta { role: None, content: Some(text.clone()) }, &text, Some(scored), None)
    }

    /// The last chunk of choice `index`: empty, with why its generation ended.
    pub fn finish(&self, index: usize, reason: FinishReason) -> String {
        self.choice(index, ChatDelta { role: None, content: None }, "", None, Some(reason.as_str()))
    }

    /// The usage chunk after the last choice, if the request asked for it.
    pub fn usage(&self, usage: Usage) -> Option<String> {
        self.include_usage.then(|| match self.api {
            Api::Chat => self.chunk::<ChatChunkChoice>(vec![], Some(usage)),
            Api::Completion => self.chunk::<CompletionChunkChoice>(vec![], Some(usage)),
        })
    }

    /// A chunk of one choice: `delta` for chat, `text` for completions.
    fn choice(
        &self,
        index: usize,
        delta: ChatDelta,
        text: &str,
        scored: Option<&[Scored]>,
        finish_reason: Option<&'static str>,
    ) -> String {
        let f = self.logprobs.as_ref().zip(scored);
        match self.api {
            Api::Chat => {
                let logprobs = f.map(|(f, s)| f.chat(s));
                self.chunk(vec![ChatChunkChoice { index, delta, logprobs, finish_reason }], None)
            }
            Api::Completion => {
                let logprobs = f.map(|(f, s)| f.completion(s));
                let text = text.to_string();
                self.chunk(vec![CompletionChunkChoice { text, index, logprobs, finish_reason }], None)
            }
        }
    }

    fn chunk<C: Serialize>(&self, choices: Vec<C>, usage: Option<Usage>) -> String {
        let chunk = Chunk {
            id: self.id.clone(),
            object: match self.api {
                Api::Chat => "chat.completion.chunk",
                Api::Completion => "text_completion",
            },
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        };
        serde_json::to_string(&chunk).expect("a chunk serializes")
    }
}
