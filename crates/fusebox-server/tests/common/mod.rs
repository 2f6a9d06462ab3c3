//! Helpers shared by this crate's tests: a server on 127.0.0.1:0 with the
//! tiny-qwen3 fixture, and a minimal HTTP/1.1 client; server-sent events in
//! [`sse`], a scripted engine in [`script`].
#![allow(dead_code)]

pub mod script;
pub mod sse;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use anyhow::Result;
use fusebox_core::cpu::CpuBackend;
use fusebox_core::fixtures::fixture;
use fusebox_engine::{SamplingParams, Session};
use fusebox_models::Model;
use fusebox_server::{
    AppState, Engine, EngineStats, Events, GenRequest, Loaded, ModelInfo, ServerOptions, SubmitError, Worker,
};
use serde_json::Value;

pub const MODEL: &str = "tiny-qwen3";
pub const CTX: usize = 128;

/// A loader for the fixture on the CPU, for [`Worker::spawn`].
pub fn loader() -> impl FnOnce() -> Result<Loaded> + Send + 'static {
    loader_with(CTX)
}

/// A loader for the fixture with a context of `ctx` tokens (beyond the
/// fixture's 128 positions, for long generations).
pub fn loader_with(ctx: usize) -> impl FnOnce() -> Result<Loaded> + Send + 'static {
    move || {
        let backend = CpuBackend::new(1)?;
        let model = Model::load(&fixture(MODEL), &backend)?;
        Ok(Loaded::new(Box::new(backend), model, ctx))
    }
}

/// A worker running the fixture.
pub fn worker(max_queue: usize) -> (Worker, ModelInfo) {
    Worker::spawn(loader(), max_queue).expect("starting the worker")
}

/// A worker running the fixture with a context of `ctx` tokens and no EOS
/// token, so that a request runs to `max_tokens`: long enough to cancel.
pub fn long_worker(max_queue: usize, ctx: usize) -> (Arc<Worker>, ModelInfo) {
    let (w, mut info) = Worker::spawn(loader_with(ctx), max_queue).expect("starting the worker");
    info.eos_token_ids.clear();
    (Arc::new(w), info)
}

/// Wait up to `secs` seconds for `engine` to have nothing queued or running.
pub fn wait_idle(engine: &dyn Engine, secs: u64) -> EngineStats {
    let t = std::time::Instant::now();
    loop {
        let s = engine.stats();
        if s.queued == 0 && s.running == 0 {
            return s;
        }
        assert!(t.elapsed().as_secs() < secs, "the engine is still busy after {secs} s: {s:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Start a server on a free port; it runs until the test process ends.
pub fn start(options: ServerOptions) -> SocketAddr {
    let (worker, info) = worker(8);
    start_with(Arc::new(worker), info, options)
}

/// Start a server on a free port in front of `engine`.
pub fn start_with(engine: Arc<dyn Engine>, info: ModelInfo, options: ServerOptions) -> SocketAddr {
    let state = AppState::new(engine, info, options);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            fusebox_server::serve(listener, state).await.unwrap();
        });
    });
    rx.recv().expect("the server thread started")
}

/// An engine whose queue is always full.
pub struct Full;

impl Engine for Full {
    fn submit(&self, _: GenRequest) -> Result<Events, SubmitError> {
        Err(SubmitError::QueueFull)
    }
}

/// An HTTP response.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body is an OpenAI error object; returns it.
    pub fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string(), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        e.clone()
    }
}

/// One request on a fresh connection (`Connection: close`).
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().into(), v.trim().into())).collect();
    Resp { status, headers, body: body.to_string() }
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], None)
}

/// POST a JSON body.
pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, &[("Content-Type", "application/json")], Some(&body.to_string()))
}

/// The fixture's own greedy generation after `prompt`, stopping at its EOS
/// tokens: the reference the server must match.
pub fn engine_greedy(prompt: &[u32], n: usize) -> Vec<u32> {
    let be = CpuBackend::new(1).unwrap();
    let model = Model::load(&fixture(MODEL), &be).unwrap();
    // a session's own steps, independent of the engine the server runs
    let eos = model.eos_token_ids();
    let mut session = Session::new(&model.decoder, &be, CTX).unwrap();
    session.set_sampling(&SamplingParams::greedy()).unwrap();
    let mut out = vec![];
    let mut t = session.advance(prompt).unwrap();
    while !eos.contains(&t) && out.len() < n {
        out.push(t);
        if out.len() < n && prompt.len() + out.len() < CTX {
            t = session.decode(t).unwrap();
        } else {
            break;
        }
    }
    out
}

/// The fixture's tokenizer and chat template, on the CPU.
pub fn model() -> Model {
    let be = CpuBackend::new(1).unwrap();
    Model::load(&fixture(MODEL), &be).unwrap()
}
