//! Reading a server-sent-event response off the wire as it arrives: HTTP/1.1
//! chunked framing undone, then `data:` payloads one event at a time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use serde_json::Value;

/// An open streamed response. Dropping it closes the connection.
pub struct SseReader {
    r: BufReader<TcpStream>,
    /// Body text not yet split into events.
    pending: String,
    ended: bool,
}

/// POST `body` to `path` and read the response head: it must be a 200 with
/// `Content-Type: text/event-stream`, sent chunked.
pub fn open(addr: SocketAddr, path: &str, body: &Value) -> SseReader {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    let status = head.split(' ').nth(1).unwrap_or_default();
    assert_eq!(status, "200", "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    SseReader { r, pending: String::new(), ended: false }
}

impl SseReader {
    /// The next event's data (its `data:` lines joined); `None` at the end
    /// of the body. Comments (keep-alives) are skipped.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.pending.find("\n\n") {
                let event: String = self.pending.drain(..at + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            if self.ended || !self.read_chunk() {
                assert!(self.pending.trim().is_empty(), "a partial event at the end: {:?}", self.pending);
                return None;
            }
        }
    }

    /// Every remaining payload, as JSON (`[DONE]` as the string "[DONE]").
    pub fn all(mut self) -> Vec<Value> {
        let mut v = vec![];
        while let Some(d) = self.next_data() {
            v.push(if d == "[DONE]" {
                Value::from(d)
            } else {
                serde_json::from_str(&d).unwrap_or_else(|e| panic!("not JSON ({e}): {d}"))
            });
        }
        v
    }

    /// Read one chunk of the body into `pending`; false at the last chunk.
    fn read_chunk(&mut self) -> bool {
        let mut size = String::new();
        if self.r.read_line(&mut size).unwrap() == 0 {
            self.ended = true;
            return false;
        }
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).expect("a chunk size");
        let mut data = vec![0; n + 2];
        self.r.read_exact(&mut data).unwrap();
        assert_eq!(&data[n..], b"\r\n");
        data.truncate(n);
        self.pending.push_str(std::str::from_utf8(&data).expect("UTF-8 chunks"));
        if n == 0 {
            self.ended = true;
        }
        n > 0
    }
}

/// Stream a request to its end: every payload.
pub fn stream(addr: SocketAddr, path: &str, body: &Value) -> Vec<Value> {
    open(addr, path, body).all()
}

/// The text of streamed chunks: chat deltas' content or completions' text.
pub fn streamed_text(chunks: &[Value]) -> String {
    let mut s = String::new();
    for c in chunks {
        let Some(choice) = c["choices"].get(0) else { continue };
        if let Some(t) = choice["delta"]["content"].as_str().or(choice["text"].as_str()) {
            s.push_str(t);
        }
    }
    s
}

/// The finish reason of streamed chunks (the last one that has one).
pub fn streamed_finish(chunks: &[Value]) -> Option<String> {
    chunks.iter().rev().find_map(|c| c["choices"].get(0)?["finish_reason"].as_str().map(String::from))
}
