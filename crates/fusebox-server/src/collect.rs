//! Running a request to the end for a non-streaming response: the text, why
//! it ended and the token counts, with stop strings applied.

use crate::error::ApiError;
use crate::worker::{Engine, Event, FinishReason, GenRequest, SubmitError, Usage};

/// A finished generation.
pub struct Finished {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// Run `gen` to the end, or until the text holds one of `stops` (then the
/// text ends before it and the request is cancelled).
pub async fn collect(engine: &dyn Engine, gen: GenRequest, stops: &[String]) -> Result<Finished, ApiError> {
    let prompt_tokens = gen.prompt.len();
    let mut events = engine.submit(gen).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::queue_full(),
        SubmitError::Closed => ApiError::unavailable(),
    })?;
    let (mut text, mut n) = (String::new(), 0);
    loop {
        match events.next().await {
            Some(Event::Token { text: piece, .. }) => {
                n += 1;
                text.push_str(&piece);
                if let Some(at) = find_stop(&text, stops) {
                    text.truncate(at);
                    events.cancel();
                    return Ok(Finished {
                        text,
                        finish_reason: FinishReason::Stop,
                        usage: Usage::new(prompt_tokens, n),
                    });
                }
            }
            Some(Event::Done { finish_reason, usage, text: rest }) => {
                text.push_str(&rest);
                if let Some(at) = find_stop(&text, stops) {
                    text.truncate(at);
                    return Ok(Finished { text, finish_reason: FinishReason::Stop, usage });
                }
                return Ok(Finished { text, finish_reason, usage });
            }
            Some(Event::Error(msg)) => return Err(ApiError::internal(msg)),
            None => return Err(ApiError::internal("the engine dropped the request")),
        }
    }
}

/// Where the first of `stops` starts in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}
