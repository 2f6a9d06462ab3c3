//! Chat templates byte-identical to transformers' `apply_chat_template`, and
//! the real Qwen3 tokenizer's ids (when the assets are fetched).

use fusebox_core::fixtures::{asset_or_skip, fixture};
use fusebox_models::{ChatTemplate, Message, StreamDecoder, Tokenizer};
use serde_json::Value;

fn read(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn qwen3_template_is_byte_identical_to_transformers() {
    let dir = fixture("qwen3-chat");
    let t = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).unwrap().expect("has a template");
    let cases = read(&dir.join("cases.json"));
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let think = c["enable_thinking"].as_bool();
        let got = t.render(&msgs, c["add_generation_prompt"].as_bool().unwrap(), think).unwrap();
        assert_eq!(got, c["expected"].as_str().unwrap(), "case {}", c["name"]);
    }
}

#[test]
fn tiny_fixture_template_renders() {
    let t = ChatTemplate::from_tokenizer_config(&fixture("tiny-qwen3/tokenizer_config.json")).unwrap().unwrap();
    let s = t.render(&[Message::new("user", "Hello")], true, Some(false)).unwrap();
    assert_eq!(s, "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
}

#[test]
fn template_errors_are_reported_not_panicked() {
    let t = ChatTemplate::new("{{ raise_exception('only user and assistant roles') }}", "", "").unwrap();
    let e = t.render(&[Message::new("tool", "x")], true, None).unwrap_err();
    assert!(format!("{e:#}").contains("only user and assistant roles"), "{e:#}");
    assert!(ChatTemplate::new("{% if %}", "", "").is_err());
}

#[test]
fn real_qwen3_tokenizer_ids() {
    let Some(dir) = asset_or_skip("qwen3-tokenizer", "real_qwen3_tokenizer_ids") else {
        return;
    };
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let cases = read(&fixture("qwen3-chat/tokenize_cases.json"));
    for c in cases["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text);
    }
}

#[test]
fn stream_decoder_reassembles_multibyte_text() {
    let tok = Tokenizer::from_file(&fixture("tiny-qwen3/tokenizer.json")).unwrap();
    let text = "Grüße, 世界! The café is open.";
    let ids = tok.encode(text, false).unwrap();
    let mut s = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        if let Some(p) = s.push(&tok, id).unwrap() {
            assert!(!p.contains('\u{FFFD}'), "emitted a partial character: {p:?}");
            out.push_str(&p);
        }
    }
    if let Some(p) = s.flush(&tok).unwrap() {
        out.push_str(&p);
    }
    assert_eq!(out, text);
}
