//! Graceful shutdown. On SIGINT (Ctrl-C) or SIGTERM the server stops
//! accepting connections, the engine ends the running and queued requests
//! (each gets an error: a 500, or an error chunk in a stream), and the server
//! waits up to [`GRACE`] for open connections to finish before it returns.

use std::future::{pending, Future, IntoFuture};
use std::io;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::state::AppState;

/// How long open connections get to finish once shutdown has begun.
pub const GRACE: Duration = Duration::from_secs(3);

/// The shutdown signals, caught from the moment they are installed.
pub struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Catch SIGINT and SIGTERM from now on (inside a Tokio runtime).
    pub fn install() -> io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Wait for the first of them.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            pending::<()>().await
        }
    }
}

/// Serve on `listener` until `stop` resolves, then shut down: stop
/// accepting, close the engine, and wait up to [`GRACE`] for connections.
pub async fn serve_until<F>(listener: TcpListener, state: AppState, stop: F) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let engine = state.engine.clone();
    let (begun_tx, begun) = oneshot::channel::<()>();
    let shutdown = async move {
        stop.await;
        engine.close();
        let _ = begun_tx.send(());
    };
    let server = axum::serve(listener, crate::router(state)).with_graceful_shutdown(shutdown).into_future();
    let deadline = async {
        match begun.await {
            Ok(()) => tokio::time::sleep(GRACE).await,
            Err(_) => pending().await,
        }
    };
    tokio::select! {
        r = server => r,
        () = deadline => Ok(()),
    }
}
