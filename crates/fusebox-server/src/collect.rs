//! Running a request to the end for a non-streaming response: the text, why
//! it ended and the token counts.

use crate::engine::{FinishReason, Usage};
use crate::error::ApiError;
use crate::output::{Output, Piece};

/// A finished generation.
pub struct Finished {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// Gather `out` to its end.
pub async fn collect(mut out: Output) -> Result<Finished, ApiError> {
    let mut text = String::new();
    loop {
        match out.next().await {
            Some(Piece::Text(t)) => text.push_str(&t),
            Some(Piece::End { finish_reason, usage }) => return Ok(Finished { text, finish_reason, usage }),
            Some(Piece::Error(msg)) => return Err(ApiError::internal(msg)),
            None => return Err(ApiError::internal("the request ended without an answer")),
        }
    }
}
