//! A client that goes away has its request cancelled: streaming or not,
//! running or still queued; the worker stops and serves the next request.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::script::{token, Script};
use common::sse::open;
use common::{long_worker, post, wait_idle};
use fusebox_server::{Engine, Event, GenRequest, ServerOptions};
use serde_json::{json, Value};

/// A context far beyond what a test waits for: a request for all of it
/// runs for many seconds unless it is cancelled.
const LONG_CTX: usize = 8192;
const LONG: usize = LONG_CTX - 64;

/// Send a POST without reading the answer; dropping the stream hangs up.
fn post_unread(addr: SocketAddr, path: &str, body: &Value) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    s
}

/// Wait up to 10 seconds for `engine` to have started `n` requests.
fn wait_started(engine: &dyn Engine, n: u64) {
    let t = std::time::Instant::now();
    while engine.stats().started < n {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", engine.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_client_waiting_for_a_whole_answer_that_hangs_up_cancels() {
    let script = Script::endless(vec![token("go")]);
    let (_worker, info) = common::worker(1);
    let addr = common::start_with(Arc::new(script.clone()), info, ServerOptions::default());
    let conn = post_unread(addr, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}]}));
    std::thread::sleep(Duration::from_millis(50));
    drop(conn);
    assert!(script.cancelled(), "hanging up did not cancel the request");
}

#[test]
fn the_worker_stops_when_a_stream_is_closed_and_serves_the_next_request() {
    let (worker, info) = long_worker(4, LONG_CTX);
    let addr = common::start_with(worker.clone(), info, ServerOptions::default());
    let body = json!({"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "stream": true});
    let mut sse = open(addr, "/v1/completions", &body);
    for _ in 0..3 {
        sse.next_data().expect("a chunk");
    }
    drop(sse);
    let s = wait_idle(&*worker, 20);
    assert_eq!(s.started, 1);
    assert!(s.generated_tokens < LONG as u64 / 2, "the worker ran on after the client left: {s:?}");
    // the same for a client waiting for the whole answer
    let conn = post_unread(addr, "/v1/completions", &json!({"prompt": "Once upon a time", "max_tokens": LONG}));
    wait_started(&*worker, 2);
    drop(conn);
    let before = s.generated_tokens;
    let s = wait_idle(&*worker, 20);
    assert_eq!(s.started, 2);
    assert!(s.generated_tokens - before < LONG as u64 / 2, "the worker ran on after the client left: {s:?}");
    // and the next request is answered in full
    let r = post(addr, "/v1/completions", &json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
}

#[test]
fn a_request_cancelled_while_queued_is_skipped() {
    let (w, info) = long_worker(4, LONG_CTX);
    let prompt = info.tokenizer.encode("Hello", true).unwrap();
    let req = |n| GenRequest { prompt: prompt.clone(), max_tokens: n, ..GenRequest::default() };
    let mut running = w.submit(req(LONG)).unwrap();
    assert!(matches!(running.blocking_next(), Some(Event::Token { .. })));
    let queued = w.submit(req(LONG)).unwrap();
    assert_eq!(w.stats().queued, 1);
    drop(queued);
    drop(running);
    let s = wait_idle(&*w, 20);
    assert_eq!(s.started, 1, "the cancelled queued request ran: {s:?}");
    assert!(s.generated_tokens < LONG as u64 / 2, "{s:?}");
    // the worker goes on with the next one
    let mut next = w.submit(req(3)).unwrap();
    let mut n = 0;
    while let Some(e) = next.blocking_next() {
        match e {
            Event::Token { .. } => n += 1,
            Event::Done { .. } => break,
            e => panic!("{e:?}"),
        }
    }
    assert_eq!(n, 3);
    assert_eq!(wait_idle(&*w, 20).started, 2);
}
