//! `fusebox inspect`

use anyhow::Result;
use clap::Args as ClapArgs;
use fusebox_core::fusion::{Site, Source, SITES};
use fusebox_core::RopeScaling;
use serde_json::json;

use fusebox_models::config::read_json;
use fusebox_models::dflash::{self, DFlashDraft};
use fusebox_models::Model;

use crate::common::{human, ModelArgs};

/// Describe a model: architecture, parameter count, dtypes, the weight bytes
/// read per decoded token, and the KV-cache bytes per token of context.
#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// With a DFlash draft as -m: check that it fits this target model
    /// (a model directory or .gguf file).
    #[arg(long, value_name = "PATH")]
    pub target: Option<std::path::PathBuf>,
}

fn count(n: usize) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2}B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}K", f / 1e3)
    } else {
        n.to_string()
    }
}

pub fn run(a: Args) -> Result<()> {
    let cfg_path = a.model.model.join("config.json");
    if a.model.model.is_dir() && cfg_path.exists() && dflash::is_dflash(&read_json(&cfg_path)?) {
        return inspect_dflash(&a);
    }
    if a.target.is_some() {
        anyhow::bail!("--target is for a DFlash draft as -m; {} is not one", a.model.model.display());
    }
    let be = a.model.backend()?;
    let be = &*be;
    let model = a.model.load(be)?;
    let d = &model.decoder;
    let c = &d.cfg;
    let params = d.parameter_count();
    let dtypes = d.weight_formats();
    let per_token = d.bytes_per_token();
    let kv_f32 = c.kv_bytes_per_token(4);
    let kv_bf16 = c.kv_bytes_per_token(2);
    let rope = match c.rope_scaling {
        RopeScaling::None => "none".to_string(),
        RopeScaling::Linear { factor } => format!("linear x{factor}"),
        RopeScaling::Llama3 { factor, original_max_position_embeddings, .. } => {
            format!("llama3 x{factor} (original context {original_max_position_embeddings})")
        }
    };
    // fusion sites: whether each applies to this model, is on here, and why
    let sites: Vec<(Site, bool, bool, String)> = SITES
        .iter()
        .map(|&site| {
            let applies = c.has_site(site);
            let (on, why) = match be.fusion_policy().map(|p| p.decision(site)) {
                Some(d) => {
                    let from = match &d.source {
                        Source::Default => "default".to_string(),
                        Source::Tuned(p) => format!("tuned: {}", p.display()),
                        Source::Env(v) => format!("env {v}"),
                    };
                    (d.on, format!("{from}: {}", d.reason))
                }
                None => (false, "this backend has no fused paths".to_string()),
            };
            (site, applies, on, why)
        })
        .collect();
    if a.json {
        let v = json!({
            "device": be.name(),
            "fusion": sites.iter().map(|(s, applies, on, why)| json!({"site": s.name(), "applies": applies, "on": on, "why": why})).collect::<Vec<_>>(),
            "path": model.path.display().to_string(),
            "architecture": c.arch.name(),
            "layers": c.num_layers, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": c.rope_theta, "rope_scaling": rope, "qk_norm": c.qk_norm,
            "tie_word_embeddings": c.tie_word_embeddings,
            "moe": c.moe.as_ref().map(|m| json!({"num_experts": m.num_experts, "top_k": m.top_k, "intermediate_size": m.intermediate_size})),
            "parameters": params,
            "formats": dtypes.iter().map(|(t, n)| json!({"format": t, "parameters": n})).collect::<Vec<_>>(),
            "bytes_per_token": per_token,
            "kv_bytes_per_token": {"f32": kv_f32, "bf16": kv_bf16},
            "eos_token_ids": model.eos_token_ids(),
            "chat_template": model.chat_template.is_some(),
        });
        println!("{v}");
        return Ok(());
    }
    let dtype_str = dtypes
        .iter()
        .map(|(t, n)| format!("{t} {:.1}%", 100.0 * *n as f64 / params as f64))
        .collect::<Vec<_>>()
        .join(", ");
    println!("model          {}", model.path.display());
    println!("architecture   {}{}", c.arch.name(), if c.qk_norm { " (per-head QK RMSNorm before RoPE)" } else { "" });
    println!(
        "shape          {} layers, hidden {}, {} heads / {} kv heads of {}, MLP {}, vocab {}",
        c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    );
    if let Some(m) = &c.moe {
        let sparse = (0..c.num_layers).filter(|&i| m.is_sparse(i)).count();
        println!(
            "experts        {} per MoE layer, top-{} per token, width {}; {sparse} of {} layers are MoE",
            m.num_experts, m.top_k, m.intermediate_size, c.num_layers
        );
    }
    println!("context        {} (max_position_embeddings)", c.max_position_embeddings);
    println!("rope           theta {}, scaling {rope}", c.rope_theta);
    println!("parameters     {} ({params})", count(params));
    println!("weights        {dtype_str}");
    println!("tied embedding {}", if c.tie_word_embeddings { "yes (lm_head = embed_tokens)" } else { "no" });
    println!("bytes/token    {} of weights read per decoded token ({per_token} B)", human(per_token));
    println!("KV cache       {} per token of context in f32 (CPU), {} in bf16", human(kv_f32), human(kv_bf16));
    println!("eos ids        {:?}", model.eos_token_ids());
    println!(
        "tokenizer      {} tokens, chat template {}",
        model.tokenizer.vocab_size(),
        if model.chat_template.is_some() { "yes" } else { "no" }
    );
    println!("fusion on      {}", be.name());
    for (site, applies, on, why) in &sites {
        let state = match (applies, on) {
            (false, _) => "n/a",
            (true, true) => "fused",
            (true, false) => "graph",
        };
        println!("  {:15}{state:6} ({why})", site.name());
    }
    Ok(())
}

/// `inspect` of a DFlash draft: its drafting settings, its layers, and
/// whether it fits `--target`.
fn inspect_dflash(a: &Args) -> Result<()> {
    let be = a.model.backend()?;
    let draft = DFlashDraft::load(&a.model.model, &*be)?;
    let c = &draft.cfg;
    let fit = a.target.as_ref().map(|t| -> Result<String> {
        let tc = Model::config_at(t)?;
        c.check_target(&tc).map_err(|e| anyhow::anyhow!("{}: {e:#}", t.display()))?;
        Ok(t.display().to_string())
    });
    let fit = fit.transpose()?;
    let b = &c.base;
    if a.json {
        let v = json!({
            "architecture": dflash::ARCHITECTURE, "family": b.arch.name(), "parameters": draft.parameter_count(),
            "layers": b.num_layers, "hidden_size": b.hidden_size, "heads": b.num_heads, "kv_heads": b.num_kv_heads,
            "head_dim": b.head_dim, "intermediate_size": b.intermediate_size, "vocab_size": b.vocab_size,
            "block_size": c.block_size, "mask_token_id": c.mask_token_id, "target_layer_ids": c.target_layer_ids,
            "num_target_layers": c.num_target_layers, "sliding_window": c.sliding_window, "is_causal": c.is_causal,
            "fits_target": fit,
        });
        println!("{v}");
        return Ok(());
    }
    println!("model             {}", a.model.model.display());
    println!("architecture      {} ({} layers)", dflash::ARCHITECTURE, b.arch.name());
    println!("parameters        {}", count(draft.parameter_count()));
    println!(
        "layers            {} x (hidden {}, {} heads / {} kv heads of {}, mlp {})",
        b.num_layers, b.hidden_size, b.num_heads, b.num_kv_heads, b.head_dim, b.intermediate_size
    );
    println!(
        "block             {} tokens (drafts {} a round), mask token {}",
        c.block_size,
        c.block_size - 1,
        c.mask_token_id
    );
    println!("target layers     {:?} of {} (their outputs make the context)", c.target_layer_ids, c.num_target_layers);
    println!(
        "attention         {}{}",
        if c.is_causal { "causal" } else { "bidirectional in the block" },
        c.sliding_window.map(|w| format!(", context window {w}")).unwrap_or_default()
    );
    println!("vocabulary        {} (the target's embedding and lm_head are used)", b.vocab_size);
    match fit {
        Some(t) => println!("target            {t}: fits"),
        None => println!("target            (give --target PATH to check a target)"),
    }
    Ok(())
}
