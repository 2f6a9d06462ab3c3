//! Graceful shutdown: the server stops accepting, the running and queued
//! requests end with an error, and serving returns promptly.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::sse::open;
use common::{long_worker, post};
use fusebox_engine::SamplingParams;
use fusebox_server::shutdown::{serve_until, GRACE};
use fusebox_server::{AppState, Engine, GenRequest, ServerOptions, SubmitError};
use serde_json::json;
use tokio::sync::oneshot;

const LONG_CTX: usize = 8192;
const LONG: usize = LONG_CTX - 64;

/// A server in front of `state` until `stop` fires; the thread ends when
/// serving returns.
fn serve(state: AppState) -> (SocketAddr, oneshot::Sender<()>, thread::JoinHandle<()>) {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let stop = async move {
                let _ = stop_rx.await;
            };
            serve_until(listener, state, stop).await.unwrap();
        });
    });
    (addr_rx.recv().unwrap(), stop_tx, server)
}

#[test]
fn shutdown_ends_running_and_queued_requests_and_returns() {
    let (worker, info) = long_worker(4, LONG_CTX);
    let prompt = info.tokenizer.encode("Hello", true).unwrap();
    let (addr, stop, server) = serve(AppState::new(worker.clone(), info, ServerOptions::default()));
    let body = json!({"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "stream": true});
    let mut sse = open(addr, "/v1/completions", &body);
    sse.next_data().expect("a chunk");
    // a second request joins (the batch, or the queue of a one-at-a-time worker)
    let waiting = thread::spawn(move || post(addr, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": LONG})));
    let t = Instant::now();
    while worker.stats().queued + worker.stats().running < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "the second request was not taken");
        thread::sleep(Duration::from_millis(5));
    }

    let t = Instant::now();
    stop.send(()).unwrap();
    // the stream ends with an error chunk, not [DONE]
    let rest = sse.all();
    let last = rest.last().unwrap();
    assert_eq!(last["error"]["message"], "the server is shutting down", "{rest:?}");
    assert!(!rest.contains(&json!("[DONE]")));
    // the second request is answered with an error
    let e = waiting.join().unwrap().error(500);
    assert_eq!(e["message"], "the server is shutting down");
    server.join().unwrap();
    assert!(t.elapsed() < GRACE, "shutting down took {:?}", t.elapsed());
    assert!(TcpStream::connect(addr).is_err(), "the server still accepts connections");
    let s = worker.stats();
    assert!(s.generated_tokens < LONG as u64 / 2, "{s:?}");
    // and the engine takes nothing more
    let req = GenRequest { prompt, max_tokens: 1, sampling: SamplingParams::greedy(), ..GenRequest::default() };
    assert_eq!(worker.submit(req).err(), Some(SubmitError::Closed));
}

#[test]
fn an_idle_server_stops_at_once() {
    let (worker, info) = common::worker(1);
    let (addr, stop, server) = serve(AppState::new(std::sync::Arc::new(worker), info, ServerOptions::default()));
    // an idle keep-alive connection does not hold it up
    let _idle = TcpStream::connect(addr).unwrap();
    assert_eq!(common::get(addr, "/health").status, 200);
    let t = Instant::now();
    stop.send(()).unwrap();
    server.join().unwrap();
    assert!(t.elapsed() < GRACE, "shutting down took {:?}", t.elapsed());
}
