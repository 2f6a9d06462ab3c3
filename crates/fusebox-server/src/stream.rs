//! A streamed response: a request's output as server-sent events, one chunk
//! per piece of text as it comes, then the finish chunk, the usage chunk if
//! asked for, and `data: [DONE]`. An error after the stream started is sent
//! as `data: {"error": {...}}` and ends the stream. Dropping the response
//! (the client went away) drops the [`Output`] and so cancels the request.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;

use crate::chunks::Chunks;
use crate::error::ApiError;
use crate::output::{Output, Piece};

struct State {
    /// `None` once the output has ended.
    out: Option<Output>,
    chunks: Chunks,
    /// Events ready to send.
    ready: VecDeque<String>,
}

/// The server-sent-event response for `out`.
pub fn sse(out: Output, chunks: Chunks) -> Response {
    let ready = chunks.opening().into_iter().collect();
    let state = State { out: Some(out), chunks, ready };
    let events = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(data) = st.ready.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(data)), st));
            }
            let piece = st.out.as_mut()?.next().await;
            match piece {
                Some(Piece::Text(t, scored)) => st.ready.push_back(st.chunks.text(t, &scored)),
                Some(Piece::End { finish_reason, usage }) => {
                    st.ready.push_back(st.chunks.finish(finish_reason));
                    st.ready.extend(st.chunks.usage(usage));
                    st.ready.push_back("[DONE]".into());
                    st.out = None;
                }
                Some(Piece::Error(msg)) => {
                    st.ready.push_back(ApiError::internal(msg).body().to_string());
                    st.out = None;
                }
                None => st.out = None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
