//! Streamed responses (server-sent events) and stop strings, over HTTP:
//! against the tiny-qwen3 fixture, and against a scripted engine for exact
//! text pieces, errors and cancellation.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::script::{token, Script};
use common::sse::{open, stream, streamed_finish, streamed_text};
use common::{engine_greedy, model, post, start, CTX, MODEL};
use fusebox_server::{Event, FinishReason, ServerOptions};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// A server in front of `script`.
fn scripted(script: &Script) -> SocketAddr {
    let (_worker, info) = common::worker(1);
    common::start_with(Arc::new(script.clone()), info, ServerOptions::default())
}

/// The stream ends with `[DONE]`, and every chunk before it is one object
/// of one response: the same id, created and model.
fn check_envelope(chunks: &[Value], object: &str, id_prefix: &str) {
    assert_eq!(chunks.last(), Some(&json!("[DONE]")), "{chunks:?}");
    let body = &chunks[..chunks.len() - 1];
    assert!(!body.is_empty());
    let first = &body[0];
    assert!(first["id"].as_str().unwrap().starts_with(id_prefix), "{first}");
    assert!(first["created"].is_u64(), "{first}");
    for c in body {
        assert_eq!(c["object"], object, "{c}");
        assert_eq!(c["id"], first["id"], "{c}");
        assert_eq!(c["created"], first["created"], "{c}");
        assert_eq!(c["model"], MODEL, "{c}");
    }
}

#[test]
fn streamed_chat_equals_the_whole_answer_with_usage() {
    let addr = start(ServerOptions::default());
    let mut body = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 20, "temperature": 0,
    });
    let whole = post(addr, CHAT, &body).json();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream(addr, CHAT, &body);
    check_envelope(&chunks, "chat.completion.chunk", "chatcmpl-");
    let n = chunks.len();
    assert!(n >= 5, "{chunks:?}");
    // the role first, text deltas, an empty delta with the finish reason, the usage
    let (opening, rest) = chunks.split_first().unwrap();
    let (deltas, end) = rest.split_at(n - 4);
    let [finish, usage, _done] = end else { panic!("{chunks:?}") };
    assert_eq!(opening["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    for c in chunks.iter().take(n - 2) {
        assert!(c.get("usage").is_some_and(Value::is_null), "include_usage puts a null usage on every chunk: {c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1, "{c}");
        assert_eq!(c["choices"][0]["index"], 0);
    }
    for c in deltas {
        let choice = &c["choices"][0];
        assert!(choice["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{c}");
        assert!(choice["delta"].get("role").is_none(), "{c}");
        assert_eq!(choice["finish_reason"], Value::Null);
    }
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    assert_eq!(streamed_text(&chunks), whole["choices"][0]["message"]["content"].as_str().unwrap());
}

#[test]
fn streamed_completion_equals_the_whole_answer() {
    let addr = start(ServerOptions::default());
    let mut body = json!({"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0});
    let whole = post(addr, COMPLETIONS, &body).json();
    body["stream"] = json!(true);
    let chunks = stream(addr, COMPLETIONS, &body);
    check_envelope(&chunks, "text_completion", "cmpl-");
    let body = &chunks[..chunks.len() - 1];
    for c in body {
        assert!(c.get("usage").is_none(), "no usage without include_usage: {c}");
        assert_eq!(c["choices"][0]["index"], 0);
        assert!(c["choices"][0]["text"].is_string(), "{c}");
    }
    let last = &body[body.len() - 1]["choices"][0];
    assert_eq!(last["text"], "");
    assert_eq!(last["finish_reason"], whole["choices"][0]["finish_reason"]);
    assert!(body[..body.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(streamed_text(&chunks), whole["choices"][0]["text"].as_str().unwrap());
}

#[test]
fn stop_strings_cut_streamed_and_whole_answers_alike() {
    let addr = start(ServerOptions::default());
    let greedy = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0});
    let full = post(addr, COMPLETIONS, &greedy).json()["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 8, "{full:?}");
    let mid: String = chars[4..7].iter().collect();
    let start: String = chars[..2].iter().collect();
    for (stop, want) in [
        (json!(mid.clone()), &full[..full.find(&mid).unwrap()]),
        (json!(["never seen \u{1F980}", mid.clone()]), &full[..full.find(&mid).unwrap()]),
        (json!([start]), ""),
    ] {
        let mut body = greedy.clone();
        body["stop"] = stop.clone();
        let v = post(addr, COMPLETIONS, &body).json();
        assert_eq!(v["choices"][0]["text"], want, "stop {stop}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let chunks = stream(addr, COMPLETIONS, &body);
        assert_eq!(streamed_text(&chunks), want, "stop {stop}: {chunks:?}");
        assert_eq!(streamed_finish(&chunks).as_deref(), Some("stop"));
        assert_eq!(chunks[chunks.len() - 2]["usage"], v["usage"]);
    }
    // more than four stop strings, or an empty one, is refused before streaming
    let mut body = greedy.clone();
    body["stream"] = json!(true);
    body["stop"] = json!(["a", "b", "c", "d", "e"]);
    post(addr, COMPLETIONS, &body).error(400);
    body["stop"] = json!([""]);
    post(addr, COMPLETIONS, &body).error(400);
}

#[test]
fn a_full_context_ends_with_length() {
    let addr = start(ServerOptions::default());
    let m = model();
    let mut prompt = m.tokenizer.encode("Hello", true).unwrap();
    prompt.resize(CTX - 3, prompt[0]);
    let want = engine_greedy(&prompt, 3);
    let finish = if want.len() == 3 { "length" } else { "stop" };
    let body = json!({"prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let chunks = stream(addr, COMPLETIONS, &body);
    assert_eq!(streamed_finish(&chunks).as_deref(), Some(finish));
    assert_eq!(streamed_text(&chunks), m.tokenizer.decode(&want, true).unwrap());
    assert_eq!(chunks[chunks.len() - 2]["usage"]["completion_tokens"], want.len());
}

#[test]
fn a_stop_string_across_pieces_is_held_back_then_cancels() {
    // the engine never ends on its own (more tokens after the pieces until
    // cancelled): a script that ran out first left nothing to cancel when the
    // server fell behind, and the test failed on a loaded machine
    let pieces = ["Hel", "lo <", "/s", "> more", " text"].iter().map(|t| token(t)).collect();
    let script = Script::endless(pieces);
    let addr = scripted(&script);
    let body = json!({"messages": [{"role": "user", "content": "x"}], "stream": true, "stop": "</s>",
                      "stream_options": {"include_usage": true}});
    let chunks = stream(addr, CHAT, &body);
    let deltas: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    // the role chunk, "Hel", then "lo " with "<" held until it proved a stop
    assert_eq!(deltas, ["", "Hel", "lo "]);
    assert_eq!(streamed_finish(&chunks).as_deref(), Some("stop"));
    // usage counts the tokens drawn up to the stop, the last "> more" included
    let usage = &chunks[chunks.len() - 2]["usage"];
    assert_eq!(usage["completion_tokens"], 4, "{usage}");
    assert_eq!(usage["total_tokens"], usage["prompt_tokens"].as_u64().unwrap() + 4);
    assert!(script.cancelled(), "the request goes on after its stop string");
}

#[test]
fn a_held_prefix_that_does_not_stop_is_sent() {
    let script = Script::pieces(&["caf", "é <", "/", "x", "é"], FinishReason::Length);
    let addr = scripted(&script);
    let body = json!({"prompt": "x", "stream": true, "stop": ["</s>", "éé"]});
    let chunks = stream(addr, COMPLETIONS, &body);
    let texts: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(texts, ["caf", "é ", "</x", "é", ""]);
    assert_eq!(streamed_finish(&chunks).as_deref(), Some("length"));
    // and the same whole
    let mut body = body;
    body["stream"] = json!(false);
    let v = post(addr, COMPLETIONS, &body).json();
    assert_eq!(v["choices"][0]["text"], "café </xé");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[test]
fn an_error_after_the_stream_started_is_an_error_chunk() {
    let script = Script::new(vec![token("partial"), Event::Error("the model broke".into())]);
    let addr = scripted(&script);
    let body = json!({"messages": [{"role": "user", "content": "x"}], "stream": true});
    let chunks = stream(addr, CHAT, &body);
    assert_eq!(streamed_text(&chunks), "partial");
    let last = chunks.last().unwrap();
    assert_eq!(last["error"]["message"], "the model broke", "{chunks:?}");
    assert_eq!(last["error"]["type"], "server_error");
    assert!(!chunks.contains(&json!("[DONE]")));
    // not streaming, the same failure is a 500
    let e = post(addr, CHAT, &json!({"messages": [{"role": "user", "content": "x"}]})).error(500);
    assert_eq!(e["message"], "the model broke");
}

#[test]
fn errors_before_the_stream_are_plain_json() {
    let (_worker, info) = common::worker(1);
    let addr = common::start_with(Arc::new(common::Full), info, ServerOptions::default());
    let r = post(addr, COMPLETIONS, &json!({"prompt": "x", "stream": true}));
    assert_eq!(r.error(429)["code"], "queue_full");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let e = post(addr, CHAT, &json!({"model": "other", "messages": [], "stream": true})).error(400);
    assert_eq!(e["code"], "model_not_found");
}

#[test]
fn chunks_arrive_as_generated_and_a_closed_stream_cancels() {
    let script = Script::endless(vec![token("go")]);
    let addr = scripted(&script);
    let mut sse = open(addr, COMPLETIONS, &json!({"prompt": "x", "stream": true}));
    // an endless generation: these can only come while it runs
    for _ in 0..5 {
        let data = sse.next_data().expect("a chunk");
        let v: Value = serde_json::from_str(&data).unwrap();
        assert!(v["choices"][0]["text"].is_string(), "{v}");
    }
    drop(sse);
    assert!(script.cancelled(), "closing the connection did not cancel the request");
}

#[test]
fn ignore_eos_drops_the_stop_tokens() {
    let script = Script::pieces(&["a", "b"], FinishReason::Length);
    let addr = scripted(&script);
    let stop_ids = |extra: Value| {
        let mut body = json!({"prompt": "x", "max_tokens": 2});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        assert_eq!(post(addr, COMPLETIONS, &body).status, 200);
        script.last_request().expect("a request was submitted").stop_ids
    };
    assert!(!stop_ids(json!({})).is_empty(), "the model's EOS tokens stop a plain request");
    assert!(stop_ids(json!({"ignore_eos": true})).is_empty());
    assert!(!stop_ids(json!({"ignore_eos": false})).is_empty());
}

/// A stream of `n` choices: every chunk names its choice, each choice's
/// text is the non-streamed one's, each finishes once, then one usage chunk
/// and one `[DONE]`.
#[test]
fn n_streamed_choices_interleave_by_index() {
    let addr = start(ServerOptions::default());
    let body = |stream: bool| {
        json!({"prompt": "The sea", "max_tokens": 10, "temperature": 1.0, "seed": 3, "n": 3, "stream": stream,
               "stream_options": {"include_usage": true}})
    };
    let whole = post(addr, "/v1/completions", &body(false)).json();
    let chunks = stream(addr, "/v1/completions", &body(true));
    assert_eq!(chunks.last(), Some(&json!("[DONE]")));
    assert_eq!(chunks.iter().filter(|c| **c == json!("[DONE]")).count(), 1);
    let usage: Vec<&Value> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
    assert_eq!(usage.len(), 1, "{chunks:?}");
    assert_eq!(usage[0]["usage"], whole["usage"]);
    for i in 0..3 {
        let mine: Vec<Value> =
            chunks.iter().filter(|c| c["choices"].get(0).is_some_and(|ch| ch["index"] == i)).cloned().collect();
        assert_eq!(streamed_text(&mine), whole["choices"][i]["text"].as_str().unwrap(), "choice {i}");
        let finishes = mine.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count();
        assert_eq!(finishes, 1, "choice {i}");
        assert_eq!(streamed_finish(&mine).as_deref(), whole["choices"][i]["finish_reason"].as_str());
    }
}
