//! Helpers shared by this crate's tests.
#![allow(dead_code)]

pub mod batch;

use fusebox_core::cpu::CpuBackend;
use fusebox_core::fixtures::fixture;
use fusebox_core::Backend;
use fusebox_engine::{
    BatchEngine, GenerateOptions, GenerateOutput, Proposer, Session, SpecOptions, SpecStats, Speculation,
};
use fusebox_models::{Decoder, Model};

/// Every tiny fixture model: safetensors, GGUF and MLX-quantized, dense and MoE.
pub const ALL_MODELS: [&str; 9] = [
    "tiny-qwen3",
    "tiny-llama",
    "tiny-llama-linear",
    "tiny-qwen3-moe",
    "gguf/tiny-qwen3.gguf",
    "gguf/tiny-llama.gguf",
    "gguf/tiny-qwen3-moe.gguf",
    "mlx/tiny-qwen3-4bit-g64",
    "mlx/tiny-qwen3-moe-4bit-g64",
];

pub fn cpu() -> CpuBackend {
    CpuBackend::new(0).unwrap()
}

/// A fixture model (a path under `tests/fixtures`), with the file named on failure.
pub fn load(name: &str, be: &dyn Backend) -> Model {
    let path = fixture(name);
    Model::load(&path, be).unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

/// Greedy decoding of `n` new tokens, no stop tokens.
pub fn greedy(n: usize) -> fusebox_engine::GenerateOptions {
    fusebox_engine::GenerateOptions {
        max_new_tokens: n,
        stop_ids: vec![],
        sampling: fusebox_engine::SamplingParams::greedy(),
    }
}

/// `n` token ids below `vocab`, the same for a seed.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    fusebox_core::dtype::random_tokens(n, vocab, seed)
}

/// The SmolLM2-135M-Instruct Q4_1 asset, or `None` after printing why `test` skips.
pub fn smollm2(test: &str) -> Option<std::path::PathBuf> {
    fusebox_core::fixtures::asset_or_skip("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf", test)
}

/// `text` as a user message in the model's chat template, tokenized.
pub fn chat_prompt(model: &Model, text: &str) -> Vec<u32> {
    let t = model.chat_template.as_ref().expect("the model has a chat template");
    let s = t.render(&[fusebox_models::Message::new("user", text)], true, None).unwrap();
    model.tokenizer.encode(&s, false).unwrap()
}

/// A prompt that asks for a paragraph back with one word changed: prompt
/// lookup's best case.
pub const EDIT_PROMPT: &str = "Repeat the following paragraph word for word, changing only 'Tuesday' to 'Friday'. Paragraph: On Tuesday morning the library opened an hour late because the heating had failed overnight. The staff set up a table of hot drinks by the entrance, and the children's reading group moved into the sunny room upstairs, where they read stories about dragons, ships and faraway islands until lunch.";
/// A prompt that repeats itself (12 tokens, twice, then 6 of them again), so
/// prompt lookup finds matches.
pub fn repeating_prompt(vocab: usize, seed: u64) -> Vec<u32> {
    let p = tokens(12, vocab, seed);
    [&p[..], &p[..], &p[..6]].concat()
}

/// Every row of a verify pass over `run` (after `prompt`) equals, bit for
/// bit, the logits of a one-token decode step at that position, and its
/// argmax the step's. The pass runs `passes` times (rolled back in between),
/// so a backend that captures graphs checks its eager run, its capture and
/// its replay. `what` names the case in failures, which say how many values
/// of the first bad row differ and by how much.
pub fn assert_verify_rows_equal_steps(
    model: &Decoder,
    be: &dyn Backend,
    what: &str,
    prompt: &[u32],
    run: &[u32],
    ctx: usize,
    passes: usize,
) {
    let m = run.len();
    let vocab = model.cfg.vocab_size;
    let mut a = Session::new(model, be, ctx).unwrap();
    a.prefill(prompt).unwrap();
    let want: Vec<Vec<f32>> = run.iter().map(|&t| a.step(t).unwrap().to_vec()).collect();
    let mut b = Session::new(model, be, ctx).unwrap();
    b.prefill(prompt).unwrap();
    for pass in 0..passes {
        b.truncate(prompt.len());
        let am = b.verify(run).unwrap().to_vec();
        assert_eq!(b.kv.len, prompt.len() + m, "{what}: m={m}");
        let got = b.verify_logits().unwrap().to_vec();
        assert_eq!(got.len(), m * vocab, "{what}: m={m}");
        for (i, (g, w)) in got.chunks(vocab).zip(&want).enumerate() {
            let bad: Vec<usize> = (0..vocab).filter(|&j| g[j].to_bits() != w[j].to_bits()).collect();
            if !bad.is_empty() {
                let worst = bad.iter().map(|&j| (g[j] - w[j]).abs()).fold(0f32, f32::max);
                panic!(
                    "{what}: m={m} pass {pass}: row {i} differs from the decode step in {} of {vocab} logits \
                     (first at {}: {} vs {}; largest difference {worst:e})",
                    bad.len(),
                    bad[0],
                    g[bad[0]],
                    w[bad[0]]
                );
            }
            assert_eq!(
                am[i] as u32,
                fusebox_engine::sampling::argmax(w),
                "{what}: m={m} pass {pass}: argmax of row {i}"
            );
        }
    }
}

/// DFlash whose drafts are swapped for the target's own continuation, so
/// rounds accept several tokens and the draft's context grows by several
/// verify rows at a time; it must stay in step (DFlash checks that its
/// context ends where the target's does) and the output stays plain greedy.
pub struct Oracle<'a> {
    pub inner: fusebox_engine::DFlash<'a>,
    /// The target's greedy sequence (prompt, then output).
    pub truth: Vec<u32>,
}

impl fusebox_engine::Proposer for Oracle<'_> {
    fn name(&self) -> &'static str {
        "oracle"
    }
    fn target_layers(&self) -> &[usize] {
        self.inner.target_layers()
    }
    fn observe(&mut self, taps: &fusebox_core::Tensor, row0: usize, first: usize, rows: usize) -> anyhow::Result<()> {
        self.inner.observe(taps, row0, first, rows)
    }
    fn propose(
        &mut self,
        ctx: &fusebox_engine::spec::ProposeCtx<'_>,
        k: usize,
        draft: &mut fusebox_engine::spec::Draft,
    ) -> anyhow::Result<()> {
        self.inner.propose(ctx, k, draft)?;
        let n = draft.tokens.len();
        draft.clear();
        // every other round a wrong last draft, so rollback happens too
        let at = ctx.tokens.len();
        let wrong = at.is_multiple_of(2) as usize;
        draft.tokens.extend(self.truth.iter().skip(at).take(n));
        if wrong == 1 && !draft.tokens.is_empty() {
            let last = draft.tokens.len() - 1;
            draft.tokens[last] = (draft.tokens[last] + 1) % 400;
        }
        Ok(())
    }
}

/// The reference for plain generation: `n` tokens drawn after `prompt`
/// with a [`Session`]'s low-level steps (`advance`, then `decode`: the
/// device sampler), no stop rules.
pub fn draws(
    model: &Decoder,
    be: &dyn Backend,
    ctx: usize,
    prompt: &[u32],
    p: &fusebox_engine::SamplingParams,
    n: usize,
) -> Vec<u32> {
    let mut s = Session::new(model, be, ctx).unwrap();
    s.set_sampling(p).unwrap();
    let mut out = vec![s.advance(prompt).unwrap()];
    while out.len() < n {
        out.push(s.decode(*out.last().unwrap()).unwrap());
    }
    out
}

/// `prompt` generated alone with a context of `ctx` tokens, as the CLI
/// generates (`BatchEngine::lone`).
pub fn generate(
    model: &Decoder,
    be: &dyn Backend,
    ctx: usize,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> GenerateOutput {
    let mut engine = BatchEngine::lone(model, be, ctx).unwrap();
    engine.generate(prompt, opts, &mut None, |_| Ok(true)).unwrap().0
}

/// [`generate`] speculating with `proposer` (lent for the generation).
pub fn speculate(
    model: &Decoder,
    be: &dyn Backend,
    ctx: usize,
    prompt: &[u32],
    opts: &GenerateOptions,
    options: SpecOptions,
    proposer: &mut dyn Proposer,
) -> (GenerateOutput, SpecStats) {
    try_speculate(model, be, ctx, prompt, opts, options, proposer).unwrap()
}

/// [`speculate`], its error returned.
pub fn try_speculate(
    model: &Decoder,
    be: &dyn Backend,
    ctx: usize,
    prompt: &[u32],
    opts: &GenerateOptions,
    options: SpecOptions,
    proposer: &mut dyn Proposer,
) -> anyhow::Result<(GenerateOutput, SpecStats)> {
    let mut engine = BatchEngine::lone(model, be, ctx)?;
    let mut spec = Some(Speculation { options, proposer: Box::new(proposer) });
    let (out, stats) = engine.generate(prompt, opts, &mut spec, |_| Ok(true))?;
    Ok((out, stats.expect("speculation was given")))
}
