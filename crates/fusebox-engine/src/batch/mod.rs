//! Continuous batching over a paged KV cache: many sequences in one forward
//! pass, joining and leaving the batch at every step.
//!
//! Each step the scheduler ([`BatchEngine::schedule`]) spends a token budget
//! (`max_batch_tokens`): first on the running sequences that decode (a row
//! each, oldest first), then on those still prefilling (a chunk of their
//! prompt each), then on waiting sequences, which are admitted in arrival
//! order while their chunk's blocks are free; so a long prompt never holds up
//! the decodes. A running sequence whose next rows need a block when none is
//! free preempts the youngest running sequence younger than it that the step
//! has not planned (its blocks released, its tokens, prompt and generated
//! alike, recomputed when it is admitted again), itself if there is none. The step then runs one forward pass over
//! every scheduled row ([`fusebox_models::Batch`]: positions, sequences, cache
//! slots, block tables) and samples one token for every sequence whose rows
//! reached the end of what it knows.
//!
//! The model code sees none of this: it reads the step's layout through the
//! attention op and the KV write ([`fusebox_core::Pages`]). On the CPU every
//! row of a sequence with at most `ROW_EXACT_MAX` rows in a step is computed
//! as it would be alone, so a request's output does not depend on what else
//! runs beside it (the tests check greedy output against [`crate::Session`]).

mod draws;
mod lone_pass;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, ensure, Result};
use fusebox_core::backend::ROW_EXACT_MAX;
use fusebox_core::{Backend, LayerKv, Tensor};
use fusebox_models::{Batch, Decoder, Logits, Workspace};

use crate::batch_spec::SeqSpec;
use crate::block_manager::{BlockManager, BlockTable, BLOCK_SIZE};
use crate::device_sampler::DeviceSampler;
use crate::generate::{ParityCheck, StopReason};
use crate::sampling::{Sampler, SamplingParams};
use crate::spec::{SpecStats, Speculation, MAX_SPEC_K};
use draws::{record, round, rows_for};

/// A sequence's handle, unique in one engine.
pub type SeqId = u64;

/// What to generate for one sequence.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Tokens that end the sequence when sampled (kept in the output).
    pub stop_ids: Vec<u32>,
    pub sampling: SamplingParams,
}

/// One step's news of one sequence: a sampled token, the end, or both.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: SeqId,
    pub token: Option<u32>,
    pub finished: Option<StopReason>,
}

/// A sequence's view of each draw, for callers that need more than the
/// token (a server's penalties, log-probabilities and streaming).
pub trait Observer: Send {
    /// Whether [`Observer::adjust`] changes anything (when not, the logits
    /// are not copied).
    fn adjusts(&self) -> bool {
        false
    }
    /// Change the logits the next token is drawn from (frequency and
    /// presence penalties); the model's own stay as they are.
    fn adjust(&mut self, _logits: &mut [f32]) {}
    /// Whether [`Observer::drawn`] reads the logits. When not, a lone
    /// decoding sequence draws on the device and its logits stay there
    /// (`drawn` gets an empty slice).
    fn needs_logits(&self) -> bool {
        true
    }
    /// The token drawn, the model's logits it was drawn from (before
    /// [`Observer::adjust`]) and whether it ends the sequence. Returning
    /// `false` ends it now ([`StopReason::Callback`]: the client went away).
    fn drawn(&mut self, raw: &[f32], token: u32, finished: Option<StopReason>) -> bool;
}

/// Sizes of a [`BatchEngine`].
#[derive(Clone, Copy, Debug)]
pub struct BatchOptions {
    /// KV cache blocks (of [`BLOCK_SIZE`] positions each, every layer).
    pub blocks: usize,
    /// Rows one step may run (decode rows and prefill chunks together).
    pub max_batch_tokens: usize,
    /// Sequences one step may run.
    pub max_seqs: usize,
    /// The most positions a sequence may fill (its context): it draws its
    /// last token when its cache is full.
    pub max_len: usize,
}

struct Seq<'m> {
    id: SeqId,
    /// The prompt, then every token generated.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    table: BlockTable,
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
    sampler: Sampler,
    observer: Option<Box<dyn Observer + 'm>>,
    spec: Option<SeqSpec<'m>>,
    /// The last prompt token was drawn already ([`BatchEngine::add_drawn`]):
    /// the prompt runs without it, and the sequence decodes from it.
    hold_last: bool,
}

impl Seq<'_> {
    /// Tokens known but not yet in the cache.
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Rows the sequence may run next: what is known past its cache, less a
    /// held last prompt token while the rest runs.
    fn runnable(&self) -> usize {
        let p = self.pending();
        if self.hold_last && p > 1 {
            p - 1
        } else {
            p
        }
    }

    /// Whether this sequence decodes (one token known past its cache) with
    /// a proposer: its rows in a step are a speculative round.
    fn speculates(&self) -> bool {
        self.spec.is_some() && self.pending() == 1
    }

    /// The token at position `t`: known, or a draft of the round in flight.
    fn token(&self, t: usize) -> u32 {
        match self.tokens.get(t) {
            Some(&tok) => tok,
            None => self.spec.as_ref().expect("rows past the tokens are drafts").draft.tokens[t - self.tokens.len()],
        }
    }
}

/// Workspaces kept for reuse, by (rows, logit rows); dropped when more.
const WORKSPACES_KEPT: usize = 16;

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// A step's host buffers, kept from step to step so that a step allocates
/// nothing once warm (the plan, the pass's layout, the finished).
#[derive(Default)]
struct StepBufs {
    /// `(sequence, rows)` while planning, then `(index into running, rows)`.
    plan_ids: Vec<(SeqId, usize)>,
    plan: Vec<(usize, usize)>,
    done: Vec<usize>,
    ids: Vec<u32>,
    positions: Vec<i32>,
    seqs: Vec<i32>,
    slots: Vec<i32>,
    tables: Vec<i32>,
    logit_rows: Vec<usize>,
}

impl StepBufs {
    /// Buffers that hold the largest step `opts` allows, so that no step
    /// grows them.
    fn for_sizes(opts: &BatchOptions) -> StepBufs {
        let (rows, seqs) = (opts.max_batch_tokens + MAX_SPEC_K + 1, opts.max_seqs);
        let width = opts.max_len.div_ceil(BLOCK_SIZE) + 1;
        StepBufs {
            plan_ids: Vec::with_capacity(seqs),
            plan: Vec::with_capacity(seqs),
            done: Vec::with_capacity(seqs),
            ids: Vec::with_capacity(rows),
            positions: Vec::with_capacity(rows),
            seqs: Vec::with_capacity(rows),
            slots: Vec::with_capacity(rows),
            tables: Vec::with_capacity(seqs * width),
            logit_rows: Vec::with_capacity(rows.min(seqs * (MAX_SPEC_K + 1))),
        }
    }
}

/// The device sampler of a lone decoding sequence, and whose state it holds.
struct LoneDraw {
    dev: DeviceSampler,
    /// The sequence whose parameters it holds.
    owner: SeqId,
    /// `(sequence, tokens)`: the device history holds that sequence's first
    /// `tokens` tokens and its counter that sequence's draws (a host draw
    /// for it since leaves this stale).
    synced: Option<(SeqId, usize)>,
}

/// Sequences generated together over one paged KV cache.
pub struct BatchEngine<'m> {
    model: &'m Decoder,
    be: &'m dyn Backend,
    opts: BatchOptions,
    blocks: BlockManager,
    cache: Vec<LayerKv>,
    waiting: VecDeque<Seq<'m>>,
    /// Oldest first.
    running: Vec<Seq<'m>>,
    next_id: SeqId,
    preemptions: u64,
    /// Forward passes that read a paged layout, and all of them.
    paged_passes: u64,
    passes: u64,
    /// By (rows, logit rows): a serial (graph keys name it) and the workspace.
    workspaces: HashMap<(usize, usize), (u64, Workspace)>,
    next_serial: u64,
    /// Names this engine's buffers in graph keys.
    id: u64,
    lone: Option<LoneDraw>,
    spec_totals: (usize, usize, usize),
    /// Target layers every pass captures, for proposers that read them
    /// (one set per engine; empty: none).
    tap_layers: Vec<usize>,
    bufs: StepBufs,
    /// Each row's argmax of a lone sequence's round, by logit rows (`I32`),
    /// and read back.
    argmax: HashMap<usize, Tensor>,
    argmax_host: Vec<i32>,
    /// Finished sequences' speculation ([`BatchEngine::take_spec`]).
    spec_done: HashMap<SeqId, (Speculation<'m>, SpecStats)>,
    /// Keep the last finished sequence's cache for the next request's
    /// shared prefix ([`BatchEngine::set_prefix_reuse`]).
    reuse_prefix: bool,
    /// Its tokens in the cache and its blocks.
    kept: Option<(Vec<u32>, BlockTable)>,
    /// `FUSEBOX_FUSED_PARITY_CHECK`: a lone sequence's decode steps also run
    /// on the graph path, compared.
    parity: Option<ParityCheck>,
    logits: Vec<f32>,
    /// Adjusted logits of one row (an observer's penalties).
    work: Vec<f32>,
}

impl<'m> BatchEngine<'m> {
    pub fn new(model: &'m Decoder, be: &'m dyn Backend, opts: BatchOptions) -> Result<BatchEngine<'m>> {
        ensure!(opts.max_batch_tokens > 0 && opts.max_seqs > 0, "batch: max_batch_tokens and max_seqs must be above 0");
        ensure!(opts.max_len > 0, "batch: max_len must be above 0");
        ensure!(
            opts.max_seqs == 1 || be.has_paged_attention(),
            "batch: {} runs one sequence at a time (no paged attention yet): max_seqs must be 1, not {}",
            be.name(),
            opts.max_seqs
        );
        let blocks = BlockManager::new(opts.blocks, BLOCK_SIZE)?;
        let cache =
            (0..model.layers.len()).map(|_| model.kv_layer(be, opts.blocks * BLOCK_SIZE)).collect::<Result<_>>()?;
        Ok(BatchEngine {
            model,
            be,
            opts,
            blocks,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            preemptions: 0,
            next_serial: 0,
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            lone: None,
            spec_totals: (0, 0, 0),
            tap_layers: Vec::new(),
            spec_done: HashMap::new(),
            argmax: HashMap::new(),
            bufs: StepBufs::for_sizes(&opts),
            argmax_host: Vec::new(),
            reuse_prefix: false,
            kept: None,
            parity: fusebox_core::fusion::parity_check().then(ParityCheck::default),
            paged_passes: 0,
            passes: 0,
            workspaces: HashMap::new(),
            logits: Vec::new(),
            work: Vec::new(),
        })
    }

    /// Queue a request; it joins the batch at a later step.
    ///
    /// # Errors
    /// An empty prompt, a token outside the vocabulary, or a prompt that
    /// cannot fit `max_len` or the whole cache.
    pub fn add(&mut self, req: Request) -> Result<SeqId> {
        self.add_seq(req, None)
    }

    /// [`BatchEngine::add`] with an [`Observer`] that sees every draw.
    pub fn add_observed(&mut self, req: Request, observer: Box<dyn Observer + 'm>) -> Result<SeqId> {
        self.add_seq(req, Some(observer))
    }

    /// [`BatchEngine::add`] with an optional [`Observer`] and speculative
    /// decoding: each step the sequence decodes, its proposer drafts up to
    /// `k` tokens and the step scores them beside the other sequences' rows
    /// (greedy output is plain greedy's, token for token; sampled output
    /// has the target's distribution). A round may emit several tokens, an
    /// [`Event`] each.
    ///
    /// # Errors
    /// As [`BatchEngine::add`]; a `k` out of range, a proposer that reads
    /// target layers other than those another sequence's proposer reads
    /// (one set per engine), or an observer that adjusts the logits (the
    /// rounds accept from the model's own).
    pub fn add_with(
        &mut self,
        req: Request,
        observer: Option<Box<dyn Observer + 'm>>,
        spec: Option<Speculation<'m>>,
    ) -> Result<SeqId> {
        let Some(spec) = spec else { return self.add_seq(req, observer) };
        ensure!(
            observer.as_ref().is_none_or(|o| !o.adjusts()),
            "speculative decoding draws from the model's own logits: no penalties that adjust them"
        );
        let layers = spec.proposer.target_layers().to_vec();
        if !layers.is_empty() && layers != self.tap_layers {
            ensure!(
                self.tap_layers.is_empty(),
                "the {} proposer reads target layers {layers:?}, and this engine captures {:?} for another",
                spec.proposer.name(),
                self.tap_layers
            );
            if let Some(&bad) = layers.iter().find(|&&l| l >= self.model.layers.len()) {
                bail!("cannot capture layer {bad}: the model has {} layers", self.model.layers.len());
            }
            // every pass captures them from now on
            self.tap_layers = layers;
            self.workspaces.clear();
        }
        let spec = SeqSpec::new(spec, &req.sampling)?;
        let id = self.add_seq(req, observer)?;
        self.waiting.back_mut().expect("just queued").spec = Some(spec);
        Ok(id)
    }

    /// [`BatchEngine::add_with`] for a generation that goes on: the
    /// prompt's last token was drawn already (it counts as generated), so
    /// nothing is drawn after the rest of the prompt and the sequence
    /// decodes from that token (with speculation, its first round starts
    /// there).
    ///
    /// # Errors
    /// As [`BatchEngine::add_with`].
    pub fn add_drawn(
        &mut self,
        req: Request,
        observer: Option<Box<dyn Observer + 'm>>,
        spec: Option<Speculation<'m>>,
    ) -> Result<SeqId> {
        let id = self.add_with(req, observer, spec)?;
        let s = self.waiting.back_mut().expect("just queued");
        s.hold_last = true;
        s.prompt_len -= 1;
        Ok(id)
    }

    /// Speculative rounds so far, over every sequence: `(rounds, drafted,
    /// accepted)`.
    pub fn spec_totals(&self) -> (usize, usize, usize) {
        self.spec_totals
    }

    /// A finished sequence's speculation, to use again, and what it did
    /// (kept from its end until taken, once).
    pub fn take_spec(&mut self, id: SeqId) -> Option<(Speculation<'m>, SpecStats)> {
        self.spec_done.remove(&id)
    }

    /// Keep the cache of the last sequence to finish, so that the next
    /// request reuses what its prompt shares with it (a chat's earlier
    /// turns) and prefills only the rest. Its blocks count as held until
    /// the next request takes them or a sequence needs them.
    pub fn set_prefix_reuse(&mut self, on: bool) {
        self.reuse_prefix = on;
        if !on {
            self.free_kept();
        }
    }

    /// Forget the kept cache (a new conversation).
    pub fn forget_prefix(&mut self) {
        self.free_kept();
    }

    /// Tokens of `prompt` the next request would reuse from the kept cache
    /// (all but its last token at most: that one runs for the logits).
    pub fn reusable_prefix(&self, prompt: &[u32]) -> usize {
        self.kept.as_ref().map_or(0, |(t, _)| {
            t.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len().saturating_sub(1))
        })
    }

    /// Give the kept cache's blocks back; whether there were any.
    fn free_kept(&mut self) -> bool {
        match self.kept.take() {
            Some((_, mut table)) => {
                self.blocks.release(&mut table);
                true
            }
            None => false,
        }
    }

    /// The `FUSEBOX_FUSED_PARITY_CHECK` result so far (None when it is off).
    pub fn parity(&self) -> Option<ParityCheck> {
        self.parity
    }

    fn add_seq(&mut self, req: Request, observer: Option<Box<dyn Observer + 'm>>) -> Result<SeqId> {
        let n = req.prompt.len();
        ensure!(n > 0, "the prompt is empty (no tokens)");
        let vocab = self.model.cfg.vocab_size;
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab} tokens");
        }
        ensure!(req.max_new_tokens > 0, "max_new_tokens is 0: nothing to generate");
        let room = self.room();
        ensure!(n <= room, "a prompt of {n} tokens does not fit the context of {room} tokens");
        let id = self.next_id;
        self.next_id += 1;
        let reused = self.reusable_prefix(&req.prompt);
        // room for every token it may draw, so that a decode step does not grow it
        let mut tokens = req.prompt;
        tokens.reserve(req.max_new_tokens.min(room + 1 - n));
        let mut table = BlockTable::new();
        if let Some((_, mut kept)) = self.kept.take() {
            self.blocks.shrink(&mut kept, reused);
            table = kept;
        }
        table.reserve(self.blocks.blocks_for(n + req.max_new_tokens.min(room + 1 - n)));
        self.waiting.push_back(Seq {
            id,
            tokens,
            prompt_len: n,
            computed: reused,
            table,
            max_new_tokens: req.max_new_tokens,
            stop_ids: req.stop_ids,
            sampler: Sampler::new(req.sampling),
            observer,
            spec: None,
            hold_last: false,
        });
        Ok(id)
    }

    /// Drop a sequence, waiting or running; its blocks are free again.
    /// Returns whether it was there.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let Some(mut seq) = self.take(id) else { return false };
        self.blocks.release(&mut seq.table);
        true
    }

    /// Sequence `id` out of the batch or the queue.
    fn take(&mut self, id: SeqId) -> Option<Seq<'m>> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(i))
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)
        }
    }

    /// End a sequence now, running or waiting, as if it had finished: its
    /// cache kept for the next prompt's prefix when that is on, its
    /// speculation kept to take. Returns whether it was there.
    pub fn finish(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.take(id) else { return false };
        self.retire(seq);
        true
    }

    /// A finished sequence leaves: its blocks free (or kept for the next
    /// prompt's prefix), its speculation kept to take.
    fn retire(&mut self, mut s: Seq<'m>) {
        if self.reuse_prefix {
            self.free_kept();
            s.tokens.truncate(s.computed);
            self.kept = Some((s.tokens, s.table));
        } else {
            self.blocks.release(&mut s.table);
        }
        if let Some(sp) = s.spec {
            self.spec_done.insert(s.id, sp.into_parts());
        }
    }

    /// The longest a sequence may grow: `max_len`, or the whole cache if less.
    fn room(&self) -> usize {
        self.opts.max_len.min(self.blocks.total() * self.blocks.block_size())
    }

    /// Nothing waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn blocks_total(&self) -> usize {
        self.blocks.total()
    }

    pub fn blocks_free(&self) -> usize {
        self.blocks.free()
    }

    /// Sequences queued, not yet in the batch.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences in the batch now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences preempted so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Forward passes so far: `(paged, all)`. A pass over a lone sequence
    /// whose blocks are in order runs the contiguous cache's kernels
    /// ([`fusebox_models::Batch::is_contiguous`]) and is not counted as paged.
    pub fn passes(&self) -> (u64, u64) {
        (self.paged_passes, self.passes)
    }

    /// Move running sequence `i` back to the front of the queue, its blocks
    /// released and its cache to be recomputed.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.blocks.release(&mut s.table);
        s.computed = 0;
        if let Some(sp) = s.spec.as_mut() {
            sp.draft.clear();
        }
        self.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// The next step's rows: `(index into running, rows)` per sequence, in
    /// batch order. Decoding sequences come first (a row each, oldest
    /// first), then those still prefilling take what is left of the budget,
    /// then waiting ones are admitted; so a long prompt never holds up the
    /// decodes.
    fn schedule(&mut self) -> Result<()> {
        let (room, vocab) = (self.room(), self.model.cfg.vocab_size);
        let mut budget = self.opts.max_batch_tokens;
        let mut plan = std::mem::take(&mut self.bufs.plan_ids);
        plan.clear();
        let r = self.plan_into(&mut plan, &mut budget, room, vocab);
        self.bufs.plan.clear();
        for &(id, n) in &plan {
            let i = self.running.iter().position(|s| s.id == id).expect("a planned sequence runs");
            self.bufs.plan.push((i, n));
        }
        self.bufs.plan_ids = plan;
        r
    }

    /// [`BatchEngine::schedule`]'s choices, into `plan` as `(sequence, rows)`.
    fn plan_into(
        &mut self,
        plan: &mut Vec<(SeqId, usize)>,
        budget: &mut usize,
        room: usize,
        vocab: usize,
    ) -> Result<()> {
        for decoding in [true, false] {
            let mut i = 0;
            while i < self.running.len() && *budget > 0 {
                let s = &self.running[i];
                if (s.pending() == 1) != decoding || plan.iter().any(|&(id, _)| id == s.id) {
                    i += 1;
                    continue;
                }
                let id = s.id;
                let chunk = rows_for(&mut self.running[i], *budget, room, vocab)?;
                let want = self.running[i].computed + chunk;
                // (a sequence never outgrows `room`, the whole cache at most: `add` and the draws see to it)
                debug_assert!(want <= self.room());
                if let Some(j) = self.make_room(i, want, plan) {
                    plan.push((id, chunk));
                    *budget -= chunk;
                    i = j + 1;
                } // else it was preempted: the sequence now at i is the next
            }
        }
        while *budget > 0 && self.running.len() < self.opts.max_seqs {
            let Some(s) = self.waiting.front_mut() else { break };
            let chunk = rows_for(s, *budget, room, vocab)?;
            if self.blocks.reserve(&mut s.table, s.computed + chunk).is_err() {
                if self.free_kept() {
                    continue;
                }
                break;
            }
            let s = self.waiting.pop_front().expect("front exists");
            plan.push((s.id, chunk));
            self.running.push(s);
            *budget -= chunk;
        }
        Ok(())
    }

    /// Grow running sequence `i`'s table to `want` positions, preempting
    /// the youngest running sequences younger than it that this step has not
    /// planned (`plan`), or `i` itself when there are none. Returns `i`'s
    /// index afterwards, `None` when it was preempted.
    fn make_room(&mut self, i: usize, want: usize, plan: &[(SeqId, usize)]) -> Option<usize> {
        loop {
            if self.blocks.reserve(&mut self.running[i].table, want).is_ok() {
                return Some(i);
            }
            if self.free_kept() {
                continue;
            }
            let planned = |s: &Seq| plan.iter().any(|&(id, _)| id == s.id);
            match (i + 1..self.running.len()).rev().find(|&v| !planned(&self.running[v])) {
                Some(v) => self.preempt(v),
                None => {
                    self.preempt(i);
                    return None;
                }
            }
        }
    }

    /// Run one step: schedule, forward passes over every scheduled row,
    /// sample for every sequence that reached the end of what it knows.
    /// Returns this step's events (empty when idle).
    ///
    /// A step of up to [`ROW_EXACT_MAX`] rows is one pass. A longer one (a
    /// prompt chunk beside the decodes) runs its decode rows in passes of up
    /// to [`ROW_EXACT_MAX`] and the rest in another, so a decoding
    /// sequence's rows stay the values a one-row step gives (the backends'
    /// contract for passes of that many rows), whatever arrives beside it.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        self.step_into(&mut events)?;
        Ok(events)
    }

    /// [`BatchEngine::step`] into `events` (cleared first): a step of one
    /// lone decoding sequence allocates nothing once warm.
    pub fn step_into(&mut self, events: &mut Vec<Event>) -> Result<()> {
        events.clear();
        self.schedule()?;
        let plan = std::mem::take(&mut self.bufs.plan);
        let mut done = std::mem::take(&mut self.bufs.done);
        done.clear();
        let r = self.run_plan(&plan, events, &mut done);
        self.bufs.plan = plan;
        r?;
        done.sort_unstable();
        for &i in done.iter().rev() {
            let s = self.running.remove(i);
            self.retire(s);
        }
        self.bufs.done = done;
        Ok(())
    }

    /// The passes of a step's plan.
    fn run_plan(&mut self, plan: &[(usize, usize)], events: &mut Vec<Event>, done: &mut Vec<usize>) -> Result<()> {
        let m: usize = plan.iter().map(|&(_, n)| n).sum();
        if m <= ROW_EXACT_MAX {
            if !plan.is_empty() {
                self.pass(plan, events, done)?;
            }
        } else {
            // decoding sequences (a row, or a speculative round of up to ROW_EXACT_MAX) packed into
            // passes of up to ROW_EXACT_MAX rows, the prompt chunks into another
            let (decodes, rest): (Vec<_>, Vec<_>) = plan.iter().partition(|&&(i, _)| self.running[i].pending() == 1);
            let mut part: Vec<(usize, usize)> = vec![];
            for &(i, n) in &decodes {
                if part.iter().map(|&(_, r)| r).sum::<usize>() + n > ROW_EXACT_MAX {
                    self.pass(&std::mem::take(&mut part), events, done)?;
                }
                part.push((i, n));
            }
            if !part.is_empty() {
                self.pass(&part, events, done)?;
            }
            if !rest.is_empty() {
                self.pass(&rest, events, done)?;
            }
        }
        Ok(())
    }

    /// One forward pass over `plan`'s rows (`(index into running, rows)`),
    /// then the draws of the sequences it brings to the end of what they
    /// know; finished ones go into `done` (still running until the caller
    /// removes them).
    fn pass(&mut self, plan: &[(usize, usize)], events: &mut Vec<Event>, done: &mut Vec<usize>) -> Result<()> {
        let m: usize = plan.iter().map(|&(_, n)| n).sum();
        let width = plan.iter().map(|&(i, _)| self.running[i].table.len()).max().unwrap_or(1).max(1);
        let b = &mut self.bufs;
        let (ids, positions, seqs, slots) = (&mut b.ids, &mut b.positions, &mut b.seqs, &mut b.slots);
        let (tables, logit_rows) = (&mut b.tables, &mut b.logit_rows);
        for v in [&mut *positions, &mut *seqs, &mut *slots] {
            v.clear();
        }
        ids.clear();
        logit_rows.clear();
        tables.clear();
        tables.resize(plan.len() * width, 0);
        for (b, &(i, n)) in plan.iter().enumerate() {
            let s = &self.running[i];
            for t in s.computed..s.computed + n {
                ids.push(s.token(t));
                positions.push(t as i32);
                seqs.push(b as i32);
                slots.push(self.blocks.slot(&s.table, t) as i32);
            }
            for (dst, &id) in tables[b * width..].iter_mut().zip(s.table.ids()) {
                *dst = id as i32;
            }
            if s.speculates() {
                logit_rows.extend(ids.len() - n..ids.len());
            } else if s.computed + n == s.tokens.len() {
                logit_rows.push(ids.len() - 1);
            }
        }
        let nl = logit_rows.len().max(1).next_power_of_two();
        if !self.workspaces.contains_key(&(m, nl)) {
            if self.workspaces.len() >= WORKSPACES_KEPT {
                self.workspaces.clear();
            }
            let mut ws = self.model.workspace(self.be, m, Logits::Rows(nl))?;
            if !self.tap_layers.is_empty() {
                ws = ws.with_taps(self.be, &self.tap_layers)?;
            }
            self.next_serial += 1;
            self.workspaces.insert((m, nl), (self.next_serial, ws));
        }
        let (serial, ws) = self.workspaces.get_mut(&(m, nl)).expect("inserted above");
        let serial = *serial;
        let b = &self.bufs;
        let batch = Batch {
            ids: &b.ids,
            positions: &b.positions,
            seqs: &b.seqs,
            slots: &b.slots,
            tables: &b.tables,
            width,
            block_size: self.blocks.block_size(),
            logit_rows: &b.logit_rows,
        };
        ws.set_batch(self.be, &batch)?;
        // a lone sequence's blocks are the cache's first in order (a fresh free list hands them out
        // so, and a release puts them back so): a backend without paged attention never needs it
        ensure!(
            !ws.is_paged() || self.be.has_paged_attention(),
            "batch: {} has no paged attention, and a step's layout is not one contiguous sequence",
            self.be.name()
        );
        self.passes += 1;
        let paged = ws.is_paged();
        self.paged_passes += paged as u64;
        if let [(i, n)] = *plan {
            if !paged && self.running[i].speculates() {
                return self.lone_round(i, n, serial, (m, nl), events, done);
            }
        }
        if let [(i, 1)] = *plan {
            let s = &self.running[i];
            if !paged
                && s.spec.is_none()
                && s.computed + 1 == s.tokens.len()
                && s.observer.as_ref().is_none_or(|o| !o.adjusts())
            {
                return self.lone_decode(i, serial, events, done);
            }
        }
        let (vocab, room) = (self.model.cfg.vocab_size, self.room());
        let ws = &mut self.workspaces.get_mut(&(m, nl)).expect("inserted above").1;
        let (model, be, cache) = (self.model, self.be, &mut self.cache);
        be.run(&mut || model.forward(be, ws, cache))?;
        be.read_f32(&ws.logits, &mut self.logits)?;
        let (mut row, mut first_row) = (0, 0);
        for &(i, n) in plan {
            let s = &mut self.running[i];
            // this sequence's rows of the pass, where a proposer reads the target's layers
            let taps = ws.taps().filter(|_| s.spec.as_ref().is_some_and(|sp| sp.taps())).map(|t| (t, first_row));
            first_row += n;
            if s.speculates() {
                let rows = &self.logits[row * vocab..(row + n) * vocab];
                row += n;
                round(s, i, (rows, None), taps, vocab, room, &mut self.spec_totals, events, done)?;
                continue;
            }
            if let (Some((t, r0)), Some(sp)) = (taps, s.spec.as_mut()) {
                sp.observe(t, r0, s.computed, n)?;
            }
            let samples = s.computed + n == s.tokens.len();
            s.computed += n;
            if !samples {
                continue;
            }
            let raw = &self.logits[row * vocab..(row + 1) * vocab];
            row += 1;
            let tok = match s.observer.as_mut().filter(|o| o.adjusts()) {
                Some(o) => {
                    self.work.clear();
                    self.work.extend_from_slice(raw);
                    o.adjust(&mut self.work);
                    s.sampler.sample(&self.work, &s.tokens)
                }
                None => s.sampler.sample(raw, &s.tokens),
            };
            record(s, i, tok, raw, room, events, done);
        }
        Ok(())
    }
}
