//! A submitted request's text as it arrives, with stop strings applied: what
//! streaming and non-streaming responses are both made from.

use crate::engine::{Engine, Event, Events, FinishReason, GenRequest, SubmitError, Usage};
use crate::error::ApiError;
use crate::stop::{Step, StopMatcher};

/// One step of a request's output.
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// Text to emit (never empty).
    Text(String),
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
    /// The end, once the text before it has been handed out.
    end: Option<Piece>,
}

impl Output {
    /// Submit `gen`; generation stops before the first of `stops`.
    pub fn start(engine: &dyn Engine, gen: GenRequest, stops: Vec<String>) -> Result<Output, ApiError> {
        let prompt_tokens = gen.prompt.len();
        let events = engine.submit(gen).map_err(|e| match e {
            SubmitError::QueueFull => ApiError::queue_full(),
            SubmitError::Closed => ApiError::unavailable(),
        })?;
        Ok(Output { events: Some(events), stops: StopMatcher::new(stops), prompt_tokens, tokens: 0, end: None })
    }

    /// The next piece; `None` after the end or an error.
    pub async fn next(&mut self) -> Option<Piece> {
        loop {
            let Some(events) = &mut self.events else {
                return self.end.take();
            };
            let (text, end) = match events.next().await {
                Some(Event::Token { text, .. }) => {
                    self.tokens += 1;
                    match self.stops.push(&text) {
                        Step::Emit(t) => (t, None),
                        Step::Stop(t) => {
                            let usage = Usage::new(self.prompt_tokens, self.tokens);
                            (t, Some(Piece::End { finish_reason: FinishReason::Stop, usage }))
                        }
                    }
                }
                Some(Event::Done { finish_reason, usage, text }) => match self.stops.push(&text) {
                    Step::Emit(mut t) => {
                        t.push_str(&self.stops.finish());
                        (t, Some(Piece::End { finish_reason, usage }))
                    }
                    Step::Stop(t) => (t, Some(Piece::End { finish_reason: FinishReason::Stop, usage })),
                },
                Some(Event::Error(msg)) => (String::new(), Some(Piece::Error(msg))),
                None => (String::new(), Some(Piece::Error("the engine dropped the request".into()))),
            };
            if end.is_some() {
                // the request is over; cancel it if the engine is still at it
                self.events = None;
                self.end = end;
            }
            if !text.is_empty() {
                return Some(Piece::Text(text));
            }
        }
    }
}
