//! `GET /metrics`: Prometheus text whose counters and histograms move with
//! the requests served, reachable without the API key.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::sse::stream;
use common::{get, post, request, start, Resp};
use fusebox_server::ServerOptions;
use serde_json::json;

/// Every sample of the exposition: `name{labels}` to its value. Checks that
/// each line is a comment or `name[{labels}] value`.
fn samples(r: &Resp) -> HashMap<String, f64> {
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let mut out = HashMap::new();
    for line in r.body.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let name_end = key.find('{').unwrap_or(key.len());
        let name = &key[..name_end];
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line:?}");
        assert!(name_end == key.len() || key.ends_with('}'), "{line:?}");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line:?}"));
        out.insert(key.to_string(), v);
    }
    out
}

fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    samples(&get(addr, "/metrics"))
}

fn at(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no sample {key}: {m:#?}"))
}

#[test]
fn counters_and_histograms_move_with_requests() {
    let addr = start(ServerOptions::default());
    let before = get(addr, "/metrics");
    let m = samples(&before);
    assert_eq!(at(&m, "fusebox_generated_tokens_total"), 0.0);
    assert_eq!(at(&m, "fusebox_queue_depth"), 0.0);

    let body = json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0});
    let v = post(addr, "/v1/completions", &body).json();
    let (prompt, generated) =
        (v["usage"]["prompt_tokens"].as_f64().unwrap(), v["usage"]["completion_tokens"].as_f64().unwrap());
    assert!(generated >= 2.0, "{v}");
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": true,
                      "temperature": 0, "stream_options": {"include_usage": true}});
    let chunks = stream(addr, "/v1/chat/completions", &chat);
    assert_eq!(chunks.last(), Some(&json!("[DONE]")));
    get(addr, "/no-such-route");

    let after = get(addr, "/metrics");
    for name in [
        "fusebox_requests_total",
        "fusebox_request_duration_seconds",
        "fusebox_prompt_tokens_total",
        "fusebox_generated_tokens_total",
        "fusebox_queue_depth",
        "fusebox_running_requests",
        "fusebox_time_to_first_token_seconds",
        "fusebox_inter_token_latency_seconds",
    ] {
        assert!(after.body.contains(&format!("# TYPE {name} ")), "{name} missing:\n{}", after.body);
    }
    let m = samples(&after);
    assert_eq!(at(&m, r#"fusebox_requests_total{endpoint="/v1/completions",status="200"}"#), 1.0);
    assert_eq!(at(&m, r#"fusebox_requests_total{endpoint="/v1/chat/completions",status="200"}"#), 1.0);
    assert_eq!(at(&m, r#"fusebox_requests_total{endpoint="other",status="404"}"#), 1.0);
    assert_eq!(at(&m, r#"fusebox_requests_total{endpoint="/metrics",status="200"}"#), 1.0);
    // the stream is timed to its end: both generation requests are in
    for e in ["/v1/completions", "/v1/chat/completions"] {
        assert_eq!(at(&m, &format!(r#"fusebox_request_duration_seconds_count{{endpoint="{e}"}}"#)), 1.0);
        assert_eq!(at(&m, &format!(r#"fusebox_request_duration_seconds_bucket{{endpoint="{e}",le="+Inf"}}"#)), 1.0);
    }
    let chat_usage = &chunks[chunks.len() - 2]["usage"];
    let chat_generated = chat_usage["completion_tokens"].as_f64().unwrap();
    assert!(chat_generated >= 1.0, "{chat_usage}");
    let gen_total = at(&m, "fusebox_generated_tokens_total");
    assert_eq!(gen_total, generated + chat_generated);
    let prompt_total = prompt + chat_usage["prompt_tokens"].as_f64().unwrap();
    assert_eq!(at(&m, "fusebox_prompt_tokens_total"), prompt_total);
    assert_eq!(at(&m, "fusebox_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(at(&m, "fusebox_inter_token_latency_seconds_count"), gen_total - 2.0);
    assert!(at(&m, "fusebox_time_to_first_token_seconds_sum") > 0.0);
    assert_eq!(at(&m, r#"fusebox_time_to_first_token_seconds_bucket{le="+Inf"}"#), 2.0);
    // the worker leaves a request after its last event reaches the client:
    // the gauges settle a moment later (bounded wait)
    let mut m = m;
    for _ in 0..200 {
        if at(&m, "fusebox_running_requests") == 0.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        m = samples(&get(addr, "/metrics"));
    }
    assert_eq!(at(&m, "fusebox_queue_depth"), 0.0);
    assert_eq!(at(&m, "fusebox_running_requests"), 0.0);
}

#[test]
fn metrics_need_no_api_key() {
    let addr = start(ServerOptions { api_key: Some("sekret".into()) });
    let m = metrics(addr);
    assert_eq!(at(&m, "fusebox_generated_tokens_total"), 0.0);
    request(addr, "GET", "/v1/models", &[], None).error(401);
    let m = metrics(addr);
    assert_eq!(at(&m, r#"fusebox_requests_total{endpoint="/v1/models",status="401"}"#), 1.0);
}

/// Load on loopback: 100 streaming clients at once, each reading its stream
/// to the end, then 50 that hang up after their first chunk. No errors,
/// every full stream ends with a finish reason and `[DONE]` and carries the
/// text its request gives alone (the batch does not change greedy output),
/// and afterwards every KV block is free again.
#[test]
fn a_hundred_concurrent_streams_complete_and_free_every_block() {
    use common::sse::{open, streamed_finish, streamed_text};
    use std::sync::Arc;
    let (worker, info) = common::worker(256);
    let addr = common::start_with(Arc::new(worker), info, ServerOptions::default());
    let body = |i: usize, n: usize| json!({"prompt": format!("Story number {}:", i % 4), "max_tokens": n, "temperature": 0, "stream": true});
    let alone: Vec<String> = (0..4).map(|i| streamed_text(&stream(addr, "/v1/completions", &body(i, 12)))).collect();
    let clients: Vec<_> =
        (0..100).map(|i| std::thread::spawn(move || stream(addr, "/v1/completions", &body(i, 12)))).collect();
    // the requests share steps: the batch holds several at once
    let mut widest = 0.0f64;
    while !clients.iter().all(|c| c.is_finished()) {
        widest = widest.max(at(&metrics(addr), "fusebox_batch_size"));
    }
    assert!(widest >= 2.0, "no step ran more than one request (widest batch seen: {widest})");
    for (i, c) in clients.into_iter().enumerate() {
        let chunks = c.join().unwrap();
        assert!(chunks.iter().all(|c| c.get("error").is_none()), "client {i}: {chunks:?}");
        assert_eq!(chunks.last(), Some(&json!("[DONE]")), "client {i}");
        assert!(streamed_finish(&chunks).is_some(), "client {i}: no finish reason");
        assert_eq!(streamed_text(&chunks), alone[i % 4], "client {i}: text differs from the request alone");
    }
    let quitters: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = open(addr, "/v1/completions", &body(i, 100));
                assert!(s.next_data().is_some(), "client {i}: no first chunk");
            })
        })
        .collect();
    for q in quitters {
        q.join().unwrap();
    }
    let t = std::time::Instant::now();
    loop {
        let m = metrics(addr);
        let (total, free) = (at(&m, "fusebox_kv_blocks_total"), at(&m, "fusebox_kv_blocks_free"));
        if total > 0.0 && free == total && at(&m, "fusebox_running_requests") == 0.0 {
            assert_eq!(at(&m, "fusebox_batch_size"), 0.0);
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "blocks still held: {free} of {total} free");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
