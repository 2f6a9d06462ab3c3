//! Which decode sites run a fused kernel: one table, backend × site →
//! default, each with its measured reason.
//!
//! A fused path becomes a backend's default only when it passed the parity
//! gate (RMS < 5e-3 against the graph path, greedy parity, determinism) and
//! won a same-process interleaved A/B benchmark; the evidence is in
//! `docs/benchmark_results/fused-<site>-<gpu>.md`. Overrides, strongest
//! first:
//!
//! 1. `FUSEBOX_FUSED_<SITE>=0|1` (and mlxcel's `MLXCEL_FUSED_QK_NORM`,
//!    `MLXCEL_FUSED_MOE` as aliases);
//! 2. the per-device policy file written by `fusebox tune`
//!    (`~/.cache/fusebox/policy/<gpu-name>.json`, or `$FUSEBOX_POLICY_DIR`);
//! 3. the built-in [`TABLE`].
//!
//! The values are read once per process. `docs/environment-variables.md`
//! holds the same table; a test keeps the two equal.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{bail, Context, Result};

/// A fusible decode site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// QKV projection + per-head Q/K RMSNorm + RoPE + KV write (Qwen3; the
    /// same kernel without the norm serves Llama).
    QkNorm,
    /// The MoE expert path: gate/up + SwiGLU, then down × router weight, summed.
    Moe,
    /// Residual add + the next RMSNorm.
    AddRmsNorm,
    /// Per-head norm + RoPE on q and k + KV append, after unfused
    /// projections (runs where `qk_norm` is off).
    RopeKvAppend,
    /// The dense MLP's gate and up projections + SwiGLU (added after the
    /// decode trace showed `silu_mul` and the separate `up` launch at 9% of a
    /// Qwen3-0.6B token).
    Swiglu,
    /// A DFlash draft layer's attention over [context; block]: per-head
    /// norms, RoPE and the block's KV append for every block row in one
    /// launch after the projections, then one attention launch that reads
    /// the keys and values once for the whole block (the graph path: one op
    /// per step, and attention row by row).
    DflashAttn,
    /// A packed weight's matmul (GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K, MLX affine 4/8-bit, up
    /// to `ROW_EXACT_MAX` input rows) as integer dot products: each input row
    /// quantized once to int16 in blocks of 32, then integer multiply-adds
    /// (the graph path: every weight widened to f32). CPU only.
    IntDot,
    /// A 4-bit affine weight's matmul (MLX 4-bit, and GGUF Q4_0/Q4_K as
    /// converted at load) for 1 to 32 input rows on the tensor cores
    /// (kernels/qmm.cu): x split once into two bf16 parts, the weight read once for all
    /// rows, so verifying 16 rows costs about what one does (the graph path:
    /// the GEMV, which reads the weight once per 8 rows and spends one f32
    /// multiply-add per weight and row). Every row count computes a row the
    /// same way, so speculative and plain greedy output stay equal; where it
    /// is on, the fused sites that embed such a weight's GEMV (`qk_norm`,
    /// `swiglu`) step aside for it. CUDA only.
    TcMatmul,
}

pub const SITES: [Site; 8] = [
    Site::QkNorm,
    Site::Moe,
    Site::AddRmsNorm,
    Site::RopeKvAppend,
    Site::Swiglu,
    Site::DflashAttn,
    Site::IntDot,
    Site::TcMatmul,
];

impl Site {
    /// The site's name in switches, files and reports (`qk_norm`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Site::QkNorm => "qk_norm",
            Site::Moe => "moe",
            Site::AddRmsNorm => "add_rms_norm",
            Site::RopeKvAppend => "rope_kv_append",
            Site::Swiglu => "swiglu",
            Site::DflashAttn => "dflash_attn",
            Site::IntDot => "int_dot",
            Site::TcMatmul => "tc_matmul",
        }
    }

    /// `FUSEBOX_FUSED_<SITE>`.
    pub fn env_var(self) -> String {
        format!("FUSEBOX_FUSED_{}", self.name().to_ascii_uppercase())
    }

    /// Other names accepted for the switch (mlxcel's).
    pub const fn aliases(self) -> &'static [&'static str] {
        match self {
            Site::QkNorm => &["MLXCEL_FUSED_QK_NORM"],
            Site::Moe => &["MLXCEL_FUSED_MOE"],
            _ => &[],
        }
    }

    /// Whether `backend` has a fused kernel for this site (CUDA: every site;
    /// the CPU: `add_rms_norm` and `int_dot`, the others run the graph path).
    pub const fn has_fused_path(self, backend: BackendKind) -> bool {
        match backend {
            BackendKind::Cuda => true,
            BackendKind::Cpu if matches!(self, Site::TcMatmul) => false,
            BackendKind::Cpu => matches!(self, Site::AddRmsNorm | Site::IntDot),
        }
    }

    pub fn parse(s: &str) -> Result<Site> {
        SITES
            .iter()
            .copied()
            .find(|x| x.name() == s)
            .with_context(|| format!("unknown fusion site \"{s}\" (known: {})", SITES.map(|x| x.name()).join(", ")))
    }
}

/// The backends the table distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// One row of the table: the default for a site on a backend, and why.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub backend: BackendKind,
    pub site: Site,
    pub on: bool,
    pub reason: &'static str,
}

/// The built-in defaults. Change a row only with a decision record in
/// `docs/benchmark_results/` and the same change in
/// `docs/environment-variables.md`.
pub const TABLE: &[Rule] = &[
    Rule {
        backend: BackendKind::Cuda,
        site: Site::QkNorm,
        on: true,
        reason: "bitwise equal to the graph path; 1.05-1.16x decode on Qwen3-0.6B bf16/4-bit, Qwen3-8B 4-bit, \
                 Qwen3-30B-A3B 4-bit and SmolLM2 on an H200 and an H100 \
                 (docs/benchmark_results/fused-qk_norm-h200.md, -h100.md)",
    },
    Rule {
        backend: BackendKind::Cuda,
        site: Site::Moe,
        on: false,
        reason: "1.001x (H200) and 0.997x (H100) on Qwen3-30B-A3B 4-bit: the fused gate/up kernel takes as long \
                 as the two expert GEMVs and SwiGLU it replaces (docs/benchmark_results/fused-moe-h200.md)",
    },
    Rule {
        backend: BackendKind::Cuda,
        site: Site::AddRmsNorm,
        on: false,
        reason: "bitwise equal to the graph path, but below the 2% bar on Qwen3-8B 4-bit (1.012x H200, 1.016x \
                 H100) and Qwen3-30B-A3B 4-bit (1.017x H200); 1.04-1.05x on the small models \
                 (docs/benchmark_results/fused-add_rms_norm-h200.md, -h100.md)",
    },
    Rule {
        backend: BackendKind::Cuda,
        site: Site::RopeKvAppend,
        on: true,
        reason: "bitwise equal to the graph path; 1.04-1.10x on every model measured (H200, H100); runs where \
                 qk_norm does not (docs/benchmark_results/fused-rope_kv_append-h200.md, -h100.md)",
    },
    Rule {
        backend: BackendKind::Cuda,
        site: Site::Swiglu,
        on: false,
        reason: "loses on Qwen3-0.6B bf16 (0.974x H200, 0.967x H100) though it wins 1.02-1.07x on 4-bit models \
                 (docs/benchmark_results/fused-swiglu-h200.md, -h100.md)",
    },
    Rule {
        backend: BackendKind::Cuda,
        site: Site::DflashAttn,
        on: false,
        reason: "passes the gate (bitwise on the fixture, RMS 2e-6 on Qwen3-0.6B) but below the 2% bar: 1.011x on \
                 Qwen3-0.6B bf16, 0.997x on Qwen3-8B 4-bit, H200 (docs/benchmark_results/fused-dflash_attn-h200.md)",
    },
    Rule {
        backend: BackendKind::Cuda,
        site: Site::IntDot,
        on: true,
        reason: "passes the gate (relative RMS 7.8e-4 on the 4-bit fixture, 1.0e-3 on the 4-bit MoE, bitwise on the \
                 rest; greedy tokens equal) and 1.07-1.11x decode on 4- and 8-bit models, H100 \
                 (docs/benchmark_results/fused-int_dot-h100.md)",
    },
    Rule {
        backend: BackendKind::Cuda,
        site: Site::TcMatmul,
        on: false,
        reason: "passes the gate and verifies 16 rows of Qwen3-8B 4-bit in 7.7 ms (the GEMV: 42 ms, fused-tc_matmul-h100.md), \
                 but decodes one row in 4.5 ms where the GEMV takes 3.7, H100 \
                 (docs/benchmark_results/qmm-lean-h100-2026-12-07.md)",
    },
    Rule { backend: BackendKind::Cpu, site: Site::QkNorm, on: false, reason: "no fused CPU path" },
    Rule { backend: BackendKind::Cpu, site: Site::Moe, on: false, reason: "no fused CPU path" },
    Rule {
        backend: BackendKind::Cpu,
        site: Site::AddRmsNorm,
        on: false,
        reason: "bitwise equal to the graph path; no gain in a CPU A/B \
                 (docs/benchmark_results/fused-add_rms_norm-cpu-2026-11-22.md)",
    },
    Rule { backend: BackendKind::Cpu, site: Site::RopeKvAppend, on: false, reason: "no fused CPU path" },
    Rule { backend: BackendKind::Cpu, site: Site::Swiglu, on: false, reason: "no fused CPU path" },
    Rule { backend: BackendKind::Cpu, site: Site::DflashAttn, on: false, reason: "no fused CPU path" },
    Rule { backend: BackendKind::Cpu, site: Site::TcMatmul, on: false, reason: "no tensor cores on the CPU" },
    Rule {
        backend: BackendKind::Cpu,
        site: Site::IntDot,
        on: true,
        reason: "relative RMS 1.7e-4, greedy tokens equal; 6.5x decode on a Qwen3-0.6B Q4_K_M GGUF, 2.5x on Q4_0 \
                 (Q6_K embedding), 1.28x on SmolLM2 Q4_1, 0.99-1.01x on MLX 4/8-bit, 2 cores \
                 (docs/benchmark_results/fused-int_dot-cpu-2026-12-06.md); prefill (over 32 rows) as an int16 GEMM: \
                 1.17x pp512 on Qwen3-0.6B Q4_K_M, 1.27x on Q4_0 (docs/benchmark_results/cpu-prefill-i16-2026-12-07.md)",
    },
];

/// Where a decision came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    Tuned(PathBuf),
    Env(String),
}

/// Whether one site is fused, and why.
#[derive(Clone, Debug)]
pub struct Decision {
    pub site: Site,
    pub on: bool,
    pub source: Source,
    pub reason: String,
}

/// The resolved policy of one backend in this process.
#[derive(Debug)]
pub struct FusionPolicy {
    pub backend: BackendKind,
    pub decisions: Vec<Decision>,
    /// Run-time overrides per site (0 none, 1 off, 2 on), for A/B runs that
    /// switch a site between decode steps of one process.
    overrides: [AtomicU8; SITES.len()],
    /// Every site on the graph path for now (the parity check's reference pass).
    graph_only: std::sync::atomic::AtomicBool,
}

fn site_index(site: Site) -> usize {
    SITES.iter().position(|&s| s == site).expect("every site is listed")
}

fn parse_switch(var: &str, v: &str) -> Result<bool> {
    match v.trim() {
        "1" | "on" | "true" => Ok(true),
        "0" | "off" | "false" => Ok(false),
        other => bail!("{var}={other}: expected 0 or 1"),
    }
}

/// The per-device policy file (written by `fusebox tune`; read when present).
pub fn tuned_path(device_name: &str) -> Option<PathBuf> {
    let slug: String =
        device_name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let base = std::env::var_os("FUSEBOX_POLICY_DIR").map(PathBuf::from).or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("fusebox").join("policy"))
    })?;
    Some(base.join(format!("{slug}.json")))
}

impl FusionPolicy {
    /// The built-in defaults of `backend`, overridden by the tuned file of
    /// `device_name` (if any) and then by the environment.
    pub fn resolve(backend: BackendKind, device_name: &str) -> Result<FusionPolicy> {
        Self::resolve_with(backend, device_name, |v| std::env::var(v).ok())
    }

    /// [`FusionPolicy::resolve`] with the environment given as a lookup (tests).
    pub fn resolve_with(
        backend: BackendKind,
        device_name: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<FusionPolicy> {
        let tuned = tuned_path(device_name).filter(|p| p.is_file());
        let tuned_json = match &tuned {
            Some(p) => Some(read_tuned(p)?),
            None => None,
        };
        let mut decisions = vec![];
        for site in SITES {
            let rule = TABLE.iter().find(|r| r.backend == backend && r.site == site).expect("table covers every site");
            let mut d = Decision { site, on: rule.on, source: Source::Default, reason: rule.reason.to_string() };
            if let (Some(p), Some(m)) = (&tuned, &tuned_json) {
                if let Some(&(on, ref why)) = m.get(site.name()) {
                    d = Decision { site, on, source: Source::Tuned(p.clone()), reason: why.clone() };
                }
            }
            for var in std::iter::once(site.env_var()).chain(site.aliases().iter().map(|s| s.to_string())) {
                if let Some(v) = env(&var) {
                    let on = parse_switch(&var, &v)?;
                    d = Decision { site, on, source: Source::Env(var.clone()), reason: format!("{var}={}", v.trim()) };
                    break;
                }
            }
            decisions.push(d);
        }
        Ok(FusionPolicy { backend, decisions, overrides: Default::default(), graph_only: Default::default() })
    }

    pub fn decision(&self, site: Site) -> &Decision {
        self.decisions.iter().find(|d| d.site == site).expect("every site is decided")
    }

    pub fn is_on(&self, site: Site) -> bool {
        if self.graph_only.load(Ordering::Relaxed) {
            return false;
        }
        match self.overrides[site_index(site)].load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => self.decision(site).on,
        }
    }

    /// Switch a site on or off for the rest of the process (`None`: back to
    /// the resolved decision). For A/B runs and tests.
    pub fn override_site(&self, site: Site, on: Option<bool>) {
        let v = match on {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        self.overrides[site_index(site)].store(v, Ordering::Relaxed);
    }

    /// Run every site on the graph path while `on` (overrides and decisions
    /// are kept for when it is switched back).
    pub fn force_graph(&self, on: bool) {
        self.graph_only.store(on, Ordering::Relaxed);
    }

    /// One bit per site that is on (a device backend keys captured graphs on it).
    pub fn bits(&self) -> u64 {
        SITES.iter().enumerate().filter(|(_, &s)| self.is_on(s)).map(|(i, _)| 1u64 << i).sum()
    }
}

/// `FUSEBOX_FUSED_PARITY_CHECK=1`: run every decode step on the graph path
/// too and report the worst difference (a diagnostic; slow).
pub fn parity_check() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("FUSEBOX_FUSED_PARITY_CHECK").is_ok_and(|v| parse_switch("", &v).unwrap_or(false)))
}

/// Read a tuned file: `{"device": "...", "sites": {"<site>": {"on": bool, "reason": "..."}}}`.
fn read_tuned(path: &std::path::Path) -> Result<HashMap<String, (bool, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let mut out = HashMap::new();
    let Some(sites) = v.get("sites").and_then(|s| s.as_object()) else {
        bail!("{}: no \"sites\" object", path.display())
    };
    for (name, d) in sites {
        Site::parse(name).with_context(|| format!("{}", path.display()))?;
        let Some(on) = d.get("on").and_then(|o| o.as_bool()) else {
            bail!("{}: sites.{name} has no \"on\": true|false", path.display())
        };
        let reason = d.get("reason").and_then(|r| r.as_str()).unwrap_or("tuned").to_string();
        out.insert(name.clone(), (on, reason));
    }
    Ok(out)
}
