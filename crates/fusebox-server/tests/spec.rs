//! A worker that decodes speculatively (prompt lookup, or a draft model)
//! answers greedy requests exactly as a plain one does, whole and streamed.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use common::sse::{stream, streamed_text};
use common::{post, CTX};
use fusebox_core::cpu::CpuBackend;
use fusebox_core::fixtures::fixture;
use fusebox_core::Backend;
use fusebox_engine::{DraftModel, PromptLookup, SpecOptions, Speculation};
use fusebox_models::Model;
use fusebox_server::{Loaded, MakeSpeculation, ServerOptions, SpecSetup, Worker};
use serde_json::{json, Value};

struct Ngram;

impl MakeSpeculation for Ngram {
    fn make<'m>(&self, _: &'m Model, _: Option<&'m Model>, _: &'m dyn Backend, _: usize) -> Result<Speculation<'m>> {
        Ok(Speculation { options: SpecOptions { k: 4, trace: false }, proposer: Box::new(PromptLookup::new(3)?) })
    }
}

struct Draft;

impl MakeSpeculation for Draft {
    fn make<'m>(
        &self,
        target: &'m Model,
        draft: Option<&'m Model>,
        be: &'m dyn Backend,
        ctx: usize,
    ) -> Result<Speculation<'m>> {
        let d = DraftModel::new(target, draft.context("no draft model")?, be, ctx)?;
        Ok(Speculation { options: SpecOptions { k: 3, trace: false }, proposer: Box::new(d) })
    }
}

/// A DFlash draft for the fixture, counting how many were made.
struct Dflash(Arc<std::sync::atomic::AtomicUsize>);

impl MakeSpeculation for Dflash {
    fn make<'m>(
        &self,
        target: &'m Model,
        _: Option<&'m Model>,
        be: &'m dyn Backend,
        ctx: usize,
    ) -> Result<Speculation<'m>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let draft = fusebox_models::dflash::DFlashDraft::load(&fixture("tiny-dflash"), be)?;
        let d = fusebox_engine::DFlash::new(draft, &target.decoder, be, ctx)?;
        Ok(Speculation { options: SpecOptions { k: 3, trace: false }, proposer: Box::new(d) })
    }
}

/// A server on the fixture, speculating with `make` (and the `draft` fixture).
fn server(make: Box<dyn MakeSpeculation + Send>, draft: Option<&'static str>) -> (SocketAddr, Option<String>) {
    let load = move || {
        let backend = CpuBackend::new(1)?;
        let model = Model::load(&fixture(common::MODEL), &backend)?;
        let draft = draft.map(|d| Model::load(&fixture(d), &backend)).transpose()?;
        let mut loaded = Loaded::new(Box::new(backend), model, CTX);
        loaded.spec = Some(SpecSetup { draft, make });
        Ok(loaded)
    };
    let (worker, info) = Worker::spawn(load, 16).expect("starting the worker");
    assert!(info.batching.is_some(), "speculation runs in the batched worker");
    let spec = info.speculation.clone();
    (common::start_with(Arc::new(worker), info, ServerOptions::default()), spec)
}

/// Greedy answers of `addr`: completion and chat, whole and streamed.
fn answers(addr: SocketAddr) -> Vec<Value> {
    let mut out = vec![];
    for (path, mut body) in [
        ("/v1/completions", json!({"prompt": "Hello Hello Hello", "max_tokens": 48})),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hello Hello"}], "max_tokens": 40})),
    ] {
        body["temperature"] = json!(0);
        let v = post(addr, path, &body).json();
        let choice = &v["choices"][0];
        let text = choice["text"].as_str().or(choice["message"]["content"].as_str()).unwrap().to_string();
        body["stream"] = json!(true);
        let streamed = streamed_text(&stream(addr, path, &body));
        assert_eq!(streamed, text, "{path}: streamed and whole differ");
        out.push(json!({"text": text, "finish_reason": choice["finish_reason"], "usage": v["usage"]}));
    }
    out
}

#[test]
fn speculative_greedy_answers_equal_plain_ones() {
    let plain = answers(common::start(ServerOptions::default()));
    assert!(plain[0]["usage"]["completion_tokens"].as_u64().unwrap() > 8, "{plain:?}");
    let (ngram, desc) = server(Box::new(Ngram), None);
    assert_eq!(desc.as_deref(), Some("ngram k=4"));
    assert_eq!(answers(ngram), plain);
    // /metrics counts the drafts scored and accepted
    let text = common::get(ngram, "/metrics").body;
    let sample = |name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (drafted, accepted) =
        (sample("fusebox_spec_decode_draft_tokens_total "), sample("fusebox_spec_decode_accepted_tokens_total "));
    assert!(accepted > 0.0 && accepted <= drafted, "drafted {drafted}, accepted {accepted}");
    let (draft, desc) = server(Box::new(Draft), Some("tiny-llama"));
    assert_eq!(desc.as_deref(), Some("draft k=3"));
    assert_eq!(answers(draft), plain);
}

#[test]
fn a_speculation_that_cannot_be_made_fails_the_start() {
    let load = || {
        let backend = CpuBackend::new(1)?;
        let model = Model::load(&fixture(common::MODEL), &backend)?;
        let mut loaded = Loaded::new(Box::new(backend), model, CTX);
        loaded.spec = Some(SpecSetup { draft: None, make: Box::new(Draft) });
        Ok(loaded)
    };
    let e = Worker::spawn(load, 4).err().expect("no draft model");
    assert!(format!("{e:#}").contains("no draft model"), "{e:#}");
}

#[test]
fn logprobs_and_penalties_under_speculation_answer_as_plain_ones() {
    let plain = common::start(ServerOptions::default());
    let (ngram, _) = server(Box::new(Ngram), None);
    for body in [
        json!({"prompt": "Hello Hello Hello", "max_tokens": 24, "temperature": 0, "logprobs": 2}),
        json!({"prompt": "Hello Hello Hello", "max_tokens": 24, "temperature": 0, "frequency_penalty": 1.0}),
    ] {
        let want = post(plain, "/v1/completions", &body).json();
        let got = post(ngram, "/v1/completions", &body).json();
        assert_eq!(got["choices"], want["choices"], "{body}");
        assert_eq!(got["usage"], want["usage"]);
    }
    // and the speculative worker goes on answering greedy requests as before
    assert_eq!(answers(ngram), answers(plain));
}

/// Six greedy completions with different prompts, sent at once.
fn ask_concurrently(addr: SocketAddr) -> Vec<Value> {
    let body = |i: usize| {
        let words = ["Hello", "world", "again", "Hello world"];
        let prompt = vec![words[i % 4]; 3 + i].join(" ");
        json!({"prompt": prompt, "max_tokens": 20 + 3 * i, "temperature": 0})
    };
    let threads: Vec<_> =
        (0..6).map(|i| std::thread::spawn(move || post(addr, "/v1/completions", &body(i)).json())).collect();
    threads.into_iter().map(|t| t.join().unwrap()["choices"].clone()).collect()
}

/// Speculating requests batched together (different prompts, at once)
/// answer as each does on a plain server.
#[test]
fn concurrent_speculative_requests_answer_as_plain_ones() {
    let plain = common::start(ServerOptions::default());
    let (ngram, _) = server(Box::new(Ngram), None);
    assert_eq!(ask_concurrently(ngram), ask_concurrently(plain));
}

/// DFlash speculates in the batch too (each request its own proposer, made
/// only when no finished request's is free) and answers as a plain server
/// does, one request after another and several at once.
#[test]
fn dflash_batches_and_reuses_its_proposers() {
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (addr, desc) = server(Box::new(Dflash(made.clone())), None);
    assert_eq!(desc.as_deref(), Some("dflash k=3"));
    let plain = common::start(ServerOptions::default());
    assert_eq!(answers(addr), answers(plain));
    assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1, "one proposer, made at the start and reused");
    assert_eq!(ask_concurrently(addr), ask_concurrently(plain));
    assert!(made.load(std::sync::atomic::Ordering::SeqCst) > 1, "concurrent requests each had a proposer");
}
