//! A submitted request's text as it arrives, with stop strings applied: what
//! streaming and non-streaming responses are both made from. Each token's
//! log-probabilities (when asked for) travel with the text that follows
//! their token; the tokens of a stop string keep theirs, as vLLM reports
//! them. Token timings and counts go to the [`Metrics`].

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{Engine, Event, Events, FinishReason, GenRequest, SubmitError, TokenLogprobs, Usage};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::stop::{Step, StopMatcher};

/// A generated token's log-probabilities, and where its text starts in the
/// completion (in characters, before stop strings cut it).
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub id: u32,
    pub logprobs: TokenLogprobs,
    pub text_offset: usize,
}

/// One step of a request's output.
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// Text to emit, and the log-probabilities of the tokens received since
    /// the last piece; the text is empty only for the last tokens' scores.
    Text(String, Vec<Scored>),
    /// The end: why, and the token counts.
    End { finish_reason: FinishReason, usage: Usage },
    /// The request failed after it was accepted.
    Error(String),
}

/// The output of one request. Dropping it cancels the request.
pub struct Output {
    /// `None` once the request has ended or was cancelled.
    events: Option<Events>,
    stops: StopMatcher,
    prompt_tokens: usize,
    /// Tokens received so far.
    tokens: usize,
    /// Characters of token text received so far.
    chars: usize,
    /// Scores not handed out yet.
    scored: Vec<Scored>,
    /// The end, once the text before it has been handed out.
    end: Option<Piece>,
    metrics: Arc<Metrics>,
    /// When the request was submitted, then when the last token came.
    last: Instant,
}

impl Output {
    /// Submit `gen`; generation stops before the first of `stops`.
    pub fn start(
        engine: &dyn Engine,
        gen: GenRequest,
        stops: Vec<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Output, ApiError> {
        let prompt_tokens = gen.prompt.len();
        let last = Instant::now();
        let events = engine.submit(gen).map_err(|e| match e {
            SubmitError::QueueFull => ApiError::queue_full(),
            SubmitError::Closed => ApiError::unavailable(),
        })?;
        Ok(Output {
            events: Some(events),
            stops: StopMatcher::new(stops),
            prompt_tokens,
            tokens: 0,
            chars: 0,
            scored: Vec::new(),
            end: None,
            metrics,
            last,
        })
    }

    /// The next piece; `None` after the end or an error.
    pub async fn next(&mut self) -> Option<Piece> {
        loop {
            let Some(events) = &mut self.events else {
                if !self.scored.is_empty() {
                    return Some(Piece::Text(String::new(), std::mem::take(&mut self.scored)));
                }
                return self.end.take();
            };
            let (text, end) = match events.next().await {
                Some(Event::Token { id, text, logprobs }) => {
                    self.token(id, &text, logprobs);
                    match self.stops.push(&text) {
                        Step::Emit(t) => (t, None),
                        Step::Stop(t) => {
                            let usage = Usage::new(self.prompt_tokens, self.tokens);
                            (t, Some(Piece::End { finish_reason: FinishReason::Stop, usage }))
                        }
                    }
                }
                Some(Event::Done { finish_reason, usage, text }) => {
                    if self.tokens == 0 {
                        self.metrics.prompt(self.prompt_tokens);
                    }
                    match self.stops.push(&text) {
                        Step::Emit(mut t) => {
                            t.push_str(&self.stops.finish());
                            (t, Some(Piece::End { finish_reason, usage }))
                        }
                        Step::Stop(t) => (t, Some(Piece::End { finish_reason: FinishReason::Stop, usage })),
                    }
                }
                Some(Event::Error(msg)) => (String::new(), Some(Piece::Error(msg))),
                None => (String::new(), Some(Piece::Error("the engine dropped the request".into()))),
            };
            if let Some(end) = end {
                // the request is over; cancel it if the engine is still at it
                self.events = None;
                if matches!(end, Piece::Error(_)) {
                    self.scored.clear();
                }
                self.end = Some(end);
            }
            if !text.is_empty() {
                return Some(Piece::Text(text, std::mem::take(&mut self.scored)));
            }
        }
    }

    /// Count a token that arrived with `text`, and keep its scores.
    fn token(&mut self, id: u32, text: &str, logprobs: Option<TokenLogprobs>) {
        let now = Instant::now();
        if self.tokens == 0 {
            self.metrics.prompt(self.prompt_tokens);
        }
        self.metrics.token(self.tokens == 0, now - self.last);
        self.last = now;
        self.tokens += 1;
        if let Some(logprobs) = logprobs {
            self.scored.push(Scored { id, logprobs, text_offset: self.chars });
        }
        self.chars += text.chars().count();
    }
}
