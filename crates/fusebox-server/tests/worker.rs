//! The worker behind the HTTP API: events, cancellation, the bounded queue.

mod common;

use common::{engine_greedy, worker, CTX};
use fusebox_engine::SamplingParams;
use fusebox_server::{Engine, Event, FinishReason, GenRequest, SubmitError, Usage, Worker};

fn greedy(prompt: Vec<u32>, max_tokens: usize, info: &fusebox_server::ModelInfo) -> GenRequest {
    GenRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: info.eos_token_ids.clone(),
        ..GenRequest::default()
    }
}

/// Every event of a request: token ids, then the end.
fn drain(mut ev: fusebox_server::Events) -> (Vec<u32>, Option<Event>) {
    let mut ids = vec![];
    while let Some(e) = ev.blocking_next() {
        match e {
            Event::Token { id, .. } => ids.push(id),
            end => return (ids, Some(end)),
        }
    }
    (ids, None)
}

#[test]
fn tokens_match_plain_greedy_generation() {
    let (w, info) = worker(4);
    assert_eq!(info.ctx, CTX);
    let prompt = info.tokenizer.encode("Hello world", true).unwrap();
    let want = engine_greedy(&prompt, 20);
    // twice: the second request starts from a clean context too
    for _ in 0..2 {
        let (ids, end) = drain(w.submit(greedy(prompt.clone(), 20, &info)).unwrap());
        assert_eq!(ids, want);
        let finish = if want.len() == 20 { FinishReason::Length } else { FinishReason::Stop };
        match end {
            Some(Event::Done { finish_reason, usage, .. }) => {
                assert_eq!(finish_reason, finish);
                assert_eq!(usage, Usage::new(prompt.len(), want.len()));
            }
            other => panic!("expected Done, got {other:?}"),
        }
    }
}

#[test]
fn logprobs_come_with_the_same_tokens() {
    let (w, info) = worker(4);
    let prompt = info.tokenizer.encode("Hello world", true).unwrap();
    let want = engine_greedy(&prompt, 20);
    let req = GenRequest { logprobs: Some(4), ..greedy(prompt.clone(), 20, &info) };
    let mut ev = w.submit(req).unwrap();
    let mut ids = vec![];
    while let Some(Event::Token { id, logprobs, .. }) = ev.blocking_next() {
        let lp = logprobs.expect("every token has its logprobs");
        assert_eq!(lp.top.len(), 4);
        assert_eq!(lp.top[0], (id, lp.logprob), "greedy draws the most likely token");
        assert!(lp.top.windows(2).all(|p| p[0].1 >= p[1].1), "{lp:?}");
        ids.push(id);
    }
    assert_eq!(ids, want);
}

#[test]
fn dropping_the_events_cancels() {
    let (w, info) = worker(4);
    let prompt = info.tokenizer.encode("Hello", true).unwrap();
    let mut ev = w.submit(greedy(prompt.clone(), CTX - prompt.len(), &info)).unwrap();
    assert!(matches!(ev.blocking_next(), Some(Event::Token { .. })));
    drop(ev);
    // the worker is free again and answers the next request in full
    let (ids, end) = drain(w.submit(greedy(prompt.clone(), 3, &info)).unwrap());
    assert_eq!(ids, engine_greedy(&prompt, 3));
    assert!(matches!(end, Some(Event::Done { .. })), "{end:?}");
}

#[test]
fn a_full_queue_refuses() {
    let (w, info) = worker(1);
    let prompt = info.tokenizer.encode("Hello", true).unwrap();
    let mut accepted = vec![];
    let mut refused = 0;
    for _ in 0..10 {
        match w.submit(greedy(prompt.clone(), CTX - prompt.len(), &info)) {
            Ok(ev) => accepted.push(ev),
            Err(SubmitError::QueueFull) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(refused > 0, "a queue of 1 took 10 requests at once");
    for ev in accepted {
        assert!(matches!(drain(ev).1, Some(Event::Done { .. })));
    }
}

#[test]
fn a_failing_loader_is_an_error() {
    let r = Worker::spawn(|| Err(anyhow::anyhow!("no such model")), 4);
    let e = r.err().expect("spawn fails");
    assert!(format!("{e:#}").contains("no such model"));
}
