//! DFlash: a block-diffusion draft (z-lab) that reads the target's own
//! hidden states. The target's prompt and verify passes capture the layers
//! the draft names; each committed position's capture goes once into the
//! draft's KV cache ([`Proposer::observe`]); a proposal runs one block, the
//! pending token and `block_size - 1` masks, and reads a draft off every
//! mask row (docs/notes/dflash-reference.md).
//!
//! At temperature 0 each draft is its row's argmax (on the device; only the
//! ids come back); otherwise each is drawn from its row's distribution `q`
//! under the target's settings, which the rejection rule then uses.

use anyhow::{ensure, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fusebox_core::dtype::{random_bits, splitmix64};
use fusebox_core::sample::{probabilities, Scratch};
use fusebox_core::{Backend, DType, LayerKv, Tensor};
use fusebox_models::dflash::{BlockBufs, ContextBufs, DFlashDraft};
use fusebox_models::Decoder;

use super::proposer::{draw, Draft, ProposeCtx, Proposer};

/// Separates the draft's sampling stream from the target's, for one seed.
const STREAM: u64 = 0x4446_4c41_5348_5351;

/// Context rows added to the draft's cache per pass at most.
const CONTEXT_CHUNK: usize = 32;

pub struct DFlash<'m> {
    /// The draft's weights, shared by every proposer made from them (one
    /// per request in a batch).
    draft: Arc<DFlashDraft>,
    target: &'m Decoder,
    be: &'m dyn Backend,
    kv: Vec<LayerKv>,
    /// Positions `0..ctx_len` of the committed context are in `kv`.
    ctx_len: usize,
    block: BlockBufs,
    /// `I32 [block_size - 1]`: each draft row's argmax.
    argmax: Tensor,
    ids: Vec<i32>,
    /// Context buffers by row count (made at first use).
    context: Vec<Option<ContextBufs>>,
    logits: Vec<f32>,
    history: Vec<i32>,
    scratch: Scratch,
    seed: u64,
    counter: u64,
    /// Graph key of the block pass (its buffers are this proposer's own).
    key: u64,
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

impl<'m> DFlash<'m> {
    /// A DFlash proposer drafting for `target` on `be`, for contexts of up
    /// to `capacity` tokens; the draft must fit the target. Proposers made
    /// from one `Arc` share its weights (each has its own cache).
    pub fn new(
        draft: impl Into<Arc<DFlashDraft>>,
        target: &'m Decoder,
        be: &'m dyn Backend,
        capacity: usize,
    ) -> Result<DFlash<'m>> {
        let draft = draft.into();
        draft.cfg.check_target(&target.cfg)?;
        let bs = draft.cfg.block_size;
        Ok(DFlash {
            kv: draft.kv_layers(be, capacity + bs)?,
            block: draft.block_bufs(be, target.cfg.vocab_size)?,
            argmax: be.zeros(&[bs - 1], DType::I32)?,
            ids: Vec::with_capacity(bs),
            context: Vec::new(),
            logits: Vec::new(),
            history: Vec::with_capacity(capacity + bs),
            scratch: Scratch::default(),
            seed: 0,
            counter: 0,
            key: splitmix64(0x4446_4c41_5348_424c ^ NEXT_KEY.fetch_add(1, Ordering::Relaxed)),
            ctx_len: 0,
            draft,
            target,
            be,
        })
    }

    /// Tokens per block: one proposal drafts up to `block_size - 1`.
    pub fn block_size(&self) -> usize {
        self.draft.cfg.block_size
    }

    fn uniform(&mut self) -> f64 {
        let u = (random_bits(self.seed, self.counter) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        self.counter += 1;
        u
    }

    fn sample(&mut self, ctx: &ProposeCtx<'_>, n: usize, draft: &mut Draft) -> Result<()> {
        let seed = ctx.sampling.seed ^ STREAM;
        if seed != self.seed {
            (self.seed, self.counter) = (seed, 0);
        }
        self.be.read_f32(&self.block.logits, &mut self.logits)?;
        let vocab = self.target.cfg.vocab_size;
        let block = ctx.sampling.encode();
        self.history.clear();
        self.history.extend(ctx.tokens.iter().map(|&x| x as i32));
        for i in 0..n {
            let q = draft.next_q();
            probabilities(&self.logits[i * vocab..(i + 1) * vocab], &block, &self.history, &mut self.scratch, q);
            let x = draw(q, self.uniform());
            draft.tokens.push(x);
            self.history.push(x as i32);
        }
        Ok(())
    }
}

impl Proposer for DFlash<'_> {
    fn name(&self) -> &'static str {
        "dflash"
    }

    fn target_layers(&self) -> &[usize] {
        &self.draft.cfg.target_layer_ids
    }

    fn observe(&mut self, taps: &Tensor, row0: usize, first: usize, rows: usize) -> Result<()> {
        ensure!(
            first <= self.ctx_len,
            "the DFlash draft has no target hidden states for positions {}..{first}: the context was run without it",
            self.ctx_len
        );
        ensure!(first + rows <= self.kv[0].capacity(), "the DFlash draft's context is full");
        // a shorter context than before (a new prompt sharing a prefix):
        // what follows `first` is overwritten
        self.ctx_len = first;
        let mut done = 0;
        while done < rows {
            let n = (rows - done).min(CONTEXT_CHUNK);
            if self.context.len() <= n {
                self.context.resize_with(n + 1, || None);
            }
            if self.context[n].is_none() {
                self.context[n] = Some(self.draft.context_bufs(self.be, n)?);
            }
            let cb = self.context[n].as_mut().expect("made above");
            let (d, be, kv, at) = (&self.draft, self.be, &mut self.kv, first + done);
            be.run(&mut || {
                be.copy_rows(taps, row0 + done, &mut cb.taps, 0, n)?;
                d.add_context(be, cb, at, kv)
            })?;
            done += n;
        }
        self.ctx_len = first + rows;
        Ok(())
    }

    fn propose(&mut self, ctx: &ProposeCtx<'_>, k: usize, draft: &mut Draft) -> Result<()> {
        let t = ctx.tokens;
        if k == 0 || t.is_empty() {
            return Ok(());
        }
        let start = t.len() - 1;
        ensure!(
            start == self.ctx_len,
            "the DFlash draft holds {} positions of context but the target {start}: they are out of step",
            self.ctx_len
        );
        self.draft.set_block(self.be, self.target, &mut self.block, t[start], start)?;
        // one repeating pass (a CUDA graph replay once warm): the block, then
        // each row's argmax
        let (d, be, target) = (&self.draft, self.be, self.target);
        let (bb, kv, am) = (&mut self.block, &mut self.kv, &mut self.argmax);
        be.run_graph(self.key, &mut || {
            d.run_block(be, target, bb, kv)?;
            be.argmax(&bb.logits, am)
        })?;
        let n = k.min(self.block_size() - 1);
        if !ctx.sampling.is_greedy() {
            return self.sample(ctx, n, draft);
        }
        self.be.read_i32(&self.argmax, &mut self.ids)?;
        draft.tokens.extend(self.ids[..n].iter().map(|&x| x as u32));
        Ok(())
    }
}
