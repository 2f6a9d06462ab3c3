//! Model and generation configs (`config.json`, `generation_config.json`).
//!
//! Parsed through `serde_json::Value` so that every error names the file and
//! the field at fault, and so that both old (`rope_theta`, `rope_scaling`)
//! and new (`rope_parameters`) spellings are accepted.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use fusebox_core::{RopeScaling, RopeStyle};
use serde_json::Value;

/// The architectures fusebox implements. Each is one configuration of the
/// shared decoder (see `decoder.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama: RMSNorm, GQA, RoPE, SwiGLU MLP.
    Llama,
    /// Qwen3: Llama plus a per-head RMSNorm on q and k before RoPE.
    Qwen3,
    /// Qwen3-MoE: Qwen3 with sparse mixture-of-experts MLP blocks.
    Qwen3Moe,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, qwen3, qwen3_moe";

    pub fn from_model_type(t: &str) -> Option<Arch> {
        match t {
            "llama" => Some(Arch::Llama),
            "qwen3" => Some(Arch::Qwen3),
            "qwen3_moe" => Some(Arch::Qwen3Moe),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3_moe",
        }
    }
}

/// Everything the decoder needs to know about a model's shape.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The checkpoint's declared dtype (`torch_dtype` / `dtype`), informational.
    pub declared_dtype: Option<String>,
    /// Sparse MLP blocks (Qwen3-MoE).
    pub moe: Option<MoeConfig>,
    /// MLX affine quantization (`quantization` / `quantization_config`).
    pub quantization: Option<QuantConfig>,
}

/// The mixture-of-experts block settings.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Width of each expert's SwiGLU MLP.
    pub intermediate_size: usize,
    /// Renormalise the top-k router weights to sum to 1.
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
}

impl MoeConfig {
    /// Whether layer `i` has a sparse (MoE) MLP, as transformers decides it.
    pub fn is_sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.decoder_sparse_step > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

/// MLX affine quantization parameters: a default and per-module overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    pub bits: u32,
    pub group_size: usize,
    /// Module path → `Some((bits, group_size))`, or `None` for "not quantized".
    pub overrides: std::collections::BTreeMap<String, Option<(u32, usize)>>,
}

impl QuantConfig {
    /// `(bits, group_size)` for a module, or `None` if it is excluded.
    pub fn for_module(&self, module: &str) -> Option<(u32, usize)> {
        match self.overrides.get(module) {
            Some(o) => *o,
            None => Some((self.bits, self.group_size)),
        }
    }
}

/// Field access with errors that name the file and the field.
struct Fields<'a> {
    v: &'a Value,
    file: String,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.v.get(name).filter(|v| !v.is_null())
    }
    fn usize(&self, name: &str) -> Result<usize> {
        let v = self.get(name).ok_or_else(|| anyhow!("{}: required field `{name}` is missing", self.file))?;
        self.as_usize(name, v)
    }
    fn opt_usize(&self, name: &str) -> Result<Option<usize>> {
        self.get(name).map(|v| self.as_usize(name, v)).transpose()
    }
    fn as_usize(&self, name: &str, v: &Value) -> Result<usize> {
        match v.as_u64() {
            Some(n) if n > 0 => Ok(n as usize),
            _ => bail!("{}: field `{name}` must be a positive integer, got {v}", self.file),
        }
    }
    fn opt_f64(&self, name: &str) -> Result<Option<f64>> {
        self.get(name)
            .map(|v| v.as_f64().ok_or_else(|| anyhow!("{}: field `{name}` must be a number, got {v}", self.file)))
            .transpose()
    }
    fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        self.get(name)
            .map(|v| v.as_bool().ok_or_else(|| anyhow!("{}: field `{name}` must be true or false, got {v}", self.file)))
            .transpose()
    }
    /// An int or a list of ints (`eos_token_id`).
    fn token_ids(&self, name: &str) -> Result<Vec<u32>> {
        let bad = || anyhow!("{}: field `{name}` must be a token id or a list of token ids", self.file);
        match self.get(name) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(|x| x.as_u64().map(|n| n as u32).ok_or_else(bad)).collect(),
            Some(v) => Ok(vec![v.as_u64().ok_or_else(bad)? as u32]),
        }
    }
}

/// Read and parse a JSON file, naming it in every error.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))
}

impl ModelConfig {
    /// Whether a fusible decode site occurs in this model: `qk_norm` (as
    /// `qkv_rope` without the norm for Llama), `add_rms_norm` and
    /// `rope_kv_append` in every model (the latter only runs where `qk_norm`
    /// is off), `moe` in MoE models, `swiglu` in models with dense MLPs,
    /// `int_dot` and `tc_matmul` in every model (they act on packed weights
    /// only).
    pub fn has_site(&self, site: fusebox_core::fusion::Site) -> bool {
        use fusebox_core::fusion::Site;
        match site {
            Site::QkNorm | Site::AddRmsNorm | Site::RopeKvAppend => true,
            Site::Moe => self.moe.is_some(),
            Site::Swiglu => self.layers_dense(),
            // in a DFlash draft's layers, not the model's own
            Site::DflashAttn => false,
            // wherever a weight is packed (dense weights take the f32 path)
            Site::IntDot | Site::TcMatmul => true,
        }
    }

    /// Load `config.json` from a Hugging Face model directory.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        if !path.exists() {
            bail!("{}: not found (a model directory needs config.json)", path.display());
        }
        let v = read_json(path)?;
        Self::from_value(&v, &path.display().to_string())
    }

    pub fn from_value(v: &Value, file: &str) -> Result<ModelConfig> {
        let f = Fields { v, file: file.to_string() };
        let model_type = f
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{file}: required field `model_type` is missing"))?;
        let arch = Arch::from_model_type(model_type).ok_or_else(|| {
            anyhow!("{file}: unsupported model_type \"{model_type}\" (supported: {})", Arch::SUPPORTED)
        })?;
        for flag in ["attention_bias", "mlp_bias"] {
            if f.opt_bool(flag)? == Some(true) {
                bail!("{file}: `{flag}: true` is not supported (fusebox implements bias-free {} layers)", arch.name());
            }
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            bail!(
                "{file}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            );
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => bail!("{file}: hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"),
        };
        if head_dim % 2 != 0 {
            bail!("{file}: head_dim {head_dim} must be even for rotary embeddings");
        }
        let (rope_theta, rope_scaling) = parse_rope(&f)?;
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: if arch == Arch::Qwen3Moe {
                f.opt_usize("intermediate_size")?.unwrap_or(0)
            } else {
                f.usize("intermediate_size")?
            },
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            rope_style: RopeStyle::Half,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe),
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            declared_dtype: f.get("torch_dtype").or_else(|| f.get("dtype")).and_then(Value::as_str).map(str::to_string),
            moe: if arch == Arch::Qwen3Moe { Some(parse_moe(&f)?) } else { None },
            quantization: parse_quantization(&f)?,
        })
    }

    /// Whether any layer has a dense MLP.
    pub fn layers_dense(&self) -> bool {
        match &self.moe {
            None => true,
            Some(m) => (0..self.num_layers).any(|i| !m.is_sparse(i)),
        }
    }

    /// Bytes of KV cache per token position for a cache element size.
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes
    }
}

fn parse_moe(f: &Fields) -> Result<MoeConfig> {
    let num_experts = match f.opt_usize("num_experts")? {
        Some(n) => n,
        None => f.usize("num_local_experts")?,
    };
    let top_k = f.usize("num_experts_per_tok")?;
    if top_k > num_experts {
        bail!("{}: num_experts_per_tok ({top_k}) exceeds the number of experts ({num_experts})", f.file);
    }
    let mlp_only_layers = match f.get("mlp_only_layers") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|n| n as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow!("{}: field `mlp_only_layers` must be a list of layer indices", f.file))?,
        Some(v) => bail!("{}: field `mlp_only_layers` must be a list, got {v}", f.file),
    };
    Ok(MoeConfig {
        num_experts,
        top_k,
        intermediate_size: f.usize("moe_intermediate_size")?,
        norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(false),
        decoder_sparse_step: f.opt_usize("decoder_sparse_step")?.unwrap_or(1),
        mlp_only_layers,
    })
}

/// The `quantization` block (or its alias `quantization_config`) of an MLX checkpoint.
fn parse_quantization(f: &Fields) -> Result<Option<QuantConfig>> {
    let (key, q) = match (f.get("quantization"), f.get("quantization_config")) {
        (Some(q), _) => ("quantization", q),
        (None, Some(q)) => ("quantization_config", q),
        (None, None) => return Ok(None),
    };
    let Some(obj) = q.as_object() else { bail!("{}: `{key}` must be an object", f.file) };
    // transformers-style configs (e.g. `quant_method: "gptq"`) are not MLX affine
    if let Some(m) = obj.get("quant_method").and_then(Value::as_str) {
        bail!("{}: `{key}.quant_method` \"{m}\" is not supported (fusebox reads MLX affine quantization)", f.file);
    }
    if let Some(mode) = obj.get("mode").and_then(Value::as_str) {
        if mode != "affine" {
            bail!("{}: `{key}.mode` \"{mode}\" is not supported (only \"affine\")", f.file);
        }
    }
    let qf = Fields { v: q, file: format!("{} ({key})", f.file) };
    let bits = qf.usize("bits")? as u32;
    let group_size = qf.usize("group_size")?;
    let mut overrides = std::collections::BTreeMap::new();
    for (k, v) in obj {
        match v {
            Value::Object(_) => {
                let of = Fields { v, file: format!("{} ({key}.{k})", f.file) };
                overrides.insert(k.clone(), Some((of.usize("bits")? as u32, of.usize("group_size")?)));
            }
            Value::Bool(false) => {
                overrides.insert(k.clone(), None);
            }
            _ => {}
        }
    }
    Ok(Some(QuantConfig { bits, group_size, overrides }))
}

/// `rope_theta` and the scaling rule, from either spelling of the config.
fn parse_rope(f: &Fields) -> Result<(f64, RopeScaling)> {
    let params = f.get("rope_parameters");
    let theta = match f.opt_f64("rope_theta")? {
        Some(t) => t,
        None => params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).unwrap_or(10000.0),
    };
    let scaling = f.get("rope_scaling").or(params);
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::None));
    };
    let field = if f.get("rope_scaling").is_some() { "rope_scaling" } else { "rope_parameters" };
    let sf = Fields { v: s, file: format!("{} ({field})", f.file) };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let need = |name: &str| -> Result<f64> {
        sf.opt_f64(name)?.ok_or_else(|| anyhow!("{}: `{name}` is required for rope_type {kind}", sf.file))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: need("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => bail!("{}: rope type \"{other}\" is not supported (supported: default, linear, llama3)", sf.file),
    };
    Ok((theta, scaling))
}

/// Defaults from `generation_config.json` (all optional).
#[derive(Clone, Debug, Default)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

impl GenerationConfig {
    /// Load `generation_config.json`; a missing file gives the defaults.
    pub fn from_file(path: &Path) -> Result<GenerationConfig> {
        if !path.exists() {
            return Ok(GenerationConfig::default());
        }
        let v = read_json(path)?;
        let f = Fields { v: &v, file: path.display().to_string() };
        Ok(GenerationConfig {
            eos_token_ids: f.token_ids("eos_token_id")?,
            do_sample: f.opt_bool("do_sample")?,
            temperature: f.opt_f64("temperature")?,
            top_k: f.get("top_k").and_then(Value::as_u64).map(|k| k as usize),
            top_p: f.opt_f64("top_p")?,
            min_p: f.opt_f64("min_p")?,
            repetition_penalty: f.opt_f64("repetition_penalty")?,
        })
    }
}
