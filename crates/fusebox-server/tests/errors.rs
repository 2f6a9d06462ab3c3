//! Every error is an OpenAI error object (`{"error": {"message", "type",
//! "param", "code"}}`) with the right status, and none stops the server.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use common::{get, post, request, start, Full, CTX};
use fusebox_server::{Engine, Events, GenRequest, ServerOptions, SubmitError};
use serde_json::{json, Value};

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

/// POST `body` and return the error object, checking its status.
fn error(addr: SocketAddr, path: &str, body: &Value, status: u16) -> Value {
    post(addr, path, body).error(status)
}

/// The error names `param` and says so in its message.
fn names(e: &Value, param: &str) {
    assert_eq!(e["param"], param, "{e}");
    assert!(e["message"].as_str().unwrap().contains(param), "{e}");
    assert_eq!(e["type"], "invalid_request_error", "{e}");
}

#[test]
fn malformed_bodies_are_400() {
    let addr = start(ServerOptions::default());
    let json_ct = [("Content-Type", "application/json")];
    let e = request(addr, "POST", COMPLETIONS, &json_ct, Some("{\"prompt\": ")).error(400);
    assert!(e["message"].as_str().unwrap().contains("not valid JSON"), "{e}");
    assert_eq!(e["type"], "invalid_request_error");
    request(addr, "POST", COMPLETIONS, &json_ct, Some("[1, 2]")).error(400);
    request(addr, "POST", COMPLETIONS, &[], None).error(400);
    // any content type: the body is read as JSON
    let r = request(addr, "POST", COMPLETIONS, &[], Some(r#"{"prompt": "x", "max_tokens": 1}"#));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn wrong_types_and_missing_fields_name_the_field() {
    let addr = start(ServerOptions::default());
    names(&error(addr, COMPLETIONS, &json!({"prompt": "x", "max_tokens": "many"}), 400), "max_tokens");
    // fields of flattened structs too
    names(&error(addr, COMPLETIONS, &json!({"prompt": "x", "temperature": "hot"}), 400), "temperature");
    names(&error(addr, COMPLETIONS, &json!({"prompt": "x", "stream": "yes"}), 400), "stream");
    names(&error(addr, CHAT, &json!({"messages": [], "n": "two", "seed": 1}), 400), "n");
    names(&error(addr, COMPLETIONS, &json!({"prompt": "x", "max_tokens": -1}), 400), "max_tokens");
    names(&error(addr, COMPLETIONS, &json!({"prompt": {"text": "x"}}), 400), "prompt");
    names(&error(addr, CHAT, &json!({"messages": "hi"}), 400), "messages");
    let e = error(addr, CHAT, &json!({"messages": [{"role": "user", "content": 5}]}), 400);
    names(&e, "messages[0].content");
    // missing required fields
    let e = error(addr, COMPLETIONS, &json!({"max_tokens": 3}), 400);
    names(&e, "prompt");
    assert!(e["message"].as_str().unwrap().contains("missing"), "{e}");
    names(&error(addr, CHAT, &json!({"model": "tiny-qwen3"}), 400), "messages");
    names(&error(addr, CHAT, &json!({"messages": [{"content": "hi"}]}), 400), "messages[0].role");
}

#[test]
fn invalid_requests_are_400() {
    let addr = start(ServerOptions::default());
    // an unknown model
    let e = error(addr, COMPLETIONS, &json!({"model": "gpt-4", "prompt": "x"}), 400);
    assert_eq!(e["param"], "model");
    assert_eq!(e["code"], "model_not_found");
    assert!(e["message"].as_str().unwrap().contains("gpt-4"), "{e}");
    let e = error(addr, CHAT, &json!({"model": "nope", "messages": []}), 400);
    assert_eq!(e["code"], "model_not_found");
    // a prompt longer than the context: both lengths
    let long: Vec<u32> = vec![1; CTX + 5];
    let e = error(addr, COMPLETIONS, &json!({"prompt": long}), 400);
    assert_eq!(e["code"], "context_length_exceeded");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(&(CTX + 5).to_string()) && msg.contains(&CTX.to_string()), "{msg}");
    // empty messages, n out of range, best_of
    names(&error(addr, CHAT, &json!({"messages": []}), 400), "messages");
    let e = error(addr, COMPLETIONS, &json!({"prompt": "x", "n": 17}), 400);
    assert_eq!(e["param"], "n");
    assert!(e["message"].as_str().unwrap().contains("between 1 and 16"), "{e}");
    names(&error(addr, COMPLETIONS, &json!({"prompt": "x", "n": 0}), 400), "n");
    names(&error(addr, COMPLETIONS, &json!({"prompt": "x", "best_of": 2}), 400), "best_of");
    // tokens outside the vocabulary, empty prompts, bad sampling, unsupported options
    for body in [
        json!({"prompt": [100000]}),
        json!({"prompt": []}),
        json!({"prompt": ["a", "b"]}),
        json!({"prompt": "x", "temperature": -1}),
        json!({"prompt": "x", "top_p": 0}),
        json!({"prompt": "x", "echo": true}),
    ] {
        error(addr, COMPLETIONS, &body, 400);
    }
    let ok = post(addr, COMPLETIONS, &json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(ok.status, 200, "{}", ok.body);
}

#[test]
fn unknown_routes_and_methods_are_404_and_405() {
    let addr = start(ServerOptions::default());
    let e = get(addr, "/v1/nothing").error(404);
    assert_eq!(e["code"], "not_found");
    assert!(e["message"].as_str().unwrap().contains("/v1/nothing"));
    request(addr, "POST", "/nothing", &[], Some("{}")).error(404);
    let e = request(addr, "DELETE", "/health", &[], None).error(405);
    assert!(e["message"].as_str().unwrap().contains("DELETE"), "{e}");
    get(addr, COMPLETIONS).error(405);
}

#[test]
fn bodies_over_16_mib_are_413() {
    let addr = start(ServerOptions::default());
    // a declared length over the limit is refused before the body is sent
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST {COMPLETIONS} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        17 << 20
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    let body: Value = serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    // under it, a body larger than axum's default of 2 MB is read
    let pad = "a".repeat(3 << 20);
    let r = post(addr, COMPLETIONS, &json!({"prompt": "x", "max_tokens": 1, "padding": pad}));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn api_key_guards_v1() {
    let addr = start(ServerOptions { api_key: Some("sekret".into()) });
    assert_eq!(get(addr, "/health").status, 200);
    let e = get(addr, "/v1/models").error(401);
    assert_eq!(e["code"], "invalid_api_key");
    assert_eq!(e["type"], "invalid_request_error");
    for auth in ["Bearer wrong", "Bearer sekret2", "Bearer sekre", "Basic sekret", "sekret"] {
        let e = request(addr, "GET", "/v1/models", &[("Authorization", auth)], None).error(401);
        assert_eq!(e["code"], "invalid_api_key", "{auth}");
    }
    let e = request(addr, "POST", COMPLETIONS, &[("Authorization", "Bearer nope")], Some("{}")).error(401);
    assert_eq!(e["code"], "invalid_api_key");
    for auth in ["Bearer sekret", "bearer sekret"] {
        let r = request(addr, "GET", "/v1/models", &[("Authorization", auth)], None);
        assert_eq!(r.status, 200, "{auth}: {}", r.body);
    }
}

#[test]
fn a_full_queue_is_429_with_retry_after() {
    let (_worker, info) = common::worker(1);
    let addr = common::start_with(Arc::new(Full), info, ServerOptions::default());
    let r = post(addr, COMPLETIONS, &json!({"prompt": "x"}));
    let e = r.error(429);
    assert_eq!(e["code"], "queue_full");
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(r.header("retry-after"), Some("1"));
}

/// An engine that panics on every request.
struct Panics;

impl Engine for Panics {
    fn submit(&self, _: GenRequest) -> Result<Events, SubmitError> {
        panic!("the engine broke")
    }
}

#[test]
fn a_panic_is_a_500_for_that_request_only() {
    let (_worker, info) = common::worker(1);
    let addr = common::start_with(Arc::new(Panics), info, ServerOptions::default());
    for _ in 0..3 {
        let e = post(addr, CHAT, &json!({"messages": [{"role": "user", "content": "x"}]})).error(500);
        assert_eq!(e["type"], "server_error");
        assert!(e["message"].as_str().unwrap().contains("the engine broke"), "{e}");
        assert_eq!(get(addr, "/health").status, 200);
        assert_eq!(get(addr, "/v1/models").status, 200);
    }
}
