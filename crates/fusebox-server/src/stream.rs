//! A streamed response: a request's output as server-sent events, one chunk
//! per piece of text as it comes, then the finish chunk, the usage chunk if
//! asked for, and `data: [DONE]`. With several choices (`n`), their chunks
//! interleave as they come, each with its `index`; the usage chunk (the
//! prompt counted once) and `[DONE]` follow the last choice's finish. An
//! error after the stream started is sent as `data: {"error": {...}}` and
//! ends the stream. Dropping the response (the client went away) drops the
//! [`Output`]s and so cancels the requests.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};

use crate::chunks::Chunks;
use crate::engine::Usage;
use crate::error::ApiError;
use crate::output::{Output, Piece};

struct State {
    /// The choices' pieces as they come, tagged with the choice's index;
    /// `None` once the stream has ended.
    pieces: Option<SelectAll<BoxStream<'static, (usize, Piece)>>>,
    chunks: Chunks,
    /// Choices not yet finished.
    left: usize,
    usage: Usage,
    /// Events ready to send.
    ready: VecDeque<String>,
}

/// One choice's pieces, to its end.
fn pieces(index: usize, out: Output) -> BoxStream<'static, (usize, Piece)> {
    stream::unfold(out, move |mut out| async move { out.next().await.map(|p| ((index, p), out)) }).boxed()
}

/// The server-sent-event response for the choices `outs`.
pub fn sse(outs: Vec<Output>, chunks: Chunks) -> Response {
    let ready = (0..outs.len()).filter_map(|i| chunks.opening(i)).collect();
    let left = outs.len();
    let all = stream::select_all(outs.into_iter().enumerate().map(|(i, o)| pieces(i, o)));
    let state = State { pieces: Some(all), chunks, left, usage: Usage::default(), ready };
    let events = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(data) = st.ready.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(data)), st));
            }
            let piece = st.pieces.as_mut()?.next().await;
            match piece {
                Some((i, Piece::Text(t, scored))) => st.ready.push_back(st.chunks.text(i, t, &scored)),
                Some((i, Piece::End { finish_reason, usage })) => {
                    st.ready.push_back(st.chunks.finish(i, finish_reason));
                    st.usage = Usage::new(usage.prompt_tokens, st.usage.completion_tokens + usage.completion_tokens);
                    st.left -= 1;
                    if st.left == 0 {
                        st.ready.extend(st.chunks.usage(st.usage));
                        st.ready.push_back("[DONE]".into());
                        st.pieces = None;
                    }
                }
                Some((_, Piece::Error(msg))) => {
                    st.ready.push_back(ApiError::internal(msg).body().to_string());
                    st.pieces = None;
                }
                None => st.pieces = None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
