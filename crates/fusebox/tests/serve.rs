//! `fusebox serve` as a process: it shuts down cleanly on SIGTERM and
//! SIGINT (exit 0, promptly, with a stream in flight too), and its --spec
//! flags decode speculatively with greedy answers unchanged.
#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fusebox_core::fixtures::fixture;
use serde_json::{json, Value};

/// A running `fusebox serve`; killed if the test ends without stopping it.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Its stderr so far.
    log: Arc<Mutex<String>>,
}

impl Server {
    /// `fusebox serve` on the tiny-qwen3 fixture on a free port, started
    /// once its startup line has named the address.
    fn start(extra: &[&str]) -> Server {
        let m = fixture("tiny-qwen3");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fusebox"))
            .args(["serve", "-m", m.to_str().unwrap(), "--device", "cpu", "--port", "0"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("run fusebox serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            log.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(rest) = line.split_once(" at http://").map(|(_, r)| r) {
                addr = Some(rest.split(' ').next().unwrap().parse().unwrap());
                break;
            }
        }
        let Some(addr) = addr else {
            let _ = child.kill();
            panic!("no startup line: {}", log.lock().unwrap());
        };
        let l = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                l.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Server { child, addr, log }
    }

    fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Wait up to `secs` seconds for the process to exit.
    fn wait(&mut self, secs: u64) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t.elapsed() > Duration::from_secs(secs) {
                let _ = self.child.kill();
                panic!("fusebox serve did not exit within {secs} s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POST `body` on a fresh connection; the response body's JSON (the
/// payloads' concatenated text for a streamed one).
fn post(addr: SocketAddr, path: &str, body: &Value) -> Value {
    let raw = String::from_utf8(send(addr, path, body)).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return serde_json::from_str(body).unwrap();
    }
    let mut text = String::new();
    for data in dechunk(body).lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data != "[DONE]" {
            let v: Value = serde_json::from_str(data).unwrap();
            let c = &v["choices"][0];
            text.push_str(c["text"].as_str().or(c["delta"]["content"].as_str()).unwrap_or_default());
        }
    }
    json!(text)
}

/// POST `body` on a fresh connection: the whole raw response.
fn send(addr: SocketAddr, path: &str, body: &Value) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = vec![];
    s.read_to_end(&mut raw).unwrap();
    raw
}

/// An HTTP/1.1 chunked body, undone.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

#[test]
fn sigterm_and_sigint_stop_an_idle_server_with_status_0() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut server = Server::start(&[]);
        let v = post(server.addr, "/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2}));
        assert_eq!(v["usage"]["completion_tokens"], 2);
        server.signal(sig);
        let status = server.wait(5);
        assert!(status.success(), "signal {sig}: {status:?}: {}", server.log());
        assert!(server.log().contains("shutting down"), "{}", server.log());
        assert!(TcpStream::connect(server.addr).is_err());
    }
}

#[test]
fn sigterm_with_a_stream_in_flight_ends_it_and_exits_0() {
    let mut server = Server::start(&[]);
    let addr = server.addr;
    let mut s = TcpStream::connect(addr).unwrap();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 120, "stream": true}).to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut first = [0; 256];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    server.signal(libc::SIGTERM);
    // the stream ends: in full ([DONE]) if it finished first, else with an error chunk
    let mut rest = vec![];
    s.read_to_end(&mut rest).unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("[DONE]") || rest.contains("the server is shutting down"), "{rest}");
    let status = server.wait(5);
    assert!(status.success(), "{status:?}: {}", server.log());
}

#[test]
fn speculative_servers_answer_as_a_plain_one() {
    let requests = [
        ("/v1/completions", json!({"prompt": "Hello Hello", "max_tokens": 48, "temperature": 0})),
        ("/v1/completions", json!({"prompt": "Hello Hello", "max_tokens": 48, "temperature": 0, "stream": true})),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hello"}], "temperature": 0})),
    ];
    let answers = |server: &Server| -> Vec<Value> {
        requests
            .iter()
            .map(|(path, body)| {
                let mut v = post(server.addr, path, body);
                if let Some(o) = v.as_object_mut() {
                    o.remove("id");
                    o.remove("created");
                }
                v
            })
            .collect()
    };
    let plain = answers(&Server::start(&[]));
    let draft = fixture("tiny-llama");
    for flags in [&["--spec", "ngram", "--spec-k", "3"][..], &["--draft", draft.to_str().unwrap()]] {
        let server = Server::start(flags);
        assert!(server.log().contains("speculative "), "{flags:?}: {}", server.log());
        assert_eq!(answers(&server), plain, "{flags:?}");
    }
}

#[test]
fn speculative_flag_errors_are_clear() {
    let m = fixture("tiny-qwen3");
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "-m", m.to_str().unwrap(), "--device", "cpu", "--port", "0"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_fusebox")).args(&args).output().unwrap()
    };
    for (extra, needle) in [
        (&["--spec", "draft"][..], "--spec draft needs --draft"),
        (&["--spec-k", "4"], "--spec ngram|draft|dflash"),
        (&["--spec", "ngram", "--spec-trace"], "--spec-trace"),
        (&["--draft", "/no/such/draft"], "/no/such/draft"),
    ] {
        let o = serve(extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}

#[test]
fn batching_sizes_are_on_the_startup_line_and_bad_ones_are_errors() {
    let s = Server::start(&["--max-seqs", "3", "--kv-blocks", "20"]);
    assert!(s.log().contains("batching up to 3 requests over 20 KV blocks of 16"), "{}", s.log());
    drop(s);
    let s = Server::start(&["--no-batching"]);
    assert!(!s.log().contains("batching"), "{}", s.log());
    drop(s);
    let m = fixture("tiny-qwen3");
    for (extra, needle) in [
        (&["--max-seqs", "0"][..], "--max-seqs"),
        (&["--max-batch-tokens", "0"], "--max-batch-tokens"),
        (&["--kv-blocks", "0"], "--kv-blocks"),
        (&["--kv-mem", "0"], "--kv-mem"),
        (&["--kv-blocks", "4", "--kv-mem", "1"], "--kv-mem"),
    ] {
        let mut args = vec!["serve", "-m", m.to_str().unwrap(), "--device", "cpu", "--port", "0"];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_fusebox")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{extra:?}: {err}");
    }
}
