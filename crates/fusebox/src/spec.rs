//! The speculative decoding flags shared by `generate`, `run` and `bench`.

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fusebox_core::Backend;
use fusebox_engine::spec::MAX_SPEC_K;
use fusebox_engine::{DFlash, DraftModel, PromptLookup, SpecOptions, Speculation};
use fusebox_models::dflash::{is_dflash, DFlashConfig, DFlashDraft};
use fusebox_models::synthetic::{Quant, SyntheticSource};
use fusebox_models::{Decoder, Model};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SpecMethod {
    /// Prompt lookup: draft the continuation of the latest earlier
    /// occurrence of the last tokens in the prompt and output (no weights).
    Ngram,
    /// A draft model (--draft) sharing the target's tokenizer.
    Draft,
    /// A z-lab DFlash block-diffusion draft (--draft DIR) trained for the
    /// target: it drafts a block at once from the target's hidden states.
    Dflash,
}

/// Speculative decoding: a cheap proposer drafts tokens and the model checks
/// them all in one pass. Greedy output is unchanged token for token; sampled
/// output keeps the model's distribution (rejection sampling).
#[derive(Args, Debug, Default)]
pub struct SpecArgs {
    /// Speculative decoding method: ngram (prompt lookup), draft (a
    /// smaller model, --draft) or dflash (a DFlash draft, --draft). Off by
    /// default.
    #[arg(long, value_enum, value_name = "METHOD")]
    pub spec: Option<SpecMethod>,
    /// The draft for --spec draft (a model directory or .gguf file with the
    /// target's tokenizer) or --spec dflash (a DFlash draft directory made
    /// for the target). Alone it implies the method its config.json names.
    #[arg(long, value_name = "PATH")]
    pub draft: Option<PathBuf>,
    /// Tokens drafted per round, 1 to 31 (default: 4 for ngram, 8 for draft,
    /// block_size - 1 for dflash).
    #[arg(long, value_name = "N")]
    pub spec_k: Option<usize>,
    /// --spec ngram: the longest suffix matched (tried down to 1 token).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub spec_ngram_max: usize,
    /// Record every round: --json's spec.rounds becomes a list of
    /// {"proposed": [ids], "accepted": n}.
    #[arg(long)]
    pub spec_trace: bool,
}

impl SpecArgs {
    /// The method the flags ask for, checked (`None`: no speculation).
    pub fn method(&self) -> Result<Option<SpecMethod>> {
        self.method_for(false)
    }

    /// [`SpecArgs::method`], where `synthetic` allows `--spec dflash`
    /// without `--draft` (`bench --synthetic` makes a random draft).
    pub fn method_for(&self, synthetic: bool) -> Result<Option<SpecMethod>> {
        let m = match (self.spec, &self.draft) {
            (Some(SpecMethod::Dflash), None) if synthetic => Some(SpecMethod::Dflash),
            (None, Some(p)) if is_dflash_dir(p) => Some(SpecMethod::Dflash),
            (None, Some(_)) | (Some(SpecMethod::Draft), Some(_)) => Some(SpecMethod::Draft),
            (Some(SpecMethod::Dflash), Some(_)) => Some(SpecMethod::Dflash),
            (Some(SpecMethod::Draft), None) => {
                bail!("--spec draft needs --draft PATH (a model with the same tokenizer)")
            }
            (Some(SpecMethod::Dflash), None) => {
                bail!("--spec dflash needs --draft DIR (a DFlash draft made for this model)")
            }
            (Some(SpecMethod::Ngram), Some(_)) => bail!("--draft is for --spec draft, not --spec ngram"),
            (m, None) => m,
        };
        if m.is_none() && (self.spec_k.is_some() || self.spec_trace) {
            bail!("--spec-k and --spec-trace need --spec ngram|draft|dflash");
        }
        self.check_k()?;
        Ok(m)
    }

    fn check_k(&self) -> Result<()> {
        if let Some(k) = self.spec_k {
            if !(1..=MAX_SPEC_K).contains(&k) {
                bail!("--spec-k must be between 1 and {MAX_SPEC_K}, got {k}");
            }
        }
        if self.spec_ngram_max == 0 {
            bail!("--spec-ngram-max must be at least 1");
        }
        Ok(())
    }

    /// `bench --synthetic --spec dflash`: a random DFlash draft of the
    /// published layout (`layers` layers, blocks of 16) for `target`.
    pub fn synthetic_dflash<'m>(
        &self,
        target: &'m Decoder,
        quant: Quant,
        layers: usize,
        be: &'m dyn Backend,
        ctx: usize,
    ) -> Result<Speculation<'m>> {
        let mut s = random_dflash(target, quant, layers, be, ctx)?;
        s.options = SpecOptions { k: self.spec_k.unwrap_or(s.options.k), trace: self.spec_trace };
        Ok(s)
    }

    /// Load the draft model, when there is one.
    pub fn load_draft(&self, be: &dyn Backend) -> Result<Option<Model>> {
        // (a missing DFlash draft is `bench --synthetic`'s to make or to refuse)
        match (self.method_for(true)?, &self.draft) {
            (Some(SpecMethod::Draft), Some(p)) => {
                Ok(Some(Model::load(p, be).with_context(|| format!("loading the draft model {}", p.display()))?))
            }
            _ => Ok(None),
        }
    }

    /// The speculation for `target` (`None` without --spec), with the draft
    /// model [`SpecArgs::load_draft`] loaded. Prompt lookup needs no target
    /// model (a synthetic one in `bench`); a draft model does.
    pub fn build<'m>(
        &self,
        target: Option<&'m Model>,
        draft: Option<&'m Model>,
        be: &'m dyn Backend,
        ctx: usize,
    ) -> Result<Option<Speculation<'m>>> {
        let Some(method) = self.method()? else { return Ok(None) };
        let (k, proposer): (usize, Box<dyn fusebox_engine::Proposer + 'm>) = match method {
            SpecMethod::Ngram => (4, Box::new(PromptLookup::new(self.spec_ngram_max)?)),
            SpecMethod::Draft => {
                let d = draft.context("--spec draft: the draft model is not loaded")?;
                let t = target.context("--spec draft needs a target model with a tokenizer (-m PATH)")?;
                (8, Box::new(DraftModel::new(t, d, be, ctx)?))
            }
            SpecMethod::Dflash => {
                let t = target.context("--spec dflash needs a target model (-m PATH)")?;
                return self.dflash(self.load_dflash(t, be)?, t, be, ctx).map(Some);
            }
        };
        Ok(Some(Speculation { options: SpecOptions { k: self.spec_k.unwrap_or(k), trace: self.spec_trace }, proposer }))
    }

    /// Load the `--draft` DFlash draft for `target`, checking that it fits.
    pub fn load_dflash(&self, target: &Model, be: &dyn Backend) -> Result<Arc<DFlashDraft>> {
        let p = self.draft.as_ref().context("--spec dflash needs --draft DIR")?;
        let d = DFlashDraft::load(p, be).with_context(|| format!("loading the DFlash draft {}", p.display()))?;
        d.cfg
            .check_target(target.config())
            .with_context(|| format!("the DFlash draft {} does not fit {}", p.display(), target.path.display()))?;
        Ok(Arc::new(d))
    }

    /// DFlash speculation for `target` with `draft`'s weights (shared with
    /// every other proposer made from them): a whole block a round unless
    /// `--spec-k` says otherwise.
    pub fn dflash<'m>(
        &self,
        draft: Arc<DFlashDraft>,
        target: &'m Model,
        be: &'m dyn Backend,
        ctx: usize,
    ) -> Result<Speculation<'m>> {
        let d = DFlash::new(draft, &target.decoder, be, ctx)?;
        let k = self.spec_k.unwrap_or((d.block_size() - 1).min(MAX_SPEC_K));
        Ok(Speculation { options: SpecOptions { k, trace: self.spec_trace }, proposer: Box::new(d) })
    }
}

/// Whether `path` is a directory whose config.json names a DFlash draft.
fn is_dflash_dir(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .is_some_and(|v| is_dflash(&v))
}

/// A random DFlash draft of `layers` layers and blocks of 16 for `target`
/// (the published layout), drafting a whole block a round (k = 15): it
/// measures what a round costs, since its drafts are rejected.
pub fn random_dflash<'m>(
    target: &'m Decoder,
    quant: Quant,
    layers: usize,
    be: &'m dyn Backend,
    ctx: usize,
) -> Result<Speculation<'m>> {
    let cfg = DFlashConfig::synthetic(&target.cfg, layers, 16);
    let d = DFlashDraft::load_from(cfg, &SyntheticSource::new(quant, be), be)?;
    let d = DFlash::new(d, target, be, ctx)?;
    let k = d.block_size() - 1;
    Ok(Speculation { options: SpecOptions { k, trace: false }, proposer: Box::new(d) })
}
