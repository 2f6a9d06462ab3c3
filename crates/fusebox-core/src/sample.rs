//! Token sampling: one algorithm, bit for bit the same on every backend.
//!
//! [`Backend::sample`](crate::Backend::sample) draws the next token from the
//! last row of a logits tensor. Everything it needs lives in device buffers
//! (the parameter block of [`encode_params`], the token history and a
//! two-word state), so a device backend can record the op in a graph and
//! replay it every step. The host implementation here ([`sample_host`]) is
//! the CPU backend's op and the reference the CUDA kernel (`sample.cu`)
//! follows step by step:
//!
//! 1. **Repetition penalty** (`repeat_penalty != 1`): every distinct token
//!    id among the last `repeat_last_n` history entries (0 = all) has its
//!    logit `l` replaced by `l / p` when `l > 0`, else `l * p` (the
//!    transformers rule). Penalised values are computed from the original
//!    logits into a scratch copy, so a token repeated in the window is
//!    penalised once, whatever order the writes land in.
//! 2. **Greedy** when `temperature <= 0` (or NaN) or `top_k == 1`: the first
//!    index of the largest penalised logit, NaN never winning over a number
//!    (the CPU backend's `argmax` rule).
//! 3. Otherwise `z = logit / temperature` (NaN read as `-inf`, `-0` as `+0`),
//!    ordered by [`key`] (the float order as unsigned integers). When the
//!    largest `z` is not finite the draw degenerates to the first largest.
//!    A token is kept when it passes
//!    * **top-k** (`0 < top_k < vocab`): `key(z) >=` the `top_k`-th largest
//!      key (ties at the threshold kept);
//!    * **min-p** (`min_p > 0`): `e >= min(min_p, 1)` where
//!      `e = `[`exp_neg`]`(z - zmax)` is the probability relative to the
//!      most likely token;
//!    * **top-p** (`top_p < 1`): among the tokens kept so far, `key(z) >= t`
//!      where `t` is the largest key whose tokens at or above it carry a
//!      mass of at least [`top_p_need`] (the smallest set by descending
//!      probability whose mass reaches `top_p`, ties at the threshold kept).
//!
//!    Masses are integers, [`mass`]`(e) = floor(e * 2^40)`, so every sum is
//!    exact and independent of the order it is taken in.
//! 4. **Draw**: `u24 = `[`random_bits`]`(seed, counter) >> 40` and
//!    `r = floor(u24 * total / 2^24)`; walking token ids upwards, the first
//!    kept token whose running mass exceeds `r` is drawn. This is
//!    `u = u24 / 2^24` uniform in `[0, 1)` against `u * total`, in exact
//!    fixed point.
//! 5. The token goes to `out[0]`, is appended to the history when there is
//!    room (`history[len]`), and the state `[len, counter]` advances by one
//!    in both words.
//!
//! The thresholds are found by radix selection over the keys: three passes
//! of 12, 10 and 10 bits, each histogramming the weights (1 for top-k,
//! masses for top-p) of the items whose key matches the digits chosen so
//! far ([`select`]). The host uses the same selection as the device, so the
//! two agree exactly: all float arithmetic on the way is single IEEE
//! operations (no fused multiply-adds, no library `exp`), which the CUDA
//! kernel reproduces with `__fmul_rn`-style intrinsics.

use std::sync::Mutex;

use anyhow::{ensure, Result};

use crate::dtype::random_bits;

/// Length of the `F32` parameter block of [`Backend::sample`](crate::Backend::sample).
pub const SAMPLE_PARAMS: usize = 8;

/// Sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// Penalty for tokens already in the context (1 = off), as in transformers:
    /// positive logits are divided by it, negative ones multiplied.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at (0 = the whole context).
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }

    /// True when sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0 || self.top_k == 1
    }

    /// The parameter block for [`Backend::sample`](crate::Backend::sample).
    pub fn encode(&self) -> [f32; SAMPLE_PARAMS] {
        encode_params(
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            self.repeat_penalty,
            self.repeat_last_n,
            self.seed,
        )
    }
}

/// The parameter block: floats as they are, integers (clamped to `u32`) and
/// the two halves of the seed as raw bit patterns, so the block is one `F32`
/// tensor written with [`Backend::write_f32`](crate::Backend::write_f32).
///
/// | index | value |
/// |---|---|
/// | 0 | temperature |
/// | 1 | top_k (u32 bits) |
/// | 2 | top_p |
/// | 3 | min_p |
/// | 4 | repeat_penalty |
/// | 5 | repeat_last_n (u32 bits) |
/// | 6, 7 | seed, low and high 32 bits |
pub fn encode_params(
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    repeat_last_n: usize,
    seed: u64,
) -> [f32; SAMPLE_PARAMS] {
    let word = |v: usize| f32::from_bits(v.min(u32::MAX as usize) as u32);
    [
        temperature,
        word(top_k),
        top_p,
        min_p,
        repeat_penalty,
        word(repeat_last_n),
        f32::from_bits(seed as u32),
        f32::from_bits((seed >> 32) as u32),
    ]
}

/// The parameter block, decoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: u32,
    pub seed: u64,
}

/// Read a block written by [`encode_params`].
pub fn decode_params(block: &[f32; SAMPLE_PARAMS]) -> Params {
    Params {
        temperature: block[0],
        top_k: block[1].to_bits(),
        top_p: block[2],
        min_p: block[3],
        repeat_penalty: block[4],
        repeat_last_n: block[5].to_bits(),
        seed: block[6].to_bits() as u64 | (block[7].to_bits() as u64) << 32,
    }
}

/// The float order as unsigned integers: `a < b` exactly when
/// `key(a) < key(b)` (for non-NaN floats other than `-0` against `+0`,
/// which the sampler never sees: it reads `-0` as `+0`).
#[inline]
pub fn key(z: f32) -> u32 {
    let b = z.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// A scaled logit as the sampler orders it: NaN becomes `-inf`, `-0` becomes `+0`.
#[inline]
pub fn canon(z: f32) -> f32 {
    if z.is_nan() {
        f32::NEG_INFINITY
    } else if z == 0.0 {
        0.0
    } else {
        z
    }
}

/// The repetition penalty's rule for one logit.
#[inline]
pub fn penalize(l: f32, penalty: f32) -> f32 {
    if l > 0.0 {
        l / penalty
    } else {
        l * penalty
    }
}

const LOG2E: u32 = 0x3fb8_aa3b;
const LN2_HI: u32 = 0x3f31_8000;
const LN2_LO: u32 = 0xb95e_8083;
const C6: u32 = 0x3ab6_0b61;
const C5: u32 = 0x3c08_8889;
const C4: u32 = 0x3d2a_aaab;
const C3: u32 = 0x3e2a_aaab;

/// `exp(x)` for `x <= 0` (positive `x` is read as 0), to about 2e-7
/// relative, 0 below -80 and for NaN. Built from single-rounded multiplies
/// and adds only, so the CUDA kernel computes the same bits.
#[inline]
pub fn exp_neg(x: f32) -> f32 {
    if x.is_nan() || x <= -80.0 {
        return 0.0;
    }
    let x = x.min(0.0);
    let n = (x * f32::from_bits(LOG2E) + 0.5).floor(); // -116 <= n <= 0
    let r = (x - n * f32::from_bits(LN2_HI)) - n * f32::from_bits(LN2_LO);
    let mut p = f32::from_bits(C6);
    p = p * r + f32::from_bits(C5);
    p = p * r + f32::from_bits(C4);
    p = p * r + f32::from_bits(C3);
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A relative probability `e` in `[0, 1]` as an integer mass, `floor(e * 2^40)`.
#[inline]
pub fn mass(e: f32) -> u64 {
    (e * 1_099_511_627_776.0) as u64
}

/// The mass that the top-p set must reach out of `total`:
/// `floor(floor(top_p * 2^24) * total / 2^24)`, at least 1.
#[inline]
pub fn top_p_need(top_p: f32, total: u64) -> u64 {
    let p24 = (top_p.max(0.0) * 16_777_216.0) as u64;
    (((p24 as u128 * total as u128) >> 24) as u64).max(1)
}

/// The 24 random bits of draw `counter` of stream `seed`.
#[inline]
pub fn uniform24(seed: u64, counter: u32) -> u64 {
    random_bits(seed, counter as u64) >> 40
}

/// `floor(u24 * total / 2^24)`: where in `[0, total)` the draw lands.
#[inline]
pub fn draw_target(u24: u64, total: u64) -> u64 {
    ((u24 as u128 * total as u128) >> 24) as u64
}

/// The radix passes: (shift, bits) of each digit, most significant first.
pub const DIGITS: [(u32, u32); 3] = [(20, 12), (10, 10), (0, 10)];

/// The largest key `t` such that the items with key `>= t` weigh at least
/// `need(total)` in all, where `total` is the weight of every item.
/// `item(i)` gives item `i`'s key and weight (0 for an item left out).
/// Returns `(t, weight of the items with key >= t)`. When no key qualifies
/// (`need > total`) the digits fall to 0.
pub fn select(n: usize, item: impl Fn(usize) -> (u32, u64), need: impl FnOnce(u64) -> u64) -> (u32, u64) {
    let mut hist = [0u64; 1 << 12];
    let (mut prefix, mut mask) = (0u32, 0u32);
    let (mut above, mut at) = (0u64, 0u64);
    let mut need = Some(need);
    let mut want = 0u64;
    for (pass, &(shift, bits)) in DIGITS.iter().enumerate() {
        let nb = 1usize << bits;
        let h = &mut hist[..nb];
        h.fill(0);
        for i in 0..n {
            let (k, w) = item(i);
            if w != 0 && k & mask == prefix {
                h[((k >> shift) as usize) & (nb - 1)] += w;
            }
        }
        if pass == 0 {
            let total = h.iter().sum();
            want = (need.take().unwrap())(total);
        }
        let mut acc = above;
        let mut chosen = 0;
        for d in (0..nb).rev() {
            if d == 0 || acc + h[d] >= want {
                chosen = d;
                break;
            }
            acc += h[d];
        }
        above = acc;
        at = acc + h[chosen];
        prefix |= (chosen as u32) << shift;
        mask |= ((nb - 1) as u32) << shift;
    }
    (prefix, at)
}

/// Index of the largest value, the first one on ties; NaN never beats a
/// number (all NaN: 0). The CPU backend's `argmax`.
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0usize;
    for (i, &v) in xs.iter().enumerate() {
        if v > xs[best] || (xs[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best
}

/// Reusable host buffers of [`sample_into`].
#[derive(Default)]
pub struct Scratch {
    z: Vec<f32>,
    kept: Vec<Kept>,
}

/// A token that passed top-k and min-p.
#[derive(Clone, Copy)]
struct Kept {
    id: u32,
    key: u32,
    mass: u64,
}

/// One step of the sampler on the host: `logits` is one row, `params` the
/// block of [`encode_params`], `history` the token buffer, `state` the
/// `[len, counter]` pair. Returns the token (also appended to the history)
/// and advances the state. Allocates only to grow `scratch`.
pub fn sample_into(
    logits: &[f32],
    params: &[f32; SAMPLE_PARAMS],
    history: &mut [i32],
    state: &mut [i32; 2],
    scratch: &mut Scratch,
) -> i32 {
    let p = decode_params(params);
    let (len, counter) = (state[0], state[1] as u32);
    let valid = (len.max(0) as usize).min(history.len());
    let greedy = prepare(logits, &p, &history[..valid], scratch);
    let z = &scratch.z[..logits.len()];
    let tok = if greedy { argmax(z) } else { draw(z, &p, counter, &mut scratch.kept) };
    let tok = tok as i32;
    if len >= 0 && (len as usize) < history.len() {
        history[len as usize] = tok;
    }
    state[0] = len.wrapping_add(1);
    state[1] = counter.wrapping_add(1) as i32;
    tok
}

/// Steps 1 and 3's scaling: `scratch.z` gets the scaled, penalised logits
/// (`history` is the valid context). Returns whether the settings are greedy.
fn prepare(logits: &[f32], p: &Params, history: &[i32], scratch: &mut Scratch) -> bool {
    let v = logits.len();
    if scratch.z.len() < v {
        scratch.z.resize(v, 0.0);
    }
    let z = &mut scratch.z[..v];
    let greedy = p.temperature.is_nan() || p.temperature <= 0.0 || p.top_k == 1;
    let scale = |l: f32| if greedy { l } else { canon(l / p.temperature) };
    for (zi, &l) in z.iter_mut().zip(logits) {
        *zi = scale(l);
    }
    if p.repeat_penalty != 1.0 {
        let valid = history.len();
        let start = if p.repeat_last_n == 0 { 0 } else { valid.saturating_sub(p.repeat_last_n as usize) };
        for &t in &history[start..valid] {
            if t >= 0 && (t as usize) < v {
                z[t as usize] = scale(penalize(logits[t as usize], p.repeat_penalty));
            }
        }
    }
    greedy
}

/// The distribution the sampler draws from, as dense probabilities: for
/// one row of `logits`, the settings of `params` and the valid context
/// `history`, `probs[i]` is the chance that [`sample_into`] draws token `i`
/// (up to its fixed-point rounding: each kept token's mass over the total).
/// Greedy settings give all the mass to the (penalised) argmax. Speculative
/// decoding's rejection rule compares these distributions.
pub fn probabilities(
    logits: &[f32],
    params: &[f32; SAMPLE_PARAMS],
    history: &[i32],
    scratch: &mut Scratch,
    probs: &mut Vec<f32>,
) {
    let p = decode_params(params);
    let greedy = prepare(logits, &p, history, scratch);
    let z = &scratch.z[..logits.len()];
    probs.clear();
    probs.resize(logits.len(), 0.0);
    if greedy || !z.iter().copied().fold(f32::NEG_INFINITY, f32::max).is_finite() {
        probs[argmax(z)] = 1.0;
        return;
    }
    let (thr_p, total) = kept_set(z, &p, &mut scratch.kept);
    let inv = 1.0 / total as f64;
    for t in scratch.kept.iter().filter(|t| t.key >= thr_p) {
        probs[t.id as usize] = (t.mass as f64 * inv) as f32;
    }
}

/// Steps 3 and 4 on the scaled, penalised logits. The selections see only
/// the tokens that passed top-k and min-p (a selection depends on the items
/// and their weights, not on how many zero-weight items it skips), in id
/// order for the draw.
fn draw(z: &[f32], p: &Params, counter: u32, kept: &mut Vec<Kept>) -> usize {
    let zmax = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !zmax.is_finite() {
        return argmax(z);
    }
    let (thr_p, total) = kept_set(z, p, kept);
    let r = draw_target(uniform24(p.seed, counter), total);
    let mut cum = 0u64;
    for t in kept.iter().filter(|t| t.key >= thr_p) {
        cum += t.mass;
        if cum > r {
            return t.id as usize;
        }
    }
    // unreachable: the most likely token is always kept with mass 2^40 > r
    argmax(z)
}

/// Step 3's filters (`z` has a finite maximum): `kept` gets the tokens that
/// pass top-k and min-p, in id order; returns the top-p key threshold and
/// the total mass of the tokens at or above it.
fn kept_set(z: &[f32], p: &Params, kept: &mut Vec<Kept>) -> (u32, u64) {
    let v = z.len();
    let zmax = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let thr_k =
        if p.top_k > 0 && (p.top_k as usize) < v { select(v, |i| (key(z[i]), 1), |_| p.top_k as u64).0 } else { 0 };
    let min_p = if p.min_p > 0.0 { p.min_p.min(1.0) } else { 0.0 };
    kept.clear();
    kept.reserve(v);
    for (i, &zi) in z.iter().enumerate() {
        let k = key(zi);
        if k < thr_k {
            continue;
        }
        let e = exp_neg(zi - zmax);
        if e >= min_p {
            kept.push(Kept { id: i as u32, key: k, mass: mass(e) });
        }
    }
    if p.top_p < 1.0 {
        select(kept.len(), |j| (kept[j].key, kept[j].mass), |total| top_p_need(p.top_p, total))
    } else {
        (0, kept.iter().map(|t| t.mass).sum())
    }
}

static SCRATCH: Mutex<Option<Scratch>> = Mutex::new(None);

/// [`sample_into`] with checked arguments and a shared scratch (which grows
/// to the largest vocabulary seen, then never allocates again): the CPU
/// backend's `sample` op.
pub fn sample_host(logits: &[f32], params: &[f32], history: &mut [i32], state: &mut [i32]) -> Result<i32> {
    ensure!(!logits.is_empty(), "sample: empty logits");
    ensure!(params.len() >= SAMPLE_PARAMS, "sample: {} parameters, expected {SAMPLE_PARAMS}", params.len());
    ensure!(state.len() >= 2, "sample: state has {} values, expected 2 (history length, counter)", state.len());
    let params: &[f32; SAMPLE_PARAMS] = params[..SAMPLE_PARAMS].try_into().unwrap();
    let state: &mut [i32; 2] = (&mut state[..2]).try_into().unwrap();
    let mut s = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    Ok(sample_into(logits, params, history, state, s.get_or_insert_with(Scratch::default)))
}
