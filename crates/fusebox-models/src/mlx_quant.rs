//! MLX affine quantization (`mx.quantize(w, group_size, bits)`, mode
//! `affine`) and the writer of MLX-format checkpoints (what
//! `mlx_lm.convert -q` produces), used by `fusebox quantize`.
//!
//! [`quantize_affine`] is a transcription of mlx's CPU kernel (`quantize` in
//! `mlx/backend/cpu/quantized.cpp`): per group of `group_size` inputs,
//!
//! ```text
//! n_bins = 2^bits - 1
//! scale  = max((max - min) / n_bins, 1e-7), negated unless |min| > |max|
//! edge   = |min| > |max| ? min : max
//! q0     = rint(edge / scale)
//! if q0 != 0 { scale = edge / q0; bias = edge } else { bias = 0 }
//! q_i    = clamp(rint((w_i - bias) / scale), 0, n_bins)
//! ```
//!
//! all in f32 (`rint` rounds half to even), so that the extreme value of
//! larger magnitude is represented exactly. The `q_i` are packed little-end
//! first into `u32` words ([`fusebox_core::quant::pack`]'s layout). mlx
//! stores the scales and biases in the weight's dtype, rounding the f32
//! values (round to nearest even); the `q_i` are computed from the unrounded
//! f32 scale.
//!
//! [`quantize_dir`] converts a Hugging Face model directory the way mlx-lm
//! does: every Linear (`*_proj`, `lm_head`, the MoE router `mlp.gate`) and the
//! token embedding whose input dimension is a multiple of the group size is
//! quantized; everything else (norms, 1-D tensors) is copied. Per-expert MoE
//! weights are stacked into `mlp.switch_mlp.*` with a leading expert
//! dimension. The output is written into a temporary sibling directory and
//! renamed into place only when everything succeeded.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fusebox_core::dtype::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use fusebox_core::DType;
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::config::read_json;
use crate::safetensors::Checkpoint;

/// Bit widths MLX affine quantization supports.
pub const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// Group sizes MLX affine quantization supports.
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];
/// mlx-lm's shard limit (`MAX_FILE_SIZE_GB = 5`, in GiB).
pub const MAX_SHARD_BYTES: u64 = 5 << 30;
/// The group size mlx-lm's Qwen3-MoE `quant_predicate` gives the router.
pub const ROUTER_GROUP_SIZE: usize = 64;

/// Files copied from the source directory when present.
const COPIED_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

/// Source elements converted per step (bounds the memory of one step).
const CHUNK_ELEMS: usize = 1 << 24;

/// Quantize a row-major `[rows, cols]` f32 matrix exactly like
/// `mx.quantize(w, group_size, bits)` (affine mode): returns the packed
/// weights (`rows * cols * bits / 32` words), and the f32 scales and biases
/// (`rows * cols / group_size` each).
///
/// # Panics
/// If `bits` or `group_size` is unsupported, `cols` is not a multiple of
/// `group_size`, or `w.len() != rows * cols`.
pub fn quantize_affine(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group_size: usize,
) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    assert!(SUPPORTED_BITS.contains(&bits), "quantize_affine: unsupported bits {bits}");
    assert!(SUPPORTED_GROUP_SIZES.contains(&group_size), "quantize_affine: unsupported group_size {group_size}");
    assert!(
        cols.is_multiple_of(group_size),
        "quantize_affine: {cols} columns are not a multiple of group_size {group_size}"
    );
    assert_eq!(w.len(), rows * cols, "quantize_affine: {} values for a {rows}x{cols} matrix", w.len());
    let words = cols * bits as usize / 32;
    let groups = cols / group_size;
    let mut q = vec![0u32; rows * words];
    let mut scales = vec![0f32; rows * groups];
    let mut biases = vec![0f32; rows * groups];
    if rows == 0 || cols == 0 {
        return (q, scales, biases);
    }
    q.par_chunks_mut(words)
        .zip(scales.par_chunks_mut(groups))
        .zip(biases.par_chunks_mut(groups))
        .zip(w.par_chunks(cols))
        .with_min_len((1 << 16) / cols + 1)
        .for_each(|(((q, s), b), w)| quantize_row(w, bits, group_size, q, s, b));
    (q, scales, biases)
}

/// One row: mlx's `quantize` loop, with C++'s `std::min`/`std::max`
/// comparisons spelled out so that even odd inputs behave the same.
fn quantize_row(w: &[f32], bits: u32, group_size: usize, q: &mut [u32], scales: &mut [f32], biases: &mut [f32]) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let eps = 1e-7f32;
    let (mut acc, mut nacc, mut wi) = (0u64, 0u32, 0usize);
    for (g, grp) in w.chunks_exact(group_size).enumerate() {
        let (mut w_min, mut w_max) = (f32::INFINITY, f32::NEG_INFINITY);
        for &x in grp {
            if w_max < x {
                w_max = x;
            }
            if x < w_min {
                w_min = x;
            }
        }
        let mask = w_min.abs() > w_max.abs();
        let d = (w_max - w_min) / n_bins;
        let mut scale = if d < eps { eps } else { d };
        if !mask {
            scale = -scale;
        }
        let edge = if mask { w_min } else { w_max };
        let q0 = (edge / scale).round_ties_even();
        let mut bias = 0.0f32;
        if q0 != 0.0 {
            scale = edge / q0;
            bias = edge;
        }
        for &x in grp {
            let mut v = ((x - bias) / scale).round_ties_even();
            if v < 0.0 {
                v = 0.0;
            }
            if n_bins < v {
                v = n_bins;
            }
            acc |= (v as u64) << nacc;
            nacc += bits;
            if nacc >= 32 {
                q[wi] = acc as u32;
                wi += 1;
                acc >>= 32;
                nacc -= 32;
            }
        }
        scales[g] = scale;
        biases[g] = bias;
    }
    debug_assert!(nacc == 0 && wi == q.len());
}

/// `mx.dequantize`: `scale * q + bias` per group, for one quantized matrix
/// (through the runtime's own reference dequantizer, `Weight::dequant_row`).
pub fn dequantize_affine(
    q: &[u32],
    scales: &[f32],
    biases: &[f32],
    cols: usize,
    bits: u32,
    group_size: usize,
) -> Result<Vec<f32>> {
    use fusebox_core::{DType, Tensor, Weight};
    let words = cols * bits as usize / 32;
    let rows = q.len() / words.max(1);
    let groups = cols / group_size;
    let w = Weight::affine(
        Tensor::from_bytes(&[rows, words], DType::U32, bytemuck::cast_slice(q))?,
        Tensor::from_f32(&[rows, groups], scales)?,
        Tensor::from_f32(&[rows, groups], biases)?,
        bits,
        group_size,
    )?;
    let mut out = vec![0f32; rows * cols];
    for (r, row) in out.chunks_exact_mut(cols).enumerate() {
        w.dequant_row(0, r, row)?;
    }
    Ok(out)
}

/// Settings of [`quantize_dir`].
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// Bits per weight (2, 3, 4, 5, 6 or 8).
    pub bits: u32,
    /// Inputs per scale/bias pair (32, 64 or 128).
    pub group_size: usize,
    /// Bits of the MoE router (`mlp.gate`), written as a per-module override.
    pub router_bits: u32,
    /// Replace an existing non-empty output directory (after success).
    pub force: bool,
    /// Start a new shard before a file would pass this many bytes.
    pub max_shard_bytes: u64,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions { bits: 4, group_size: 64, router_bits: 8, force: false, max_shard_bytes: MAX_SHARD_BYTES }
    }
}

impl QuantizeOptions {
    /// One-line errors for unsupported settings.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            SUPPORTED_BITS.contains(&self.bits),
            "--bits {} is not supported (choose 2, 3, 4, 5, 6 or 8)",
            self.bits
        );
        ensure!(
            SUPPORTED_BITS.contains(&self.router_bits),
            "--router-bits {} is not supported (choose 2, 3, 4, 5, 6 or 8)",
            self.router_bits
        );
        ensure!(
            SUPPORTED_GROUP_SIZES.contains(&self.group_size),
            "--group-size {} is not supported (choose 32, 64 or 128)",
            self.group_size
        );
        ensure!(self.max_shard_bytes > 0, "the shard size limit must be positive");
        Ok(())
    }
}

/// Where [`quantize_dir`] is, reported after each output module.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// Modules (output weights) finished so far, and in all.
    pub done: usize,
    pub total: usize,
    /// Source bytes processed so far, and in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The module just finished (empty before the first).
    pub name: &'a str,
}

/// What [`quantize_dir`] wrote.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Bytes of the source tensors.
    pub input_bytes: u64,
    /// Bytes of the written tensors.
    pub output_bytes: u64,
    /// Logical parameters (quantized weights counted unpacked, scales and
    /// biases not counted), as mlx-lm's `total_parameters`.
    pub parameters: u64,
    /// Quantized modules (a stacked MoE projection counts once).
    pub quantized: usize,
    /// Tensors copied without quantization.
    pub kept: usize,
    /// Safetensors files written.
    pub shards: usize,
}

impl Summary {
    /// mlx-lm's `compute_bits_per_weight`: stored bits over logical parameters.
    pub fn bits_per_weight(&self) -> f64 {
        self.output_bytes as f64 * 8.0 / self.parameters.max(1) as f64
    }
}

/// Rows `[row0, row0 + rows)` of a source tensor viewed as `[numel / cols, cols]`.
#[derive(Clone, Debug)]
struct Part {
    name: String,
    row0: usize,
    rows: usize,
}

#[derive(Clone, Debug)]
enum Item {
    /// Copied (and cast to `out_dtype` if it differs): the parts concatenated.
    Dense { name: String, parts: Vec<Part>, shape: Vec<usize>, src_dtype: DType, out_dtype: DType },
    /// Quantized: `prefix.{weight,scales,biases}`; `experts` parts of
    /// `rows x cols` each (1 part and no leading dimension unless stacked).
    Quant {
        prefix: String,
        parts: Vec<Part>,
        stacked: bool,
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: usize,
        src_dtype: DType,
        out_dtype: DType,
    },
}

struct OutTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
}

impl OutTensor {
    fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

impl Item {
    fn label(&self) -> &str {
        match self {
            Item::Dense { name, .. } => name,
            Item::Quant { prefix, .. } => prefix,
        }
    }
    fn outputs(&self) -> Vec<OutTensor> {
        match self {
            Item::Dense { name, shape, out_dtype, .. } => {
                vec![OutTensor { name: name.clone(), dtype: *out_dtype, shape: shape.clone() }]
            }
            Item::Quant { prefix, parts, stacked, rows, cols, bits, group_size, out_dtype, .. } => {
                let lead: Vec<usize> = if *stacked { vec![parts.len(), *rows] } else { vec![*rows] };
                let with = |last: usize| lead.iter().copied().chain([last]).collect::<Vec<_>>();
                vec![
                    OutTensor {
                        name: format!("{prefix}.weight"),
                        dtype: DType::U32,
                        shape: with(cols * *bits as usize / 32),
                    },
                    OutTensor { name: format!("{prefix}.scales"), dtype: *out_dtype, shape: with(cols / group_size) },
                    OutTensor { name: format!("{prefix}.biases"), dtype: *out_dtype, shape: with(cols / group_size) },
                ]
            }
        }
    }
    /// Logical parameters (mlx-lm's `get_total_parameters`).
    fn parameters(&self) -> u64 {
        match self {
            Item::Dense { shape, .. } => shape.iter().product::<usize>() as u64,
            Item::Quant { parts, rows, cols, .. } => (parts.len() * rows * cols) as u64,
        }
    }
    fn src_bytes(&self) -> u64 {
        let (parts, cols, dt) = match self {
            Item::Dense { parts, shape, src_dtype, .. } => (parts, shape.last().copied().unwrap_or(1), *src_dtype),
            Item::Quant { parts, cols, src_dtype, .. } => (parts, *cols, *src_dtype),
        };
        parts.iter().map(|p| (p.rows * cols * dt.size()) as u64).sum()
    }
}

/// Sort key that orders `layers.10` after `layers.9`.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    s.split('.').map(|p| p.parse::<u64>().map_or_else(|_| (p.to_string(), 0), |n| (String::new(), n))).collect()
}

fn dtype_of_config(name: &str) -> Option<DType> {
    match name {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

/// The model facts the plan needs, from config.json.
struct SourceConfig {
    value: Map<String, Value>,
    model_type: String,
    tied: bool,
    /// Whether `tie_word_embeddings` must be written explicitly (a llama
    /// config without the key, which mlx-lm would read as tied).
    write_untied: bool,
    num_experts: Option<usize>,
    /// mlx-lm casts every float parameter to `torch_dtype` when it names one.
    cast: Option<DType>,
}

fn read_source_config(dir: &Path) -> Result<SourceConfig> {
    let path = dir.join("config.json");
    ensure!(path.exists(), "{}: not found (the source must be a Hugging Face model directory)", path.display());
    let v = read_json(&path)?;
    let file = path.display();
    let Value::Object(map) = v else { bail!("{file}: expected a JSON object") };
    let model_type = map
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("{file}: required field `model_type` is missing"))?
        .to_string();
    ensure!(
        matches!(model_type.as_str(), "llama" | "qwen3" | "qwen3_moe"),
        "{file}: model_type \"{model_type}\" is not supported by fusebox quantize (supported: llama, qwen3, qwen3_moe)"
    );
    for key in ["quantization", "quantization_config"] {
        if map.get(key).is_some_and(|q| !q.is_null()) {
            bail!("{file}: the model is already quantized (`{key}` is present); fusebox quantize needs a dense F32, F16 or BF16 checkpoint");
        }
    }
    let tie = map.get("tie_word_embeddings").filter(|v| !v.is_null());
    let tie = match tie {
        None => None,
        Some(t) => {
            Some(t.as_bool().ok_or_else(|| anyhow!("{file}: field `tie_word_embeddings` must be true or false"))?)
        }
    };
    let num_experts = if model_type == "qwen3_moe" {
        let n = map
            .get("num_experts")
            .or_else(|| map.get("num_local_experts"))
            .and_then(Value::as_u64)
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                anyhow!("{file}: field `num_experts` (or `num_local_experts`) must be a positive integer")
            })?;
        Some(n as usize)
    } else {
        None
    };
    let torch_dtype = map
        .get("torch_dtype")
        .and_then(Value::as_str)
        .or_else(|| map.get("text_config").and_then(|t| t.get("dtype")).and_then(Value::as_str));
    Ok(SourceConfig {
        cast: torch_dtype.and_then(dtype_of_config),
        tied: tie.unwrap_or(false),
        write_untied: tie.is_none() && model_type == "llama",
        num_experts,
        model_type,
        value: map,
    })
}

/// `(bits, group_size, is_override)` for a module with `in_dim` inputs, or
/// `None` if it stays dense.
fn quant_params(module: &str, in_dim: usize, moe: bool, o: &QuantizeOptions) -> Option<(u32, usize, bool)> {
    let leaf = module.rsplit('.').next().unwrap_or(module);
    // mlx-lm's wrapper first drops modules whose inputs do not split into groups
    if !in_dim.is_multiple_of(o.group_size) {
        return None;
    }
    if moe && module.ends_with("mlp.gate") {
        let gs = if in_dim.is_multiple_of(ROUTER_GROUP_SIZE) { ROUTER_GROUP_SIZE } else { o.group_size };
        return Some((o.router_bits, gs, true));
    }
    if leaf.ends_with("_proj") || leaf == "lm_head" || leaf == "embed_tokens" {
        return Some((o.bits, o.group_size, false));
    }
    None
}

/// `model.layers.L.mlp.experts.E.P.weight` → `(L, E, P)`.
fn parse_expert(name: &str) -> Option<(usize, usize, String)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (e, rest) = rest.split_once('.')?;
    let proj = rest.strip_suffix(".weight")?;
    if !matches!(proj, "gate_proj" | "up_proj" | "down_proj") {
        return None;
    }
    Some((layer.parse().ok()?, e.parse().ok()?, proj.to_string()))
}

/// `model.layers.L.mlp.experts.{gate_up_proj,down_proj}` (transformers 5's
/// fused layout) → `(L, which)`.
fn parse_fused(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let which = rest.strip_prefix("mlp.experts.")?;
    let which = which.strip_suffix(".weight").unwrap_or(which);
    if !matches!(which, "gate_up_proj" | "down_proj") {
        return None;
    }
    Some((layer.parse().ok()?, which))
}

struct Plan {
    items: Vec<Item>,
    overrides: Vec<(String, u32, usize)>,
}

fn plan(ck: &Checkpoint, cfg: &SourceConfig, o: &QuantizeOptions) -> Result<Plan> {
    let moe = cfg.model_type == "qwen3_moe";
    let mut names: Vec<&str> = ck.names().collect();
    names.sort_by_cached_key(|n| natural_key(n));
    let info = |name: &str| -> Result<(Vec<usize>, DType)> {
        let t = ck.get(name)?;
        Ok((t.shape().to_vec(), t.dtype()))
    };
    let where_ = |name: &str| ck.file_of(name).map(|p| p.display().to_string()).unwrap_or_default();
    let out_dtype = |d: DType| if d.is_float() { cfg.cast.unwrap_or(d) } else { d };

    let mut items = vec![];
    let mut overrides = vec![];
    // stacked experts: (layer, proj) -> parts by expert index
    let mut experts: BTreeMap<(usize, String), BTreeMap<usize, String>> = BTreeMap::new();
    let mut push_quant = |items: &mut Vec<Item>,
                          prefix: String,
                          parts: Vec<Part>,
                          stacked: bool,
                          rows: usize,
                          cols: usize,
                          src_dtype: DType|
     -> Result<()> {
        let module = prefix.clone();
        match quant_params(&module, cols, moe, o) {
            Some((bits, group_size, is_override)) => {
                ensure!(
                    src_dtype.is_float(),
                    "{}: tensor `{prefix}.weight` has dtype {src_dtype}, expected F32, F16 or BF16",
                    where_(&parts[0].name)
                );
                if is_override {
                    overrides.push((module, bits, group_size));
                }
                items.push(Item::Quant {
                    prefix,
                    parts,
                    stacked,
                    rows,
                    cols,
                    bits,
                    group_size,
                    src_dtype,
                    out_dtype: out_dtype(src_dtype),
                });
            }
            None => {
                let shape = if stacked { vec![parts.len(), rows, cols] } else { vec![rows, cols] };
                items.push(Item::Dense {
                    name: format!("{prefix}.weight"),
                    parts,
                    shape,
                    src_dtype,
                    out_dtype: out_dtype(src_dtype),
                });
            }
        }
        Ok(())
    };

    for &name in &names {
        if name.contains("rotary_emb.inv_freq") || (cfg.tied && name == "lm_head.weight") {
            continue;
        }
        if let Some((layer, e, proj)) = parse_expert(name) {
            ensure!(moe, "{}: tensor `{name}` is an MoE expert, but model_type is {}", where_(name), cfg.model_type);
            experts.entry((layer, proj)).or_default().insert(e, name.to_string());
            continue;
        }
        let (shape, dtype) = info(name)?;
        if let Some((layer, which)) = parse_fused(name) {
            ensure!(moe, "{}: tensor `{name}` is an MoE expert, but model_type is {}", where_(name), cfg.model_type);
            let n_exp = cfg.num_experts.unwrap_or(0);
            let [e, r, c] = shape[..] else {
                bail!("{}: tensor `{name}` has shape {shape:?}, expected [experts, out, in]", where_(name));
            };
            ensure!(
                e == n_exp,
                "{}: tensor `{name}` has {e} experts, but config.json says num_experts = {n_exp}",
                where_(name)
            );
            let parts = |row0: usize, rows: usize| -> Vec<Part> {
                (0..e).map(|x| Part { name: name.to_string(), row0: x * r + row0, rows }).collect()
            };
            let prefix = |p: &str| format!("model.layers.{layer}.mlp.switch_mlp.{p}");
            if which == "gate_up_proj" {
                ensure!(
                    r % 2 == 0,
                    "{}: tensor `{name}` has an odd number of rows {r} (gate and up halves)",
                    where_(name)
                );
                // transformers: `gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)`
                push_quant(&mut items, prefix("gate_proj"), parts(0, r / 2), true, r / 2, c, dtype)?;
                push_quant(&mut items, prefix("up_proj"), parts(r / 2, r / 2), true, r / 2, c, dtype)?;
            } else {
                push_quant(&mut items, prefix("down_proj"), parts(0, r), true, r, c, dtype)?;
            }
            continue;
        }
        if let Some(prefix) = name.strip_suffix(".weight").filter(|_| shape.len() == 2) {
            let module_leaf = prefix.rsplit('.').next().unwrap_or(prefix);
            let linear = module_leaf.ends_with("_proj")
                || module_leaf == "lm_head"
                || module_leaf == "embed_tokens"
                || (moe && prefix.ends_with("mlp.gate"));
            if linear {
                let part = Part { name: name.to_string(), row0: 0, rows: shape[0] };
                push_quant(&mut items, prefix.to_string(), vec![part], false, shape[0], shape[1], dtype)?;
                continue;
            }
        }
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let rows = shape.iter().product::<usize>() / cols;
        items.push(Item::Dense {
            name: name.to_string(),
            parts: vec![Part { name: name.to_string(), row0: 0, rows }],
            shape,
            src_dtype: dtype,
            out_dtype: out_dtype(dtype),
        });
    }

    // stack per-expert weights (mlx-lm's qwen3_moe sanitize)
    let n_exp = cfg.num_experts.unwrap_or(0);
    for ((layer, proj), by_e) in experts {
        let first = by_e.values().next().cloned().unwrap_or_default();
        let mut parts = vec![];
        let mut dims: Option<(Vec<usize>, DType)> = None;
        for e in 0..n_exp {
            let want = format!("model.layers.{layer}.mlp.experts.{e}.{proj}.weight");
            let name = by_e.get(&e).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{want}` is missing (config.json says num_experts = {n_exp}, and `{first}` exists)",
                    where_(&first)
                )
            })?;
            let (shape, dtype) = info(name)?;
            ensure!(shape.len() == 2, "{}: tensor `{name}` has shape {shape:?}, expected [out, in]", where_(name));
            if let Some((s0, d0)) = &dims {
                ensure!(
                    *s0 == shape && *d0 == dtype,
                    "{}: tensor `{name}` is {dtype} {shape:?}, but expert 0 is {d0} {s0:?}",
                    where_(name)
                );
            }
            parts.push(Part { name: name.clone(), row0: 0, rows: shape[0] });
            dims = Some((shape, dtype));
        }
        if let Some(extra) = by_e.keys().find(|&&e| e >= n_exp) {
            bail!(
                "{}: tensor `{}` names expert {extra}, but config.json says num_experts = {n_exp}",
                where_(&by_e[extra]),
                by_e[extra]
            );
        }
        let (shape, dtype) = dims.expect("num_experts > 0");
        let prefix = format!("model.layers.{layer}.mlp.switch_mlp.{proj}");
        push_quant(&mut items, prefix, parts, true, shape[0], shape[1], dtype)?;
    }
    items.sort_by_cached_key(|i| natural_key(i.label()));
    ensure!(!items.is_empty(), "the checkpoint has no tensors");
    Ok(Plan { items, overrides })
}

/// Read `rows` rows (from `row0`) of a float tensor as f32, rounding through
/// `cast` first when it names another dtype (mlx-lm's `astype` before
/// quantizing).
fn read_f32(bytes: &[u8], dtype: DType, cols: usize, row0: usize, rows: usize, cast: DType) -> Result<Vec<f32>> {
    let (a, b) = (row0 * cols, (row0 + rows) * cols);
    let sz = dtype.size();
    let raw = &bytes[a * sz..b * sz];
    let mut v: Vec<f32> = match dtype {
        DType::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => raw.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::F16 => raw.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        d => bail!("cannot read a {d} tensor as floats"),
    };
    if cast != dtype {
        match cast {
            DType::BF16 => v.iter_mut().for_each(|x| *x = bf16_to_f32(f32_to_bf16(*x))),
            DType::F16 => v.iter_mut().for_each(|x| *x = f16_to_f32(f32_to_f16(*x))),
            _ => {}
        }
    }
    Ok(v)
}

fn f32_bytes(v: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::BF16 => v.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect(),
        DType::F16 => v.iter().flat_map(|&x| f32_to_f16(x).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// Writes the planned tensors, in order, into their shard files.
struct ShardWriter {
    dir: PathBuf,
    outs: Vec<OutTensor>,
    /// Shard file names, and the index of each shard's first tensor.
    files: Vec<(String, usize)>,
    shard_of: Vec<usize>,
    next: usize,
    cur: Option<(usize, BufWriter<File>)>,
    left: u64,
}

impl ShardWriter {
    fn new(dir: &Path, outs: Vec<OutTensor>, max_bytes: u64) -> ShardWriter {
        // mlx-lm's make_shards: a new shard when the next tensor would pass the limit
        let mut shard_of = vec![];
        let mut starts = vec![];
        let mut size = 0u64;
        for (i, t) in outs.iter().enumerate() {
            if starts.is_empty() || size + t.nbytes() > max_bytes {
                starts.push(i);
                size = 0;
            }
            size += t.nbytes();
            shard_of.push(starts.len() - 1);
        }
        let n = starts.len();
        let files = starts
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let name = if n > 1 {
                    format!("model-{:05}-of-{n:05}.safetensors", i + 1)
                } else {
                    "model.safetensors".into()
                };
                (name, s)
            })
            .collect();
        ShardWriter { dir: dir.to_path_buf(), outs, files, shard_of, next: 0, cur: None, left: 0 }
    }

    fn header(&self, shard: usize) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("__metadata__".into(), json!({"format": "mlx"}));
        let mut off = 0u64;
        for (t, _) in self.outs.iter().zip(&self.shard_of).filter(|(_, &s)| s == shard) {
            let n = t.nbytes();
            m.insert(
                t.name.clone(),
                json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + n]}),
            );
            off += n;
        }
        let mut h = serde_json::to_vec(&Value::Object(m)).expect("header serializes");
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        h
    }

    fn begin(&mut self, name: &str) -> Result<()> {
        ensure!(self.left == 0 && self.next < self.outs.len(), "internal: tensor `{name}` written out of order");
        ensure!(self.outs[self.next].name == name, "internal: expected `{}`, got `{name}`", self.outs[self.next].name);
        let shard = self.shard_of[self.next];
        if self.cur.as_ref().map(|c| c.0) != Some(shard) {
            self.close()?;
            let path = self.dir.join(&self.files[shard].0);
            let f = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            let h = self.header(shard);
            w.write_all(&(h.len() as u64).to_le_bytes())
                .and_then(|_| w.write_all(&h))
                .with_context(|| format!("writing {}", path.display()))?;
            self.cur = Some((shard, w));
        }
        self.left = self.outs[self.next].nbytes();
        self.next += 1;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        ensure!(bytes.len() as u64 <= self.left, "internal: tensor `{}` overflows", self.outs[self.next - 1].name);
        self.left -= bytes.len() as u64;
        let (shard, w) = self.cur.as_mut().expect("begin() first");
        let path = &self.files[*shard].0;
        w.write_all(bytes).with_context(|| format!("writing {}", self.dir.join(path).display()))
    }

    fn close(&mut self) -> Result<()> {
        if let Some((shard, w)) = self.cur.take() {
            let path = self.dir.join(&self.files[shard].0);
            let f = w.into_inner().map_err(|e| anyhow!("writing {}: {}", path.display(), e.error()))?;
            f.sync_all().with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        ensure!(self.left == 0 && self.next == self.outs.len(), "internal: not every tensor was written");
        self.close()
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut buf = vec![];
    let mut ser =
        serde_json::Serializer::with_formatter(&mut buf, serde_json::ser::PrettyFormatter::with_indent(b"    "));
    serde::Serialize::serialize(v, &mut ser).with_context(|| format!("serializing {}", path.display()))?;
    std::fs::write(path, buf).with_context(|| format!("cannot write {}", path.display()))
}

/// Write one planned item's tensors.
fn write_item(ck: &Checkpoint, item: &Item, w: &mut ShardWriter, progress: &mut dyn FnMut(u64)) -> Result<()> {
    match item {
        Item::Dense { name, parts, shape, src_dtype, out_dtype } => {
            w.begin(name)?;
            let cols = shape.last().copied().unwrap_or(1).max(1);
            for p in parts {
                let t = ck.get(&p.name)?;
                let bytes = t.host_bytes()?;
                let step = (CHUNK_ELEMS / cols).max(1);
                let mut r = 0;
                while r < p.rows {
                    let n = step.min(p.rows - r);
                    if src_dtype == out_dtype {
                        let sz = cols * src_dtype.size();
                        w.write(&bytes[(p.row0 + r) * sz..(p.row0 + r + n) * sz])?;
                    } else {
                        let v = read_f32(bytes, *src_dtype, cols, p.row0 + r, n, *out_dtype)?;
                        w.write(&f32_bytes(&v, *out_dtype))?;
                    }
                    progress((n * cols * src_dtype.size()) as u64);
                    r += n;
                }
            }
        }
        Item::Quant { prefix, parts, rows, cols, bits, group_size, src_dtype, out_dtype, .. } => {
            let (rows, cols) = (*rows, *cols);
            let mut scales = Vec::with_capacity(parts.len() * rows * cols / group_size);
            let mut biases = Vec::with_capacity(scales.capacity());
            w.begin(&format!("{prefix}.weight"))?;
            for p in parts {
                let t = ck.get(&p.name)?;
                let bytes = t.host_bytes()?;
                let step = (CHUNK_ELEMS / cols).max(1);
                let mut r = 0;
                while r < p.rows {
                    let n = step.min(p.rows - r);
                    let v = read_f32(bytes, *src_dtype, cols, p.row0 + r, n, *out_dtype)?;
                    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                        let file = ck.file_of(&p.name).map(|f| f.display().to_string()).unwrap_or_default();
                        bail!(
                            "{file}: tensor `{}` has a non-finite value ({}) at row {}, column {}",
                            p.name,
                            v[i],
                            p.row0 + r + i / cols,
                            i % cols
                        );
                    }
                    let (q, s, b) = quantize_affine(&v, n, cols, *bits, *group_size);
                    w.write(bytemuck::cast_slice(&q))?;
                    scales.extend_from_slice(&s);
                    biases.extend_from_slice(&b);
                    progress((n * cols * src_dtype.size()) as u64);
                    r += n;
                }
            }
            w.begin(&format!("{prefix}.scales"))?;
            w.write(&f32_bytes(&scales, *out_dtype))?;
            w.begin(&format!("{prefix}.biases"))?;
            w.write(&f32_bytes(&biases, *out_dtype))?;
        }
    }
    Ok(())
}

/// Everything after the checks: write the checkpoint into `tmp`.
fn write_all(
    from: &Path,
    tmp: &Path,
    ck: &Checkpoint,
    cfg: &SourceConfig,
    plan: &Plan,
    o: &QuantizeOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    let outs: Vec<OutTensor> = plan.items.iter().flat_map(Item::outputs).collect();
    let mut w = ShardWriter::new(tmp, outs, o.max_shard_bytes);
    let bytes_total: u64 = plan.items.iter().map(Item::src_bytes).sum();
    let mut bytes_done = 0u64;
    let total = plan.items.len();
    progress(&Progress { done: 0, total, bytes_done, bytes_total, name: "" });
    for (i, item) in plan.items.iter().enumerate() {
        let name = item.label();
        let mut on_bytes = |n: u64| {
            bytes_done += n;
            progress(&Progress { done: i, total, bytes_done, bytes_total, name });
        };
        write_item(ck, item, &mut w, &mut on_bytes)?;
        progress(&Progress { done: i + 1, total, bytes_done, bytes_total, name: item.label() });
    }
    w.finish()?;
    let ShardWriter { files, outs, shard_of, .. } = w;

    let mut summary = Summary { shards: files.len(), ..Default::default() };
    summary.input_bytes = bytes_total;
    summary.output_bytes = outs.iter().map(OutTensor::nbytes).sum();
    summary.parameters = plan.items.iter().map(Item::parameters).sum();
    summary.quantized = plan.items.iter().filter(|i| matches!(i, Item::Quant { .. })).count();
    summary.kept = total - summary.quantized;

    // model.safetensors.index.json (mlx-lm writes it even for one file)
    let mut weight_map: Vec<(&str, &str)> =
        outs.iter().zip(&shard_of).map(|(t, &s)| (t.name.as_str(), files[s].0.as_str())).collect();
    weight_map.sort_unstable();
    let weight_map: Map<String, Value> = weight_map.into_iter().map(|(k, f)| (k.to_string(), json!(f))).collect();
    let index = json!({
        "metadata": {"total_size": summary.output_bytes, "total_parameters": summary.parameters},
        "weight_map": weight_map,
    });
    write_json(&tmp.join("model.safetensors.index.json"), &index)?;

    // config.json: mlx-lm's load_config + quantize_model + save_config
    let mut c = cfg.value.clone();
    c.remove("_name_or_path");
    c.remove("vision_config");
    let gen = from.join("generation_config.json");
    if gen.exists() {
        if let Ok(Value::Object(g)) = read_json(&gen) {
            if let Some(eos) = g.get("eos_token_id").filter(|e| !matches!(e, Value::Null | Value::Bool(false))) {
                let empty = matches!(eos, Value::Array(a) if a.is_empty()) || eos.as_u64() == Some(0);
                if !empty {
                    c.insert("eos_token_id".into(), eos.clone());
                }
            }
        }
    }
    // transformers 5 spellings that mlx-lm 0.32 does not read: add the old
    // keys (same values) so that mlx-lm gets the experts and RoPE right too
    if cfg.model_type == "qwen3_moe" && !c.contains_key("num_experts") {
        if let Some(n) = c.get("num_local_experts").cloned() {
            c.insert("num_experts".into(), n);
        }
    }
    if let Some(Value::Object(p)) = c.get("rope_parameters").cloned() {
        if c.get("rope_theta").is_none_or(Value::is_null) {
            if let Some(t) = p.get("rope_theta") {
                c.insert("rope_theta".into(), t.clone());
            }
        }
        let scaled = p.get("rope_type").and_then(Value::as_str).is_some_and(|t| t != "default");
        if scaled && c.get("rope_scaling").is_none_or(Value::is_null) {
            c.insert("rope_scaling".into(), Value::Object(p));
        }
    }
    if cfg.write_untied && plan.items.iter().any(|i| matches!(i.label(), "lm_head" | "lm_head.weight")) {
        c.insert("tie_word_embeddings".into(), json!(false));
    }
    let mut q = Map::new();
    q.insert("group_size".into(), json!(o.group_size));
    q.insert("bits".into(), json!(o.bits));
    q.insert("mode".into(), json!("affine"));
    for (module, bits, gs) in &plan.overrides {
        q.insert(module.clone(), json!({"group_size": gs, "bits": bits}));
    }
    c.insert("quantization".into(), Value::Object(q.clone()));
    c.insert("quantization_config".into(), Value::Object(q));
    let mut sorted: Vec<(String, Value)> = c.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    write_json(&tmp.join("config.json"), &Value::Object(sorted.into_iter().collect()))?;

    for f in COPIED_FILES {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, tmp.join(f)).with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    Ok(summary)
}

/// The source checkpoint: the files of `model.safetensors.index.json`, else
/// `model*.safetensors` (mlx-lm's glob, so that other safetensors files beside
/// the model, e.g. test references, are not taken for weights).
fn open_source(dir: &Path) -> Result<Checkpoint> {
    if dir.join("model.safetensors.index.json").exists() {
        return Checkpoint::open_dir(dir);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("model") && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "{}: no model*.safetensors files found", dir.display());
    Checkpoint::open_files(&files)
}

/// A sibling path of `to` with `suffix` appended to its file name.
fn sibling(to: &Path, suffix: &str) -> Result<PathBuf> {
    let name = to.file_name().ok_or_else(|| anyhow!("{}: not a usable output directory name", to.display()))?;
    let mut s = name.to_os_string();
    s.push(suffix);
    Ok(to.with_file_name(s))
}

fn is_nonempty_dir(p: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(p).with_context(|| format!("cannot read {}", p.display()))?.next().is_some())
}

/// Quantize the Hugging Face model directory `from` into an MLX checkpoint at
/// `to` (see the module docs). `to` must not exist or be empty unless
/// `opts.force`; nothing is left at `to` (or beside it) unless the whole
/// conversion succeeds.
pub fn quantize_dir(
    from: &Path,
    to: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    opts.validate()?;
    ensure!(from.exists(), "{}: no such file or directory", from.display());
    ensure!(from.is_dir(), "{}: expected a model directory (config.json, *.safetensors)", from.display());
    let to_exists = to.symlink_metadata().is_ok();
    if to_exists {
        ensure!(to.is_dir(), "{}: exists and is not a directory", to.display());
        let (cf, ct) = (from.canonicalize()?, to.canonicalize()?);
        ensure!(
            !cf.starts_with(&ct),
            "{}: the output directory would replace the source directory {}",
            to.display(),
            from.display()
        );
        if !opts.force && is_nonempty_dir(to)? {
            bail!("{}: already exists and is not empty (pass --force to replace it)", to.display());
        }
    }
    let cfg = read_source_config(from)?;
    let ck = open_source(from)?;
    let plan = plan(&ck, &cfg, opts)?;

    let tmp = sibling(to, &format!(".tmp-{}", std::process::id()))?;
    if tmp.symlink_metadata().is_ok() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = write_all(from, &tmp, &ck, &cfg, &plan, opts, progress).and_then(|s| {
        install(&tmp, to)?;
        Ok(s)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Move the finished `tmp` into place at `to`, replacing what is there.
fn install(tmp: &Path, to: &Path) -> Result<()> {
    if to.symlink_metadata().is_err() {
        return std::fs::rename(tmp, to).with_context(|| format!("cannot move {} to {}", tmp.display(), to.display()));
    }
    let old = sibling(to, &format!(".old-{}", std::process::id()))?;
    std::fs::rename(to, &old).with_context(|| format!("cannot move the old {} aside", to.display()))?;
    if let Err(e) = std::fs::rename(tmp, to) {
        let _ = std::fs::rename(&old, to);
        return Err(e).with_context(|| format!("cannot move {} to {}", tmp.display(), to.display()));
    }
    std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove the old output {}", old.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numpy transcription used to check mlx: exact small cases.
    #[test]
    fn known_groups() {
        // 0..31 at 4 bits: min 0, max 31 -> scale -31/15 (max wins), q0 = -15
        let w: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let (q, s, b) = quantize_affine(&w, 1, 32, 4, 32);
        assert_eq!(b, vec![31.0]);
        assert_eq!(s, vec![31.0f32 / -15.0]);
        let deq = dequantize_affine(&q, &s, &b, 32, 4, 32).unwrap();
        assert_eq!(deq[31], 31.0);
        assert_eq!(fusebox_core::quant::unpack(&q, 4, 31), 0);
        assert_eq!(fusebox_core::quant::unpack(&q, 4, 0), 15);
        // an all-zero group: scale -1e-7, bias 0, all q 0
        let (q, s, b) = quantize_affine(&[0.0; 64], 1, 64, 3, 64);
        assert!(q.iter().all(|&x| x == 0));
        assert_eq!((s[0], b[0]), (-1e-7, 0.0));
    }

    #[test]
    fn packing_matches_core_pack() {
        for bits in SUPPORTED_BITS {
            let cols = 128;
            let w: Vec<f32> = (0..2 * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let (q, s, b) = quantize_affine(&w, 2, cols, bits, 32);
            let deq = dequantize_affine(&q, &s, &b, cols, bits, 32).unwrap();
            let words = cols * bits as usize / 32;
            for r in 0..2 {
                let vals: Vec<u32> = (0..cols).map(|i| fusebox_core::quant::unpack(&q[r * words..], bits, i)).collect();
                assert_eq!(fusebox_core::quant::pack(&vals, bits), q[r * words..(r + 1) * words]);
            }
            // the extreme of larger magnitude in each group is exact
            for g in 0..2 * cols / 32 {
                let grp = &w[g * 32..(g + 1) * 32];
                let mn = grp.iter().copied().fold(f32::INFINITY, f32::min);
                let mx = grp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let edge = if mn.abs() > mx.abs() { mn } else { mx };
                let i = g * 32 + grp.iter().position(|&x| x == edge).unwrap();
                assert!((deq[i] - edge).abs() <= 1e-5 * edge.abs(), "bits {bits} group {g}: {} vs {edge}", deq[i]);
            }
        }
    }

    #[test]
    fn sharded_output_equals_single_file() {
        let src = fusebox_core::fixtures::fixture("tiny-qwen3");
        let tmp = tempfile::tempdir().unwrap();
        let (one, many) = (tmp.path().join("one"), tmp.path().join("many"));
        let o = QuantizeOptions { group_size: 32, ..Default::default() };
        let s1 = quantize_dir(&src, &one, &o, &mut |_| {}).unwrap();
        let o2 = QuantizeOptions { max_shard_bytes: 20_000, ..o };
        let s2 = quantize_dir(&src, &many, &o2, &mut |_| {}).unwrap();
        assert_eq!(s1.shards, 1);
        assert!(s2.shards > 2, "{} shards", s2.shards);
        assert!(many.join(format!("model-00001-of-{:05}.safetensors", s2.shards)).exists());
        let (a, b) = (Checkpoint::open_dir(&one).unwrap(), Checkpoint::open_dir(&many).unwrap());
        let mut na: Vec<&str> = a.names().collect();
        let mut nb: Vec<&str> = b.names().collect();
        na.sort();
        nb.sort();
        assert_eq!(na, nb);
        for n in na {
            let (x, y) = (a.get(n).unwrap(), b.get(n).unwrap());
            assert_eq!((x.shape(), x.dtype()), (y.shape(), y.dtype()), "{n}");
            assert_eq!(x.host_bytes().unwrap(), y.host_bytes().unwrap(), "{n}");
        }
        assert_eq!(b.metadata.get("format").map(String::as_str), Some("mlx"));
        assert!(!tmp.path().join(format!("many.tmp-{}", std::process::id())).exists());
    }
}
