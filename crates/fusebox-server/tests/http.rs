//! The HTTP API against a server on 127.0.0.1:0 running the tiny-qwen3 fixture.

mod common;

use common::{engine_greedy, get, model, post, start, MODEL};
use fusebox_models::Message;

use fusebox_server::ServerOptions;
use serde_json::json;

#[test]
fn health_and_models() {
    let addr = start(ServerOptions::default());
    let r = get(addr, "/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));

    let v = get(addr, "/v1/models").json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    assert!(v["data"][0]["created"].is_u64());
    assert!(v["data"][0]["max_model_len"].as_u64().unwrap() > 0);
    assert!(v["data"][0]["device"].as_str().unwrap().starts_with("cpu"));
}

#[test]
fn greedy_completion_matches_the_engine() {
    let addr = start(ServerOptions::default());
    let m = model();
    let prompt = m.tokenizer.encode("The quick brown fox", true).unwrap();
    let n = 24;
    let want = engine_greedy(&prompt, n);
    let want_text = m.tokenizer.decode(&want, true).unwrap();
    let finish = if want.len() == n { "length" } else { "stop" };
    // token ids and text prompts alike
    for p in [json!(prompt), json!("The quick brown fox")] {
        let body = json!({"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0});
        let r = post(addr, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], MODEL);
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(v["choices"][0]["text"], want_text.as_str());
        assert_eq!(v["choices"][0]["finish_reason"], finish);
        assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
        assert_eq!(v["usage"]["completion_tokens"], want.len());
        assert_eq!(v["usage"]["total_tokens"], prompt.len() + want.len());
    }
}

#[test]
fn chat_completion_uses_the_template() {
    let addr = start(ServerOptions::default());
    let m = model();
    let msgs = [Message::new("system", "Be brief."), Message::new("user", "Hello there")];
    let text = m.chat_template.as_ref().unwrap().render(&msgs, true, None).unwrap();
    let prompt = m.tokenizer.encode(&text, false).unwrap();
    let want = engine_greedy(&prompt, 12);
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
        "max_completion_tokens": 12, "temperature": 0,
    });
    let v = post(addr, "/v1/chat/completions", &body).json();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], m.tokenizer.decode(&want, true).unwrap().as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], want.len());
}

#[test]
fn seeded_sampling_repeats_and_stop_strings_cut() {
    let addr = start(ServerOptions::default());
    let body = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 7});
    let a = post(addr, "/v1/completions", &body).json();
    let b = post(addr, "/v1/completions", &body).json();
    assert_eq!(a["choices"], b["choices"]);

    let greedy = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0});
    let full = post(addr, "/v1/completions", &greedy).json()["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    let stop: String = chars[3..5].iter().collect();
    let mut body = greedy.clone();
    body["stop"] = json!(stop.clone());
    let v = post(addr, "/v1/completions", &body).json();
    assert_eq!(v["choices"][0]["text"], &full[..full.find(&stop).unwrap()], "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

/// `n` choices: greedy ones are all the single answer; seeded sampled ones
/// are choice i of seed s = the single answer of seed s + i; the usage
/// counts the prompt once and every choice's tokens.
#[test]
fn n_choices_are_n_requests() {
    let addr = start(ServerOptions::default());
    let one = |seed: u64, temperature: f64| {
        let body = json!({"prompt": "Once upon", "max_tokens": 12, "temperature": temperature, "seed": seed});
        post(addr, "/v1/completions", &body).json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    for temperature in [0.0, 1.0] {
        let body = json!({"prompt": "Once upon", "max_tokens": 12, "temperature": temperature, "seed": 7, "n": 3});
        let r = post(addr, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3);
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            assert_eq!(c["text"], one(7 + i as u64, temperature).as_str(), "choice {i} at temperature {temperature}");
        }
        let usage = &v["usage"];
        assert_eq!(
            usage["total_tokens"],
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
        assert_eq!(usage["completion_tokens"], 36, "three choices of 12 tokens (no EOS in 12 at these seeds)");
    }
    // chat, the same
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0, "n": 2});
    let v = post(addr, "/v1/chat/completions", &body).json();
    let c = v["choices"].as_array().unwrap();
    assert_eq!((c.len(), &c[0]["message"], &c[1]["index"]), (2, &c[1]["message"], &json!(1)));
}
