//! Token sampling: repetition penalty, temperature, top-k, top-p and min-p,
//! with a counter-based random stream so that a seed reproduces a run
//! exactly, on every backend.
//!
//! The algorithm lives in [`fusebox_core::sample`]; generation runs it on the
//! backend ([`fusebox_core::Backend::sample`], see [`crate::Session`]).
//! [`Sampler`] is the same algorithm on host slices, for callers that hold
//! logits on the host.

pub use fusebox_core::sample::SamplingParams;
use fusebox_core::sample::{sample_into, Scratch, SAMPLE_PARAMS};

/// Index of the largest value, the first one on ties (NaN never wins).
pub fn argmax(xs: &[f32]) -> u32 {
    fusebox_core::sample::argmax(xs) as u32
}

/// The sampler on the host: draw `i` after [`Sampler::new`] uses counter
/// `i` of the seed's stream, exactly as the backend op does.
pub struct Sampler {
    pub params: SamplingParams,
    block: [f32; SAMPLE_PARAMS],
    counter: u32,
    history: Vec<i32>,
    scratch: Scratch,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let block = params.encode();
        Sampler { params, block, counter: 0, history: Vec::new(), scratch: Scratch::default() }
    }

    /// Pick the next token from `logits`, given the tokens so far (which the
    /// repetition penalty looks at). `logits` is left as it is.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if self.block != self.params.encode() {
            self.block = self.params.encode();
        }
        self.history.clear();
        self.history.extend(history.iter().map(|&t| t as i32));
        let mut state = [history.len() as i32, self.counter as i32];
        let t = sample_into(logits, &self.block, &mut self.history, &mut state, &mut self.scratch);
        self.counter = self.counter.wrapping_add(1);
        t as u32
    }

    /// Draws so far: the stream counter the next draw uses.
    pub fn draws(&self) -> u32 {
        self.counter
    }

    /// Count a draw made elsewhere with these parameters (on the device,
    /// for a lone decoding sequence), so the stream goes on from it.
    pub fn skip(&mut self) {
        self.counter = self.counter.wrapping_add(1);
    }
}
