//! `fusebox tune`: re-run the fused-vs-graph A/B on this GPU and write the
//! per-device fusion policy file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use fusebox_core::fusion::{self, BackendKind, Site, SITES};
use fusebox_engine::{BatchEngine, GenerateOptions, SamplingParams};
use fusebox_models::synthetic::{self, Quant, SyntheticSource};
use fusebox_models::{Decoder, Model};
use serde_json::json;

use crate::bench::{git_commit, random_prompt, AbRun};
use crate::common::{backend, DeviceArg};
use crate::spec::random_dflash;

/// Layers of the random DFlash draft `dflash_attn` is measured with (the
/// published Qwen3-8B draft's).
const DFLASH_LAYERS: usize = 5;

/// The models `tune` measures by default: synthetic weights of the shapes
/// users run, in the formats they run them.
const DEFAULT_MODELS: [&str; 3] = ["qwen3-0.6b:bf16", "qwen3-8b:q4g64", "qwen3-30b-a3b:q4g64"];

/// `fusebox tune` arguments (the command's help is on `Command::Tune` in main.rs).
#[derive(ClapArgs, Debug)]
#[command(
    after_help = "Examples:\n  fusebox tune\n  fusebox tune --model qwen3-8b:q4g64 --rounds 7\n  fusebox tune --model ./Qwen3-0.6B --dry-run"
)]
pub struct Args {
    /// Models to measure (repeatable): SHAPE:FORMAT for synthetic weights
    /// (shapes qwen3-0.6b, qwen3-8b, qwen3-30b-a3b, llama-3.1-8b; formats bf16,
    /// or MLX affine q<bits>g<group>: q4g64, q8g64, q4g32), or a model directory / .gguf file.
    /// [default: qwen3-0.6b:bf16 qwen3-8b:q4g64 qwen3-30b-a3b:q4g64]
    #[arg(short, long, value_name = "MODEL")]
    pub model: Vec<String>,
    /// A/B rounds per site and model (each decodes once fused, once on the graph path).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub rounds: usize,
    /// Prompt tokens before each decode.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub prompt_len: usize,
    /// Tokens decoded per run.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub gen: usize,
    /// The smallest median speed-up that switches a site on (0.02 = 2%).
    #[arg(long, default_value_t = 0.02, value_name = "FRACTION")]
    pub min_gain: f64,
    /// Print the decisions without writing the policy file.
    #[arg(long)]
    pub dry_run: bool,
    /// Device: cuda or cuda:N (the CPU has no per-device policy to tune).
    #[arg(long, default_value = "cuda", value_name = "DEVICE")]
    pub device: DeviceArg,
}

/// A `--model` argument.
enum Spec<'a> {
    Synthetic(&'a str, Quant),
    Path(PathBuf),
}

fn parse_spec(spec: &str) -> Result<Spec<'_>> {
    match spec.split_once(':') {
        Some((shape, fmt)) if synthetic::SHAPES.contains(&shape) => {
            Ok(Spec::Synthetic(shape, Quant::parse(fmt).with_context(|| format!("--model {spec}"))?))
        }
        _ if synthetic::SHAPES.contains(&spec) => {
            bail!("--model {spec}: give the weight format too, e.g. {spec}:bf16 or {spec}:q4g64")
        }
        _ => {
            let p = PathBuf::from(spec);
            if !p.exists() {
                bail!("--model {spec}: no such file or directory (synthetic shapes: {})", synthetic::SHAPES.join(", "));
            }
            Ok(Spec::Path(p))
        }
    }
}

/// One site's A/B on one model.
struct Measured {
    model: String,
    median: f64,
    min: f64,
    max: f64,
    fused: f64,
    graph: f64,
}

/// The decision rule: on only when every model shows a median gain of at
/// least `min_gain` with a half-range of the ratios below the gain.
fn decide(m: &[Measured], min_gain: f64) -> (bool, String) {
    if m.is_empty() {
        return (false, "tuned: occurs in none of the measured models".into());
    }
    let wins = |x: &Measured| x.median - 1.0 >= min_gain && (x.max - x.min) / 2.0 < x.median - 1.0;
    let on = m.iter().all(wins);
    let detail: Vec<String> =
        m.iter().map(|x| format!("{} {:.3}x ({:.3}-{:.3})", x.model, x.median, x.min, x.max)).collect();
    let verdict = if on { "wins on every model" } else { "does not win everywhere" };
    (on, format!("tuned: {verdict}: {}", detail.join(", ")))
}

pub fn run(a: Args) -> Result<()> {
    if a.rounds == 0 || a.gen == 0 || a.prompt_len == 0 {
        bail!("--rounds, --gen and --prompt-len must be at least 1");
    }
    if !(0.0..1.0).contains(&a.min_gain) {
        bail!("--min-gain {} must be a fraction in [0, 1)", a.min_gain);
    }
    let models: Vec<String> =
        if a.model.is_empty() { DEFAULT_MODELS.iter().map(|s| s.to_string()).collect() } else { a.model.clone() };
    // every --model is checked before the GPU is opened and the first (long) measurement
    for spec in &models {
        parse_spec(spec)?;
    }
    let be = backend(a.device, 0)?;
    let be = &*be;
    let Some(policy) = be.fusion_policy() else { bail!("{} has no fused paths to tune", be.name()) };
    if policy.backend != BackendKind::Cuda {
        bail!("tune measures a GPU; {} is not one (use --device cuda)", be.name());
    }
    let device = be.device_name();
    let mut results: Vec<(Site, Vec<Measured>)> = SITES.iter().map(|&s| (s, vec![])).collect();
    for spec in &models {
        let loaded;
        let synth;
        let (decoder, quant): (&Decoder, Quant) = match parse_spec(spec)? {
            Spec::Synthetic(shape, quant) => {
                eprintln!("fusebox: building random {spec} weights on {}...", be.name());
                synth = Decoder::load(synthetic::config(shape)?, &SyntheticSource::new(quant, be), be)?;
                (&synth, quant)
            }
            Spec::Path(p) => {
                loaded = Model::load(&p, be)?;
                (&loaded.decoder, Quant::Bf16)
            }
        };
        let cfg = &decoder.cfg;
        if a.prompt_len + a.gen > cfg.max_position_embeddings {
            bail!("--prompt-len + --gen exceeds {spec}'s context of {}", cfg.max_position_embeddings);
        }
        let prompt = random_prompt(a.prompt_len, cfg.vocab_size);
        let opts = GenerateOptions { max_new_tokens: a.gen, stop_ids: vec![], sampling: SamplingParams::greedy() };
        let mut engine = BatchEngine::lone(decoder, be, a.prompt_len + a.gen)?;
        let ab = AbRun { be, opts: &opts, prompt: &prompt, rounds: a.rounds };
        for (site, m) in results.iter_mut() {
            let dflash = *site == Site::DflashAttn;
            if !(cfg.has_site(*site) || (dflash && cfg.moe.is_none())) || !site.has_fused_path(BackendKind::Cuda) {
                continue;
            }
            eprintln!("fusebox: {spec}: A/B of {}", site.name());
            let r = if dflash {
                // DFlash generation with a random draft of the published shape
                let s = random_dflash(decoder, quant, DFLASH_LAYERS, be, a.prompt_len + a.gen)?;
                ab.run_with(&mut engine, &mut Some(s), &[*site], site.name())?
            } else {
                ab.run(&mut engine, &[*site], site.name())?
            };
            let f = |k: &str, s: &str| r[k][s].as_f64().unwrap_or(0.0);
            m.push(Measured {
                model: spec.clone(),
                median: f("ratio", "median"),
                min: f("ratio", "min"),
                max: f("ratio", "max"),
                fused: f("fused_tok_s", "median"),
                graph: f("graph_tok_s", "median"),
            });
        }
    }
    println!("device  {device}");
    println!("commit  {}", git_commit());
    println!("| site | model | fused tok/s | graph tok/s | ratio (min-max) |");
    println!("|---|---|---|---|---|");
    let mut sites = serde_json::Map::new();
    let mut decided = vec![];
    for (site, m) in &results {
        for x in m {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.3} ({:.3}-{:.3}) |",
                site.name(),
                x.model,
                x.fused,
                x.graph,
                x.median,
                x.min,
                x.max
            );
        }
        let (on, reason) = decide(m, a.min_gain);
        decided.push((*site, on, reason.clone()));
        let runs: Vec<_> = m
            .iter()
            .map(|x| {
                json!({"model": x.model, "ratio_median": x.median, "ratio_min": x.min, "ratio_max": x.max,
                            "fused_tok_s": x.fused, "graph_tok_s": x.graph})
            })
            .collect();
        sites.insert(site.name().into(), json!({"on": on, "reason": reason, "measured": runs}));
    }
    println!();
    println!("decided:");
    for (site, on, reason) in &decided {
        println!("  {:15}{:6} {reason}", site.name(), if *on { "fused" } else { "graph" });
    }
    let file = json!({
        "device": device, "commit": git_commit(), "utc": fusebox_core::clock::Utc::now().stamp(),
        "command": std::env::args().collect::<Vec<_>>().join(" "), "rounds": a.rounds,
        "prompt_len": a.prompt_len, "gen": a.gen, "min_gain": a.min_gain, "sites": sites,
    });
    if a.dry_run {
        println!("(--dry-run: no policy file written)");
        return Ok(());
    }
    let Some(path) = fusion::tuned_path(&device) else {
        bail!("no place for the policy file: set FUSEBOX_POLICY_DIR or HOME")
    };
    write_atomically(&path, &serde_json::to_string_pretty(&file)?)?;
    println!(
        "wrote   {} (FUSEBOX_FUSED_<SITE>=0|1 still overrides it; delete it for the built-in defaults)",
        path.display()
    );
    Ok(())
}

/// Write through a temporary file and a rename, so a failed run never leaves
/// a half-written policy behind.
fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let dir = path.parent().context("policy path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, format!("{text}\n")).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(median: f64, min: f64, max: f64) -> Measured {
        Measured { model: "x".into(), median, min, max, fused: 0.0, graph: 0.0 }
    }

    #[test]
    fn a_site_is_on_only_when_it_wins_everywhere_beyond_its_spread() {
        assert!(decide(&[m(1.10, 1.08, 1.12), m(1.05, 1.04, 1.06)], 0.02).0);
        assert!(!decide(&[m(1.10, 1.08, 1.12), m(1.01, 1.00, 1.02)], 0.02).0, "1% is below the 2% bar");
        assert!(!decide(&[m(1.03, 0.95, 1.11)], 0.02).0, "spread 8% hides a 3% gain");
        assert!(!decide(&[m(0.97, 0.96, 0.98)], 0.02).0);
        assert!(!decide(&[], 0.02).0);
    }
}
