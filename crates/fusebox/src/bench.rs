//! `fusebox bench`: prefill and decode speed against the memory roofline.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use fusebox_core::fusion::{BackendKind, Site, SITES};
use fusebox_core::Backend;
use fusebox_engine::{BatchEngine, GenerateOptions, SamplingParams, Session, Speculation};
use fusebox_models::synthetic::{self, Quant, SyntheticSource};
use fusebox_models::{Decoder, Message, Model};
use serde_json::json;

use crate::common::{backend, human, DeviceArg};
use crate::spec::{SpecArgs, SpecMethod};

/// Measure prefill and decode speed, and compare decode with the memory
/// roofline: weight (and KV-cache) bytes read per token over the copy
/// bandwidth measured in the same process.
///
/// Runs a warm-up, then --reps repetitions of: prefill --prompt-len random
/// tokens, decode --gen tokens greedily. Prints a table and writes a JSON file
/// under --out-dir/<device>/<model>-<UTC time>.json (never overwriting).
#[derive(ClapArgs, Debug)]
#[command(
    after_help = "Examples:\n  fusebox bench --synthetic qwen3-0.6b --quant q4g64\n  fusebox bench -m ~/.cache/fusebox/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf --prompt-len 128 --gen 64"
)]
pub struct Args {
    /// The model to measure: a safetensors model directory (Hugging Face or MLX-quantized) or a .gguf file.
    #[arg(short, long, value_name = "PATH", conflicts_with = "synthetic", required_unless_present = "synthetic")]
    pub model: Option<PathBuf>,
    /// Random weights of a real model's exact shape, built in memory:
    /// qwen3-0.6b, qwen3-8b, qwen3-30b-a3b or llama-3.1-8b.
    #[arg(long, value_name = "SHAPE")]
    pub synthetic: Option<String>,
    /// Dequantize every weight of -m to f32 at load (a quantized model's
    /// full-precision reference).
    #[arg(long, requires = "model")]
    pub f32: bool,
    /// Weight format of a synthetic model: bf16, or MLX affine q<bits>g<group>
    /// (q4g64, q8g64; q4g32 is the GPU layout of GGUF Q4_0 / Q4_K).
    #[arg(long, default_value = "bf16", value_name = "FORMAT")]
    pub quant: String,
    /// Prompt tokens per repetition.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub prompt_len: usize,
    /// Generated tokens per repetition.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub gen: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub reps: usize,
    /// A/B a fused decode site against its graph path in this process:
    /// alternate decode with the site fused (every other site on the graph
    /// path) and decode with every site on the graph path (ABAB..., --rounds
    /// each, the same prompt), and report the median ratio and its spread.
    /// A site name (qk_norm, moe, add_rms_norm, rope_kv_append, swiglu,
    /// dflash_attn) or "all": every site with a fused kernel that occurs in
    /// the model, one by one, then all of them together. dflash_attn goes
    /// with --spec dflash: DFlash generation with the draft's attention
    /// fused against its graph path (the target's sites at their defaults),
    /// with the drafting time per round of each.
    #[arg(long, value_name = "SITE")]
    pub ab: Option<String>,
    /// With --spec: decode plainly and speculatively, alternating --rounds
    /// times on the same prompt, and report both tok/s and their ratio
    /// (--spec ngram also runs on --synthetic weights; --spec dflash there
    /// makes a random DFlash draft of --draft-layers layers and blocks of 16,
    /// whose drafts are rejected: it measures a round's cost; a draft model
    /// needs -m).
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Layers of the random DFlash draft of `--synthetic ... --spec dflash`.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub draft_layers: usize,
    /// The prompt as text, a user message in the model's chat template
    /// (raw when it has none; needs -m), instead of --prompt-len random tokens.
    #[arg(long, value_name = "TEXT", requires = "model")]
    pub prompt_text: Option<String>,
    /// Time one verify pass of k + 1 rows against one decode step, for
    /// k = 0..=K, at the context --prompt-len leaves (the cost curve of
    /// speculative decoding).
    #[arg(long, value_name = "K")]
    pub verify_curve: Option<usize>,
    /// Continuous batching's decode cost: for batch sizes 1, 2, 4, ... N,
    /// that many copies of the prompt decoded together through the
    /// server's engine (paged KV cache), --gen steps each; reports the step
    /// time, the aggregate tok/s and the step's cost against one sequence's.
    #[arg(long, value_name = "N", conflicts_with_all = ["verify_curve", "ab"])]
    pub batch_curve: Option<usize>,
    /// Serving under load through the server's engine, in process: for
    /// each concurrency C (comma-separated, e.g. 1,8,32,64), C requests of
    /// the prompt and --gen tokens in flight at once, 2 C in all; reports
    /// output tok/s, time to first token and inter-token latency (p50/p99).
    #[arg(long, value_name = "C,...", value_delimiter = ',', conflicts_with_all = ["verify_curve", "ab", "batch_curve"])]
    pub serve: Vec<usize>,
    /// Tokens one engine step may run under --serve (the server's
    /// --max-batch-tokens).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_batch_tokens: usize,
    /// Rounds of an --ab or --spec run (each round decodes once each way).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub rounds: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench-results", value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Device: auto (a CUDA GPU when one is present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceArg,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn slug(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
    s.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-")
}

/// The commit: `FUSEBOX_COMMIT` if set (a copied tree whose .git is stale),
/// else `git rev-parse --short HEAD`.
pub(crate) fn git_commit() -> String {
    if let Ok(c) = std::env::var("FUSEBOX_COMMIT") {
        return c;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// A deterministic random prompt of `n` token ids below `vocab`.
pub(crate) fn random_prompt(n: usize, vocab: usize) -> Vec<u32> {
    fusebox_core::dtype::random_tokens(n, vocab, 0x2545_F491_4F6C_DD1D)
}

pub fn run(a: Args) -> Result<()> {
    if a.prompt_len == 0 || a.gen == 0 || a.reps == 0 {
        bail!("--prompt-len, --gen and --reps must be at least 1");
    }
    let spec_method = a.spec.method_for(a.synthetic.is_some())?;
    let dflash_ab = a.ab.as_deref() == Some(Site::DflashAttn.name());
    if dflash_ab && spec_method != Some(SpecMethod::Dflash) {
        bail!(
            "--ab dflash_attn measures DFlash drafting: add --spec dflash (--draft DIR, or a random draft with --synthetic)"
        );
    }
    if a.serve.contains(&0) {
        bail!("--serve C1,C2,...: every concurrency at least 1");
    }
    if spec_method.is_some()
        && ((a.ab.is_some() && !dflash_ab)
            || a.verify_curve.is_some()
            || a.batch_curve.is_some()
            || !a.serve.is_empty())
    {
        bail!("--spec, --ab, --verify-curve, --batch-curve and --serve are separate measurements: give one (--spec dflash --ab dflash_attn is one)");
    }
    let be = backend(a.device, a.threads)?;
    let be = &*be;
    let loaded = a.model.as_ref().map(|p| Model::load_with(p, be, a.f32)).transpose()?;
    let synth;
    let (decoder, name): (&Decoder, String) = match (&a.model, &a.synthetic) {
        (Some(p), _) => {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            (&loaded.as_ref().context("loaded above")?.decoder, stem)
        }
        (None, Some(shape)) => {
            let quant = Quant::parse(&a.quant)?;
            let cfg = synthetic::config(shape)?;
            eprintln!("fusebox: building random {shape} weights ({}) on {}...", a.quant, be.name());
            synth = Decoder::load(cfg, &SyntheticSource::new(quant, be), be)?;
            (&synth, format!("{shape}-{}", a.quant))
        }
        (None, None) => bail!("give -m PATH or --synthetic SHAPE"),
    };
    let cfg = &decoder.cfg;
    let ab = a.ab.as_deref().map(|ab| ab_sites(ab, be, cfg, dflash_ab).map(|s| (ab, s))).transpose()?;
    let ctx = a.prompt_len + a.gen;
    if ctx > cfg.max_position_embeddings {
        bail!("--prompt-len + --gen = {ctx} exceeds the model's context of {}", cfg.max_position_embeddings);
    }
    eprintln!("fusebox: measuring copy bandwidth...");
    let bw = be.copy_bandwidth()? * 1e9;
    let weight_bytes = decoder.bytes_per_token();
    // KV bytes read per decoded token, averaged over the decode (f32 cache on the CPU, bf16 on CUDA)
    let kv_bytes = cfg.kv_bytes_per_token(be.kv_dtype().size()) * (a.prompt_len + a.gen / 2);
    let bytes = weight_bytes + kv_bytes;
    let roofline = bw / bytes as f64;

    let prompt = match (&a.prompt_text, &loaded) {
        (Some(t), Some(m)) => match &m.chat_template {
            Some(tpl) => m.tokenizer.encode(&tpl.render(&[Message::new("user", t)], true, None)?, false)?,
            None => m.tokenizer.encode(t, true)?,
        },
        _ => random_prompt(a.prompt_len, cfg.vocab_size),
    };
    // room for the generation, and for a verify pass of --verify-curve K + 1 rows
    let ctx = ctx.max(prompt.len() + a.gen).max(prompt.len() + a.verify_curve.map_or(0, |k| k + 2));
    let opts = GenerateOptions { max_new_tokens: a.gen, stop_ids: vec![], sampling: SamplingParams::greedy() };
    let warm_up = GenerateOptions { max_new_tokens: 8, ..opts.clone() };
    if let Some(n) = a.batch_curve {
        let rows = crate::bench_batch::batch_curve(decoder, be, &prompt, a.gen, n)?;
        let (device, commit) = (be.device_name(), git_commit());
        println!("model           {name}");
        println!("device          {device}");
        println!("commit          {commit}");
        println!("| batch | step ms | tok/s | step / one sequence's |");
        println!("|---|---|---|---|");
        for r in &rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            println!("| {} | {:.3} | {:.1} | {:.2} |", r["batch"], f("step_secs") * 1e3, f("tok_s"), f("ratio"));
        }
        let result = json!({
            "model": name, "device": device, "backend": be.name(), "commit": commit, "batch_curve": rows,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "utc": fusebox_core::clock::Utc::now().stamp(), "prompt_len": prompt.len(), "gen": a.gen,
            "weight_bytes_per_token": weight_bytes, "copy_bandwidth_bytes_s": bw, "roofline_tok_s": roofline,
        });
        return write_result(&a.out_dir, &device, &format!("{name}-batch-curve"), &result);
    }
    if !a.serve.is_empty() {
        let rows = crate::bench_serve::serve_curve(decoder, be, &prompt, a.gen, &a.serve, a.max_batch_tokens)?;
        let (device, commit) = (be.device_name(), git_commit());
        println!("model           {name}");
        println!("device          {device}");
        println!("commit          {commit}");
        println!("| concurrency | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | % of roofline per request |");
        println!("|---|---|---|---|---|");
        for r in &rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            let per_request = if f("itl_p50_ms") > 0.0 { 1e3 / f("itl_p50_ms") / roofline } else { 0.0 };
            println!(
                "| {} | {:.1} | {:.1} / {:.1} | {:.2} / {:.2} | {:.0}% |",
                r["concurrency"],
                f("output_tok_s"),
                f("ttft_p50_ms"),
                f("ttft_p99_ms"),
                f("itl_p50_ms"),
                f("itl_p99_ms"),
                100.0 * per_request
            );
        }
        let result = json!({
            "model": name, "device": device, "backend": be.name(), "commit": commit, "serve": rows,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "utc": fusebox_core::clock::Utc::now().stamp(), "prompt_len": prompt.len(), "gen": a.gen,
            "max_batch_tokens": a.max_batch_tokens,
            "weight_bytes_per_token": weight_bytes, "copy_bandwidth_bytes_s": bw, "roofline_tok_s": roofline,
        });
        return write_result(&a.out_dir, &device, &format!("{name}-serve"), &result);
    }
    if let Some(k) = a.verify_curve {
        // scoring passes on their own: the session's verify, which speculation's rounds run alone
        let mut session = Session::new(decoder, be, ctx)?;
        eprintln!("fusebox: warm-up...");
        session.prefill(&prompt[..prompt.len().min(32)])?;
        for t in 0..8 {
            session.step(t)?;
        }
        let rows = crate::bench_spec::verify_curve(&mut session, &prompt, k, a.rounds.max(3))?;
        let device = be.device_name();
        let commit = git_commit();
        println!("model           {name}");
        println!("device          {device}");
        println!("commit          {commit}");
        println!("| k | rows | verify ms | decode ms | verify / decode |");
        println!("|---|---|---|---|---|");
        for r in &rows {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            println!(
                "| {} | {} | {:.3} | {:.3} | {:.2} |",
                r["k"],
                r["rows"],
                f("secs") * 1e3,
                f("decode_secs") * 1e3,
                f("ratio")
            );
        }
        let result = json!({
            "model": name, "device": device, "backend": be.name(), "commit": commit, "verify_curve": rows,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "utc": fusebox_core::clock::Utc::now().stamp(), "prompt_len": prompt.len(),
            "weight_bytes_per_token": weight_bytes, "copy_bandwidth_bytes_s": bw, "roofline_tok_s": roofline,
        });
        return write_result(&a.out_dir, &device, &format!("{name}-verify-curve"), &result);
    }
    let draft = a.spec.load_draft(be)?;
    let mut spec = match spec_method {
        None => None,
        Some(SpecMethod::Dflash) if a.synthetic.is_some() && a.spec.draft.is_none() => {
            eprintln!("fusebox: building a random {}-layer DFlash draft ({})...", a.draft_layers, a.quant);
            Some(a.spec.synthetic_dflash(decoder, Quant::parse(&a.quant)?, a.draft_layers, be, ctx)?)
        }
        Some(_) => Some(a.spec.build(loaded.as_ref(), draft.as_ref(), be, ctx)?.context("--spec is set")?),
    };
    let mut engine = BatchEngine::lone(decoder, be, ctx)?;
    eprintln!("fusebox: warm-up...");
    engine.generate(&prompt[..prompt.len().min(32)], &warm_up, &mut None, |_| Ok(true))?;
    if spec.is_some() && ab.is_none() {
        let r = crate::bench_spec::spec_ab(&mut engine, &mut spec, &prompt, &opts, a.rounds)?;
        let device = be.device_name();
        let commit = git_commit();
        let m = |k: &str| r[k]["median"].as_f64().unwrap_or(0.0);
        println!("model           {name}");
        println!("device          {device}");
        println!("commit          {commit}");
        println!(
            "plain           {:.1} tok/s median ({:.0}% of the roofline)",
            m("plain_tok_s"),
            100.0 * m("plain_tok_s") / roofline
        );
        println!("speculative     {:.1} tok/s median ({} k={})", m("spec_tok_s"), r["spec"]["method"], r["spec"]["k"]);
        println!(
            "ratio           {:.3} median ({:.3}-{:.3})",
            m("ratio"),
            r["ratio"]["min"].as_f64().unwrap_or(0.0),
            r["ratio"]["max"].as_f64().unwrap_or(0.0)
        );
        println!(
            "acceptance      {:.2} drafts accepted per round, {:.1}% of drafts",
            r["spec"]["mean_accepted"].as_f64().unwrap_or(0.0),
            100.0 * r["acceptance_rate"].as_f64().unwrap_or(0.0)
        );
        let result = json!({
            "model": name, "device": device, "backend": be.name(), "commit": commit, "spec_ab": r,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "utc": fusebox_core::clock::Utc::now().stamp(), "prompt_len": prompt.len(), "gen": a.gen,
            "rounds": a.rounds, "weight_bytes_per_token": weight_bytes, "copy_bandwidth_bytes_s": bw,
            "roofline_tok_s": roofline,
        });
        return write_result(&a.out_dir, &device, &format!("{name}-spec"), &result);
    }
    if let Some((ab, sites)) = ab {
        let ctx = AbRun { be, opts: &opts, prompt: &prompt, rounds: a.rounds };
        let mut rows = vec![];
        for &site in &sites {
            rows.push(ctx.run_with(&mut engine, &mut spec, &[site], site.name())?);
        }
        if sites.len() > 1 {
            rows.push(ctx.run(&mut engine, &sites, "all")?);
        }
        let device = be.device_name();
        let commit = git_commit();
        println!("model           {name}");
        println!("device          {device}");
        println!("commit          {commit}");
        println!("| site | fused tok/s | graph tok/s | ratio (median, min-max over rounds) | fused % of roofline |");
        println!("|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.1} | {:.1} | {:.3} ({:.3}-{:.3}) | {:.0}% |",
                r["site"].as_str().unwrap_or("?"),
                r["fused_tok_s"]["median"].as_f64().unwrap_or(0.0),
                r["graph_tok_s"]["median"].as_f64().unwrap_or(0.0),
                r["ratio"]["median"].as_f64().unwrap_or(0.0),
                r["ratio"]["min"].as_f64().unwrap_or(0.0),
                r["ratio"]["max"].as_f64().unwrap_or(0.0),
                100.0 * r["fused_tok_s"]["median"].as_f64().unwrap_or(0.0) / roofline,
            );
        }
        for r in rows.iter().filter(|r| r.get("fused_draft_ms").is_some()) {
            let f = |k: &str| r[k]["median"].as_f64().unwrap_or(0.0);
            println!(
                "draft block     {:.3} ms fused, {:.3} ms graph per round (median); ratio {:.3}",
                f("fused_draft_ms"),
                f("graph_draft_ms"),
                f("graph_draft_ms") / f("fused_draft_ms").max(1e-12)
            );
        }
        let result = json!({
            "model": name, "device": device, "backend": be.name(), "commit": commit, "ab": rows,
            "cuda_graphs": std::env::var("FUSEBOX_CUDA_GRAPH").map(|v| v != "0").unwrap_or(true),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "utc": fusebox_core::clock::Utc::now().stamp(), "prompt_len": a.prompt_len, "gen": a.gen,
            "rounds": a.rounds, "weight_bytes_per_token": weight_bytes, "kv_bytes_per_token": kv_bytes,
            "copy_bandwidth_bytes_s": bw, "roofline_tok_s": roofline,
        });
        return write_result(&a.out_dir, &device, &format!("{name}-ab-{ab}"), &result);
    }
    let (mut pre, mut dec) = (vec![], vec![]);
    for r in 0..a.reps {
        let (out, _) = engine.generate(&prompt, &opts, &mut None, |_| Ok(true))?;
        eprintln!("  rep {}: prefill {:.1} tok/s, decode {:.1} tok/s", r + 1, out.prefill_tok_s(), out.decode_tok_s());
        pre.push(out.prefill_tok_s());
        dec.push(out.decode_tok_s());
    }
    let (pmin, pmax) = (pre.iter().copied().fold(f64::MAX, f64::min), pre.iter().copied().fold(0.0, f64::max));
    let (dmin, dmax) = (dec.iter().copied().fold(f64::MAX, f64::min), dec.iter().copied().fold(0.0, f64::max));
    let (pre_runs, dec_runs) = (pre.clone(), dec.clone());
    let (pmed, dmed) = (median(&mut pre), median(&mut dec));
    let device = be.device_name();
    let commit = git_commit();
    println!("model           {name}");
    println!("device          {device}");
    println!("commit          {commit}");
    println!("prefill         {pmed:.1} tok/s median ({pmin:.1}-{pmax:.1}), {} tokens", a.prompt_len);
    println!("decode          {dmed:.1} tok/s median ({dmin:.1}-{dmax:.1}), {} tokens", a.gen);
    println!("bytes/token     {} weights + {} KV = {}", human(weight_bytes), human(kv_bytes), human(bytes));
    println!("copy bandwidth  {:.1} GB/s (read + write, measured now)", bw / 1e9);
    println!("roofline        {roofline:.1} tok/s -> decode at {:.0}% of it", 100.0 * dmed / roofline);

    let result = json!({
        "model": name, "device": device, "backend": be.name(), "commit": commit,
        "cuda_graphs": std::env::var("FUSEBOX_CUDA_GRAPH").map(|v| v != "0").unwrap_or(true),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "utc": fusebox_core::clock::Utc::now().stamp(), "prompt_len": a.prompt_len, "gen": a.gen, "reps": a.reps,
        "prefill_tok_s": {"median": pmed, "min": pmin, "max": pmax, "runs": pre_runs},
        "decode_tok_s": {"median": dmed, "min": dmin, "max": dmax, "runs": dec_runs},
        "weight_bytes_per_token": weight_bytes, "kv_bytes_per_token": kv_bytes,
        "copy_bandwidth_bytes_s": bw, "roofline_tok_s": roofline, "roofline_fraction": dmed / roofline,
    });
    write_result(&a.out_dir, &device, &name, &result)
}

/// Write `result` to `out_dir/<device>/<name>-<UTC>.json`, never overwriting.
fn write_result(out_dir: &std::path::Path, device: &str, name: &str, result: &serde_json::Value) -> Result<()> {
    let dir = out_dir.join(slug(device));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let base = format!("{}-{}", slug(name), fusebox_core::clock::Utc::now().stamp());
    for i in 0.. {
        let path = dir.join(if i == 0 { format!("{base}.json") } else { format!("{base}-{i}.json") });
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                use std::io::Write;
                writeln!(f, "{}", serde_json::to_string_pretty(result)?)?;
                println!("wrote           {}", path.display());
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot write {}", path.display())),
        }
    }
    Ok(())
}

/// The sites an `--ab` argument names, checked against the model and backend.
fn ab_sites(ab: &str, be: &dyn Backend, cfg: &fusebox_models::ModelConfig, dflash: bool) -> Result<Vec<Site>> {
    if be.fusion_policy().is_none() {
        bail!("--ab: {} has no fused paths", be.name());
    }
    let kind = be.fusion_policy().map(|p| p.backend).unwrap_or(BackendKind::Cpu);
    if ab == "all" {
        let v: Vec<Site> = SITES.iter().copied().filter(|&s| s.has_fused_path(kind) && cfg.has_site(s)).collect();
        if v.is_empty() {
            bail!("--ab all: no site with a fused kernel applies to this model");
        }
        return Ok(v);
    }
    let site = Site::parse(ab)?;
    if !site.has_fused_path(kind) {
        bail!("--ab {ab}: {} has no fused kernel for this site", be.name());
    }
    let applies = cfg.has_site(site) || (dflash && site == Site::DflashAttn);
    if !applies {
        bail!("--ab {ab}: the site does not occur in this model");
    }
    Ok(vec![site])
}

/// One interleaved A/B: the same session and prompt, decode with `sites`
/// fused (every other site on the graph path) and decode with every site on
/// the graph path, alternating round by round.
pub(crate) struct AbRun<'a> {
    pub be: &'a dyn Backend,
    pub opts: &'a GenerateOptions,
    pub prompt: &'a [u32],
    pub rounds: usize,
}

impl AbRun<'_> {
    pub fn run(&self, engine: &mut BatchEngine, sites: &[Site], label: &str) -> Result<serde_json::Value> {
        self.run_with(engine, &mut None, sites, label)
    }

    /// [`AbRun::run`], generating with `spec` when given: then only `sites`
    /// switch (the target's own sites keep their decisions: they are not
    /// under test), and each variant's drafting time per round is reported
    /// too (`fused_draft_ms`, `graph_draft_ms`).
    pub fn run_with<'m>(
        &self,
        engine: &mut BatchEngine<'m>,
        spec: &mut Option<Speculation<'m>>,
        sites: &[Site],
        label: &str,
    ) -> Result<serde_json::Value> {
        let speculative = spec.is_some();
        let mut decode = |engine: &mut BatchEngine<'m>, on: bool| -> Result<(f64, f64)> {
            for s in SITES {
                if !speculative || sites.contains(&s) {
                    self.be.set_fused(s, on && sites.contains(&s));
                }
            }
            let (out, stats) = engine.generate(self.prompt, self.opts, spec, |_| Ok(true))?;
            let draft_ms = stats.map_or(0.0, |s| 1e3 * s.draft_secs / s.rounds.max(1) as f64);
            Ok((out.decode_tok_s(), draft_ms))
        };
        // warm both variants (kernel compilation, graph capture)
        decode(engine, true)?;
        decode(engine, false)?;
        let (mut fused, mut graph, mut ratio, mut fd, mut gd) = (vec![], vec![], vec![], vec![], vec![]);
        for r in 0..self.rounds.max(1) {
            let (f, fdm) = decode(engine, true)?;
            let (g, gdm) = decode(engine, false)?;
            let drafts =
                if speculative { format!(" | drafting {fdm:.3} / {gdm:.3} ms a round") } else { String::new() };
            eprintln!("  {label} round {}: fused {f:.1} tok/s, graph {g:.1} tok/s, ratio {:.3}{drafts}", r + 1, f / g);
            fused.push(f);
            graph.push(g);
            ratio.push(f / g);
            fd.push(fdm);
            gd.push(gdm);
        }
        if let Some(p) = self.be.fusion_policy() {
            for s in SITES {
                p.override_site(s, None);
            }
        }
        let stats = |v: &[f64]| {
            let mut s = v.to_vec();
            let (lo, hi) = (s.iter().copied().fold(f64::MAX, f64::min), s.iter().copied().fold(0.0, f64::max));
            json!({"median": median(&mut s), "min": lo, "max": hi, "runs": v})
        };
        let mut r =
            json!({"site": label, "fused_tok_s": stats(&fused), "graph_tok_s": stats(&graph), "ratio": stats(&ratio)});
        if speculative {
            r["fused_draft_ms"] = stats(&fd);
            r["graph_draft_ms"] = stats(&gd);
        }
        Ok(r)
    }
}
