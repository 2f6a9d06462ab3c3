//! Middleware that counts every request by endpoint and status and times it
//! to the last byte of its response: a streamed body is timed until it ends
//! or the client goes away.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

use crate::metrics::Metrics;
use crate::state::AppState;

/// Count and time the request (routes are named by their pattern; every
/// unknown path is `other`).
pub async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let endpoint = req.extensions().get::<MatchedPath>().map_or("other", |p| p.as_str()).to_string();
    let resp = next.run(req).await;
    st.metrics.request(&endpoint, resp.status().as_u16());
    let (parts, body) = resp.into_parts();
    let timed = TimedBody { inner: body, done: Some(Done { metrics: st.metrics.clone(), endpoint, start }) };
    Response::from_parts(parts, Body::new(timed))
}

/// What to record when the body ends.
struct Done {
    metrics: Arc<Metrics>,
    endpoint: String,
    start: Instant,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.metrics.duration(&self.endpoint, self.start.elapsed());
    }
}

/// A response body that records the request's duration when it has been
/// sent whole or is dropped.
struct TimedBody {
    inner: Body,
    done: Option<Done>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        // done: the end, or the last frame of a body that knows its end
        if matches!(r, Poll::Ready(None)) || (r.is_ready() && self.inner.is_end_stream()) {
            self.done = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
