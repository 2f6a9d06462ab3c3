//! An [`Engine`] that plays back scripted events, for the HTTP side alone:
//! exact text pieces, endings and errors, and whether it was cancelled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fusebox_server::{Engine, Event, Events, FinishReason, GenRequest, SubmitError, Usage};

/// Plays `events` for every request, then (if `endless`) a "." token every
/// millisecond until the request is cancelled.
#[derive(Clone)]
pub struct Script {
    events: Vec<Event>,
    endless: bool,
    cancelled: Arc<AtomicBool>,
    last: Arc<Mutex<Option<GenRequest>>>,
}

impl Script {
    pub fn new(events: Vec<Event>) -> Script {
        Script { events, endless: false, cancelled: Arc::default(), last: Arc::default() }
    }

    /// `events`, then tokens until cancelled.
    pub fn endless(events: Vec<Event>) -> Script {
        Script { endless: true, ..Script::new(events) }
    }

    /// Tokens with these texts, then `Done` with `finish_reason` and the
    /// prompt of one token.
    pub fn pieces(pieces: &[&str], finish_reason: FinishReason) -> Script {
        let mut events: Vec<Event> = pieces.iter().map(|t| token(t)).collect();
        let usage = Usage::new(1, pieces.len());
        events.push(Event::Done { finish_reason, usage, text: String::new() });
        Script::new(events)
    }

    /// The last request submitted.
    pub fn last_request(&self) -> Option<GenRequest> {
        self.last.lock().unwrap().clone()
    }

    /// Whether a request's events were dropped while it still had some to
    /// send, waiting up to 5 seconds for it.
    pub fn cancelled(&self) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if self.cancelled.load(Ordering::SeqCst) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

/// A token event with `text` (id 0).
pub fn token(text: &str) -> Event {
    Event::Token { id: 0, text: text.into(), logprobs: None }
}

impl Engine for Script {
    fn submit(&self, req: GenRequest) -> Result<Events, SubmitError> {
        *self.last.lock().unwrap() = Some(req);
        let (tx, events) = Events::channel();
        let me = self.clone();
        std::thread::spawn(move || {
            let more = std::iter::repeat_with(|| token(".")).take_while(|_| me.endless);
            for e in me.events.iter().cloned().chain(more) {
                if tx.send(e).is_err() {
                    me.cancelled.store(true, Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // a request played to its end: the receiver may be gone already
        });
        Ok(events)
    }
}
