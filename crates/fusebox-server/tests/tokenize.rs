//! `POST /tokenize` and `POST /detokenize`, as vLLM has them.

mod common;

use common::{model, post, request, start, CTX, MODEL};
use fusebox_models::Message;
use fusebox_server::ServerOptions;
use serde_json::json;

#[test]
fn tokenize_a_prompt_and_back() {
    let addr = start(ServerOptions::default());
    let m = model();
    let text = "The quick brown fox";
    let want = m.tokenizer.encode(text, true).unwrap();
    let v = post(addr, "/tokenize", &json!({"model": MODEL, "prompt": text})).json();
    assert_eq!(v["tokens"], json!(want), "{v}");
    assert_eq!(v["count"], want.len());
    assert_eq!(v["max_model_len"], CTX);
    assert!(v["token_strs"].is_null(), "{v}");
    let v = post(addr, "/tokenize", &json!({"prompt": text, "add_special_tokens": false, "return_token_strs": true}))
        .json();
    let plain = m.tokenizer.encode(text, false).unwrap();
    assert_eq!(v["tokens"], json!(plain));
    let strs: Vec<String> = plain.iter().map(|&t| m.tokenizer.id_to_token(t).unwrap()).collect();
    assert_eq!(v["token_strs"], json!(strs));
    // and back
    let back = post(addr, "/detokenize", &json!({"model": MODEL, "tokens": v["tokens"]})).json();
    assert_eq!(back, json!({"prompt": text}));
}

#[test]
fn tokenize_messages_through_the_template() {
    let addr = start(ServerOptions::default());
    let m = model();
    let tmpl = m.chat_template.as_ref().unwrap();
    let msgs = [Message::new("user", "Hello there")];
    let body = json!({"messages": [{"role": "user", "content": "Hello there"}]});
    let v = post(addr, "/tokenize", &body).json();
    let want = m.tokenizer.encode(&tmpl.render(&msgs, true, None).unwrap(), false).unwrap();
    assert_eq!(v["tokens"], json!(want), "{v}");
    let mut body = body;
    body["add_generation_prompt"] = json!(false);
    body["chat_template_kwargs"] = json!({"enable_thinking": false});
    let v = post(addr, "/tokenize", &body).json();
    let want = m.tokenizer.encode(&tmpl.render(&msgs, false, Some(false)).unwrap(), false).unwrap();
    assert_eq!(v["tokens"], json!(want), "{v}");
}

#[test]
fn bad_tokenize_requests_are_400() {
    let addr = start(ServerOptions::default());
    let e = post(addr, "/detokenize", &json!({"tokens": [1, 100000]})).error(400);
    assert_eq!(e["param"], "tokens");
    assert!(e["message"].as_str().unwrap().contains("100000"), "{e}");
    post(addr, "/detokenize", &json!({"tokens": [-1]})).error(400);
    post(addr, "/detokenize", &json!({"tokens": "abc"})).error(400);
    post(addr, "/tokenize", &json!({})).error(400);
    post(addr, "/tokenize", &json!({"prompt": "x", "messages": [{"role": "user", "content": "x"}]})).error(400);
    post(addr, "/tokenize", &json!({"messages": []})).error(400);
    let e = post(addr, "/tokenize", &json!({"model": "other", "prompt": "x"})).error(400);
    assert_eq!(e["code"], "model_not_found");
}

#[test]
fn tokenize_needs_the_api_key() {
    let addr = start(ServerOptions { api_key: Some("sekret".into()) });
    for path in ["/tokenize", "/detokenize"] {
        let e = request(addr, "POST", path, &[], Some(r#"{"prompt": "x", "tokens": [1]}"#)).error(401);
        assert_eq!(e["code"], "invalid_api_key");
    }
    let r = request(addr, "POST", "/tokenize", &[("Authorization", "Bearer sekret")], Some(r#"{"prompt": "x"}"#));
    assert_eq!(r.status, 200, "{}", r.body);
}
