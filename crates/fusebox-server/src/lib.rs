//! fusebox-server: an OpenAI-compatible HTTP API (`fusebox serve`).
//!
//! `GET /health`, `GET /metrics` (Prometheus), `GET /v1/models`,
//! `POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed
//! as server-sent events, with stop strings, usage and log-probabilities;
//! `POST /tokenize` and `POST /detokenize`; errors in OpenAI's shape; an
//! optional API key (on everything but /health and /metrics); graceful
//! shutdown. The handlers talk to an [`Engine`]; today that is a
//! [`Worker`]: one thread that owns the model and runs one request at a time
//! from a bounded queue.

pub mod auth;
mod batch_worker;
pub mod chunks;
pub mod collect;
pub mod engine;
pub mod error;
pub mod handlers;
pub mod json;
pub mod logprob_json;
pub mod logprobs;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod output;
pub mod panic;
pub mod penalties;
pub mod prepare;
pub mod shutdown;
pub mod state;
pub mod stop;
pub mod stream;
pub mod tokenize;
pub mod track;
pub mod worker;

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{middleware, Router};
use tokio::net::TcpListener;

pub use engine::{Engine, EngineStats, Event, Events, FinishReason, GenRequest, SubmitError, TokenLogprobs, Usage};
pub use model::{Batching, Loaded, MakeSpeculation, ModelInfo, SpecSetup};
pub use penalties::Penalties;
pub use state::{AppState, ServerOptions};
pub use worker::Worker;

/// The routes.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(handlers::models))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .merge(v1)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(json::MAX_BODY))
        .layer(middleware::from_fn(panic::catch_panic))
        .layer(middleware::from_fn_with_state(state.clone(), track::track))
        .with_state(state)
}

/// Serve on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, state: AppState) -> std::io::Result<()> {
    shutdown::serve_until(listener, state, std::future::pending()).await
}

/// Start a worker that loads the model with `load`, bind `host:port` and
/// serve until SIGINT or SIGTERM, then shut down gracefully (see
/// [`shutdown`]), blocking. Says on stderr what it serves and where.
pub fn run<F>(load: F, max_queue: usize, host: &str, port: u16, options: ServerOptions) -> Result<()>
where
    F: FnOnce() -> Result<Loaded> + Send + 'static,
{
    let (worker, info) = Worker::spawn(load, max_queue)?;
    let state = AppState::new(Arc::new(worker), info, options);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind((host, port)).await.with_context(|| format!("binding {host}:{port}"))?;
        let addr = listener.local_addr()?;
        let mut signals = shutdown::Signals::install().context("catching SIGINT and SIGTERM")?;
        let spec = state.info.speculation.as_ref().map(|s| format!(", speculative {s}")).unwrap_or_default();
        let spec = spec + &state.info.batching.as_ref().map(|s| format!(", batching {s}")).unwrap_or_default();
        eprintln!(
            "fusebox: serving {} ({}) on {} at http://{addr} (context {} tokens, queue {max_queue}{spec})",
            state.model_id,
            state.info.path.display(),
            state.info.device,
            state.info.ctx,
        );
        let stop = async move {
            signals.recv().await;
            eprintln!("fusebox: shutting down");
        };
        shutdown::serve_until(listener, state, stop).await.context("serving HTTP")?;
        eprintln!("fusebox: stopped");
        Ok(())
    })
}
