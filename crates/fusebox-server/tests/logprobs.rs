//! Log-probabilities (chat and completions, whole and streamed) and the
//! sampling parameters the host-driven loop honours: the same tokens with
//! and without log-probabilities, the reported values the log-softmax of
//! the model's raw logits, frequency and presence penalties.

mod common;

use std::net::SocketAddr;

use common::sse::{stream, streamed_text};
use common::{engine_greedy, model, post, start};
use fusebox_core::cpu::CpuBackend;
use fusebox_engine::generate::full_logits;
use fusebox_server::ServerOptions;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// The log-softmax of the fixture's logits after each of `ids`, by a
/// forward pass over all of them at once.
fn reference(ids: &[u32]) -> Vec<Vec<f64>> {
    let be = CpuBackend::new(1).unwrap();
    let m = model();
    let logits = full_logits(&m.decoder, &be, ids).unwrap();
    logits
        .chunks(m.decoder.cfg.vocab_size)
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
            row.iter().map(|&l| l as f64 - lse).collect()
        })
        .collect()
}

fn completion(addr: SocketAddr, extra: Value) -> Value {
    let mut body = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let r = post(addr, COMPLETIONS, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn completion_logprobs_are_the_raw_log_softmax() {
    let addr = start(ServerOptions::default());
    let plain = completion(addr, json!({}));
    let v = completion(addr, json!({"logprobs": 3}));
    // the same answer with and without log-probabilities
    assert_eq!(v["choices"][0]["text"], plain["choices"][0]["text"]);
    assert_eq!(v["usage"], plain["usage"]);
    assert!(plain["choices"][0]["logprobs"].is_null());
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[k].as_array().unwrap().len(), n, "{k}: {lp}");
    }
    // check against a forward pass over the prompt and the answer
    let m = model();
    let prompt = m.tokenizer.encode("Once upon a time", true).unwrap();
    let ids: Vec<u32> = post(addr, "/tokenize", &json!({"prompt": "Once upon a time"})).json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, prompt);
    let text = v["choices"][0]["text"].as_str().unwrap();
    let answer = engine_greedy(&prompt, 12);
    assert_eq!(answer.len(), n);
    let all: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
    let want = reference(&all);
    let text_chars = text.chars().count();
    let mut last_offset = 0;
    for i in 0..n {
        let row = &want[prompt.len() - 1 + i];
        let got = lp["token_logprobs"][i].as_f64().unwrap();
        assert!((got - row[answer[i] as usize]).abs() < 1e-3, "token {i}: {got} vs {}", row[answer[i] as usize]);
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3, "{top:?}");
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        // greedy: the drawn token is the most likely one
        assert!((best - got).abs() < 1e-6, "{best} {got}");
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        assert!((best - sorted[0]).abs() < 1e-3);
        let off = lp["text_offset"][i].as_u64().unwrap() as usize;
        assert!(off >= last_offset && off <= text_chars, "{lp}");
        last_offset = off;
    }
    assert_eq!(lp["text_offset"][0], 0);
    // streamed: the same values, spread over the chunks
    let chunks = stream(
        addr,
        COMPLETIONS,
        &json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
                                                    "logprobs": 3, "stream": true}),
    );
    assert_eq!(streamed_text(&chunks), text);
    let mut streamed = json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for c in &chunks {
        let Some(l) = c["choices"].get(0).map(|ch| &ch["logprobs"]).filter(|l| !l.is_null()) else { continue };
        for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            streamed[k].as_array_mut().unwrap().extend(l[k].as_array().unwrap().iter().cloned());
        }
    }
    assert_eq!(&streamed, lp);
}

#[test]
fn chat_logprobs_whole_and_streamed() {
    let addr = start(ServerOptions::default());
    let body = json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 16,
                      "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let v = post(addr, CHAT, &body).json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let items = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(items.len() as u64, v["usage"]["completion_tokens"].as_u64().unwrap());
    let mut bytes = vec![];
    for it in items {
        assert!(it["token"].is_string() && it["logprob"].as_f64().unwrap() <= 0.0, "{it}");
        bytes.extend(it["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8));
        let top = it["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{it}");
        assert_eq!(top[0]["token"], it["token"], "greedy draws the most likely: {it}");
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
    }
    // (the fixture's random weights draw invalid UTF-8 too)
    assert_eq!(String::from_utf8_lossy(&bytes), content, "the tokens' bytes spell the answer");
    // without: the same answer, no logprobs
    let mut plain = body.clone();
    plain.as_object_mut().unwrap().retain(|k, _| !k.contains("logprobs"));
    let p = post(addr, CHAT, &plain).json();
    assert_eq!(p["choices"][0]["message"]["content"], content);
    assert!(p["choices"][0]["logprobs"].is_null());
    // top_logprobs 0: the drawn token only
    let mut zero = body.clone();
    zero["top_logprobs"] = json!(0);
    let z = post(addr, CHAT, &zero).json();
    assert!(z["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().unwrap().is_empty());
    // streamed
    let mut s = body.clone();
    s["stream"] = json!(true);
    let chunks = stream(addr, CHAT, &s);
    assert_eq!(streamed_text(&chunks), content);
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed, items);
}

#[test]
fn seeded_sampling_is_the_same_with_logprobs() {
    let addr = start(ServerOptions::default());
    let sampled = json!({"temperature": 0.9, "top_p": 0.95, "top_k": 40, "min_p": 0.01, "seed": 11,
                         "repetition_penalty": 1.1, "max_tokens": 16});
    let a = completion(addr, sampled.clone());
    let mut with = sampled.clone();
    with["logprobs"] = json!(1);
    let b = completion(addr, with);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // zero penalties take the host-driven path too and change nothing
    let mut zero = sampled.clone();
    zero["frequency_penalty"] = json!(0.0);
    zero["presence_penalty"] = json!(0.0);
    assert_eq!(completion(addr, zero)["choices"][0]["text"], a["choices"][0]["text"]);
}

#[test]
fn frequency_and_presence_penalties_change_a_repetitive_answer() {
    let addr = start(ServerOptions::default());
    let base = json!({"prompt": "Hello Hello Hello Hello", "max_tokens": 40});
    let plain = completion(addr, base.clone());
    let m = model();
    let ids = m.tokenizer.encode(plain["choices"][0]["text"].as_str().unwrap(), false).unwrap();
    let distinct = |ids: &[u32]| ids.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct(&ids) < ids.len(), "the greedy answer repeats a token: {plain}");
    for pen in [json!({"frequency_penalty": 2.0}), json!({"presence_penalty": 2.0})] {
        let mut body = base.clone();
        body.as_object_mut().unwrap().extend(pen.as_object().unwrap().clone());
        let v = completion(addr, body);
        assert_ne!(v["choices"][0]["text"], plain["choices"][0]["text"], "{pen}");
        let got = m.tokenizer.encode(v["choices"][0]["text"].as_str().unwrap(), false).unwrap();
        assert!(distinct(&got) as f64 / got.len() as f64 > distinct(&ids) as f64 / ids.len() as f64, "{pen}: {v}");
    }
}

#[test]
fn bad_logprob_and_penalty_settings_are_400() {
    let addr = start(ServerOptions::default());
    let msgs = json!([{"role": "user", "content": "x"}]);
    for (path, body, param) in [
        (CHAT, json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        (CHAT, json!({"messages": msgs, "top_logprobs": 2}), "top_logprobs"),
        (CHAT, json!({"messages": msgs, "logprobs": 3}), "logprobs"),
        (COMPLETIONS, json!({"prompt": "x", "logprobs": 6}), "logprobs"),
        (COMPLETIONS, json!({"prompt": "x", "logprobs": true}), "logprobs"),
        (COMPLETIONS, json!({"prompt": "x", "frequency_penalty": 2.5}), "frequency_penalty"),
        (CHAT, json!({"messages": msgs, "presence_penalty": -3}), "presence_penalty"),
    ] {
        let e = post(addr, path, &body).error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    // logprobs false and top_logprobs 0 alone are fine
    let r = post(addr, CHAT, &json!({"messages": msgs, "logprobs": false, "top_logprobs": 0, "max_tokens": 1}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["choices"][0]["logprobs"].is_null());
}
