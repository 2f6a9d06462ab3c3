//! Running a request to the end for a non-streaming response: the text, why
//! it ended and the token counts.

use crate::engine::{FinishReason, Usage};
use crate::error::ApiError;
use crate::output::{Output, Piece, Scored};

/// A finished generation.
pub struct Finished {
    pub text: String,
    /// The scores of its tokens (empty unless the request asked for them).
    pub scored: Vec<Scored>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// Gather `out` to its end.
pub async fn collect(mut out: Output) -> Result<Finished, ApiError> {
    let (mut text, mut scored) = (String::new(), Vec::new());
    loop {
        match out.next().await {
            Some(Piece::Text(t, s)) => {
                text.push_str(&t);
                scored.extend(s);
            }
            Some(Piece::End { finish_reason, usage }) => return Ok(Finished { text, scored, finish_reason, usage }),
            Some(Piece::Error(msg)) => return Err(ApiError::internal(msg)),
            None => return Err(ApiError::internal("the request ended without an answer")),
        }
    }
}
