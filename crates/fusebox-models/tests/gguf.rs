//! GGUF: parsing, model config, weights and tokenizer from the metadata, and
//! one-line errors for bad files. Small GGUF files are written by the test
//! itself (see `Gguf`); the real SmolLM2 file and the committed fixtures are
//! used when present.

use std::path::{Path, PathBuf};

use fusebox_core::fixtures::{asset_or_skip, fixture};
use fusebox_core::{DType, GgmlType, RopeScaling, RopeStyle, Weight};
use fusebox_models::gguf::{self, GgufFile, GgufSource, MetaValue};
use fusebox_models::{Arch, ModelConfig, WeightSource};

// ---- a tiny GGUF writer ------------------------------------------------------

/// A metadata value to write.
#[derive(Clone)]
enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Element type id and elements (all of that type).
    Arr(u32, Vec<V>),
}

fn s(x: &str) -> V {
    V::Str(x.to_string())
}

fn strs(xs: &[&str]) -> V {
    V::Arr(8, xs.iter().map(|x| s(x)).collect())
}

impl V {
    fn type_id(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            V::U8(v) => out.push(*v),
            V::I8(v) => out.extend(v.to_le_bytes()),
            V::U16(v) => out.extend(v.to_le_bytes()),
            V::I16(v) => out.extend(v.to_le_bytes()),
            V::U32(v) => out.extend(v.to_le_bytes()),
            V::I32(v) => out.extend(v.to_le_bytes()),
            V::F32(v) => out.extend(v.to_le_bytes()),
            V::Bool(v) => out.push(*v as u8),
            V::Str(v) => write_str(out, v),
            V::U64(v) => out.extend(v.to_le_bytes()),
            V::I64(v) => out.extend(v.to_le_bytes()),
            V::F64(v) => out.extend(v.to_le_bytes()),
            V::Arr(ty, items) => {
                out.extend(ty.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    it.write(out);
                }
            }
        }
    }
}

fn write_str(out: &mut Vec<u8>, v: &str) {
    out.extend((v.len() as u64).to_le_bytes());
    out.extend(v.as_bytes());
}

struct T {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

/// Builds a GGUF file in memory.
struct Gguf {
    version: u32,
    alignment: usize,
    kv: Vec<(String, V)>,
    tensors: Vec<T>,
}

impl Gguf {
    fn new() -> Gguf {
        Gguf { version: 3, alignment: 32, kv: vec![], tensors: vec![] }
    }

    fn kv(mut self, k: &str, v: V) -> Gguf {
        self.kv.push((k.to_string(), v));
        self
    }

    /// A tensor of `ty` with ggml `dims`; data is a deterministic byte pattern
    /// of the right size (F32/F16 data is filled with small finite values).
    fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType) -> Gguf {
        let numel: u64 = dims.iter().product();
        let nbytes = (numel as usize / ty.block_size()) * ty.type_size();
        let data = match ty {
            GgmlType::F32 => (0..numel).flat_map(|i| (0.01 * (i % 97) as f32 - 0.3).to_le_bytes()).collect(),
            GgmlType::F16 => (0..numel).flat_map(|i| (0x3000u16 + (i % 512) as u16).to_le_bytes()).collect(),
            GgmlType::BF16 => (0..numel).flat_map(|i| (0x3e00u16 + (i % 64) as u16).to_le_bytes()).collect(),
            // Block types: small scales (f16 0x1400 ~ 0.001) at the block start, then a pattern.
            _ => (0..nbytes)
                .map(|i| if i % ty.type_size() < 2 { [0x00, 0x14][i % 2] } else { (i * 37 % 251) as u8 })
                .collect(),
        };
        self.tensors.push(T { name: name.to_string(), dims: dims.to_vec(), ty: ty as u32, data });
        self
    }

    /// A tensor with an arbitrary type id and raw data.
    fn raw_tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Gguf {
        self.tensors.push(T { name: name.to_string(), dims: dims.to_vec(), ty, data });
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            write_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            v.write(&mut out);
        }
        let mut offset = 0usize;
        let mut offsets = vec![];
        for t in &self.tensors {
            write_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(self.alignment) * self.alignment;
        }
        let start = out.len().div_ceil(self.alignment) * self.alignment;
        out.resize(start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off, 0);
            out.extend(&t.data);
        }
        out
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write_bytes(dir, name, &self.bytes())
    }
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The error of opening `path`, checked to be one line naming the file.
fn open_err(path: &Path) -> String {
    let e = match GgufFile::open(path) {
        Ok(_) => panic!("{} opened, but an error was expected", path.display()),
        Err(e) => format!("{e:#}"),
    };
    check_line(&e, path);
    eprintln!("expected error: {e}");
    e
}

fn check_line(e: &str, path: &Path) {
    assert!(!e.contains('\n'), "error is not one line: {e}");
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(e.contains(name), "error does not name the file {name}: {e}");
}

/// A small Llama (or Qwen3) model: hidden 64, 4 heads of 16, 2 kv heads,
/// ffn 128, vocab 256, 2 layers.
fn tiny_model(arch: &str, ty: GgmlType) -> Gguf {
    let a = |k: &str| format!("{arch}.{k}");
    let mut g = Gguf::new()
        .kv("general.architecture", s(arch))
        .kv("general.name", s("tiny"))
        .kv(&a("embedding_length"), V::U32(64))
        .kv(&a("block_count"), V::U32(2))
        .kv(&a("feed_forward_length"), V::U32(128))
        .kv(&a("attention.head_count"), V::U32(4))
        .kv(&a("attention.head_count_kv"), V::U32(2))
        .kv(&a("rope.freq_base"), V::F32(500000.0))
        .kv(&a("attention.layer_norm_rms_epsilon"), V::F32(1e-5))
        .kv(&a("context_length"), V::U32(4096))
        .kv("tokenizer.ggml.bos_token_id", V::U32(1))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .tensor("token_embd.weight", &[64, 256], GgmlType::Q8_0)
        .tensor("output_norm.weight", &[64], GgmlType::F32);
    for i in 0..2 {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        g = g
            .tensor(&b("attn_norm"), &[64], GgmlType::F32)
            .tensor(&b("ffn_norm"), &[64], GgmlType::F16)
            .tensor(&b("attn_q"), &[64, 64], ty)
            .tensor(&b("attn_k"), &[64, 32], ty)
            .tensor(&b("attn_v"), &[64, 32], ty)
            .tensor(&b("attn_output"), &[64, 64], ty)
            .tensor(&b("ffn_gate"), &[64, 128], ty)
            .tensor(&b("ffn_up"), &[64, 128], ty)
            .tensor(&b("ffn_down"), &[128, 64], ty);
        if arch == "qwen3" {
            g = g.tensor(&b("attn_q_norm"), &[16], GgmlType::F32).tensor(&b("attn_k_norm"), &[16], GgmlType::BF16);
        }
    }
    g
}

/// Load every weight the decoder would ask for, checking dims and formats.
fn load_all(src: &GgufSource, cfg: &ModelConfig) -> Vec<(String, Weight)> {
    let (h, q, kv) = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let mut out = vec![];
    let mut exps = vec![];
    let mut lin = |m: String, r: usize, c: usize| {
        let w = src.linear(&m, r, c).unwrap_or_else(|e| panic!("{m}: {e:#}"));
        assert_eq!(w.dims(), (1, r, c), "{m}");
        out.push((m, w));
    };
    lin("model.embed_tokens".into(), cfg.vocab_size, h);
    if !cfg.tie_word_embeddings {
        lin("lm_head".into(), cfg.vocab_size, h);
    }
    let mut norms = vec![("model.norm".to_string(), h)];
    for i in 0..cfg.num_layers {
        let l = |n: &str| format!("model.layers.{i}.{n}");
        lin(l("self_attn.q_proj"), q, h);
        lin(l("self_attn.k_proj"), kv, h);
        lin(l("self_attn.v_proj"), kv, h);
        lin(l("self_attn.o_proj"), h, q);
        norms.push((l("input_layernorm"), h));
        norms.push((l("post_attention_layernorm"), h));
        if cfg.qk_norm {
            norms.push((l("self_attn.q_norm"), cfg.head_dim));
            norms.push((l("self_attn.k_norm"), cfg.head_dim));
        }
        match &cfg.moe {
            Some(m) if m.is_sparse(i) => {
                lin(l("mlp.gate"), m.num_experts, h);
                for (p, r, c) in [
                    ("gate_proj", m.intermediate_size, h),
                    ("up_proj", m.intermediate_size, h),
                    ("down_proj", h, m.intermediate_size),
                ] {
                    let w = src.experts(&l("mlp"), p, m.num_experts, r, c).unwrap_or_else(|e| panic!("{p}: {e:#}"));
                    assert_eq!(w.dims(), (m.num_experts, r, c));
                    exps.push((format!("{}.experts.{p}", l("mlp")), w));
                }
            }
            _ => {
                lin(l("mlp.gate_proj"), cfg.intermediate_size, h);
                lin(l("mlp.up_proj"), cfg.intermediate_size, h);
                lin(l("mlp.down_proj"), h, cfg.intermediate_size);
            }
        }
    }
    out.extend(exps);
    for (m, n) in norms {
        let t = src.norm(&m, n).unwrap_or_else(|e| panic!("{m}: {e:#}"));
        assert_eq!((t.shape(), t.dtype()), (&[n][..], DType::F32), "{m}");
        assert!(t.to_f32_vec().unwrap().iter().all(|v| v.is_finite()), "{m}");
    }
    // Every weight dequantizes to finite values (first and last row of the first expert).
    for (m, w) in &out {
        let (_, r, c) = w.dims();
        let mut row = vec![0f32; c];
        for idx in [0, r - 1] {
            w.dequant_row(0, idx, &mut row).unwrap_or_else(|e| panic!("{m}: {e:#}"));
            assert!(row.iter().all(|v| v.is_finite()), "{m} row {idx}");
        }
    }
    out
}

// ---- synthetic files -----------------------------------------------------------

#[test]
fn all_metadata_types_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let nested = V::Arr(9, vec![V::Arr(4, vec![V::U32(1), V::U32(2)]), V::Arr(4, vec![])]);
    let g = Gguf::new()
        .kv("u8", V::U8(200))
        .kv("i8", V::I8(-5))
        .kv("u16", V::U16(60000))
        .kv("i16", V::I16(-30000))
        .kv("u32", V::U32(4_000_000_000))
        .kv("i32", V::I32(-7))
        .kv("f32", V::F32(1.5))
        .kv("bool", V::Bool(true))
        .kv("str", s("héllo"))
        .kv("u64", V::U64(1 << 40))
        .kv("i64", V::I64(-(1 << 40)))
        .kv("f64", V::F64(0.25))
        .kv("strs", strs(&["a", "", "c d"]))
        .kv("ints", V::Arr(5, vec![V::I32(1), V::I32(-2), V::I32(3)]))
        .kv("nested", nested)
        .kv("general.alignment", V::U32(64));
    let g = Gguf { alignment: 64, ..g }.tensor("t", &[4], GgmlType::F32);
    let p = g.write(dir.path(), "types.gguf");
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(f.get("u8"), Some(&MetaValue::U8(200)));
    assert_eq!(f.get("i8"), Some(&MetaValue::I8(-5)));
    assert_eq!(f.get("u16"), Some(&MetaValue::U16(60000)));
    assert_eq!(f.get("i16"), Some(&MetaValue::I16(-30000)));
    assert_eq!(f.get_u32("u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get("i32"), Some(&MetaValue::I32(-7)));
    assert_eq!(f.get_f32("f32").unwrap(), 1.5);
    assert!(f.get_bool("bool").unwrap());
    assert_eq!(f.get_str("str").unwrap(), "héllo");
    assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
    assert_eq!(f.get("i64"), Some(&MetaValue::I64(-(1 << 40))));
    assert_eq!(f.get_f32("f64").unwrap(), 0.25);
    assert_eq!(f.get_str_array("strs").unwrap(), vec!["a", "", "c d"]);
    assert_eq!(f.get_opt_int_array("ints").unwrap(), Some(vec![1, -2, 3]));
    let n = f.get("nested").unwrap().as_array().unwrap();
    assert_eq!(n[0], MetaValue::Array(vec![MetaValue::U32(1), MetaValue::U32(2)]));
    assert_eq!(n[1], MetaValue::Array(vec![]));
    // Narrow integer types read through the wider getters.
    assert_eq!(f.get_u32("u8").unwrap(), 200);
    assert_eq!(f.get_opt_u32("missing").unwrap(), None);
    // Typed getters name the key and the type.
    let e = format!("{:#}", f.get_u32("i32").unwrap_err());
    assert!(e.contains("`i32`") && e.contains("INT32"), "{e}");
    let e = format!("{:#}", f.get_str("u8").unwrap_err());
    assert!(e.contains("`u8`") && e.contains("UINT8") && e.contains("STRING"), "{e}");
    let e = format!("{:#}", f.get_u32("nope").unwrap_err());
    assert!(e.contains("`nope`") && e.contains("missing"), "{e}");
    check_line(&e, &p);
    // The tensor is a zero-copy view.
    let (t, ty, dims) = f.tensor_raw("t").unwrap();
    assert_eq!((ty, dims, t.shape()), (GgmlType::F32, vec![4], &[16][..]));
    assert!(matches!(t.storage(), fusebox_core::Storage::Mapped { .. }));
}

#[test]
fn version_2_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gguf { version: 2, ..tiny_model("llama", GgmlType::Q4_0) };
    let p = g.write(dir.path(), "v2.gguf");
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version, 2);
    assert_eq!(f.architecture().unwrap(), "llama");
}

#[test]
fn synthetic_llama_config_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let p = tiny_model("llama", ty).write(dir.path(), &format!("llama-{}.gguf", ty.name()));
        let f = GgufFile::open(&p).unwrap();
        let cfg = gguf::model_config(&f).unwrap();
        assert_eq!(cfg.arch, Arch::Llama);
        assert_eq!((cfg.hidden_size, cfg.num_layers, cfg.intermediate_size), (64, 2, 128));
        assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size), (4, 2, 16, 256));
        assert_eq!(cfg.rope_theta, 500000.0);
        assert_eq!(cfg.rms_norm_eps, 1e-5);
        assert_eq!(cfg.rope_scaling, RopeScaling::None);
        assert_eq!(cfg.rope_style, RopeStyle::Interleaved);
        assert_eq!(cfg.max_position_embeddings, 4096);
        assert!(cfg.tie_word_embeddings);
        assert!(!cfg.qk_norm);
        assert_eq!((cfg.bos_token_id, cfg.eos_token_ids.clone()), (Some(1), vec![2]));
        assert!(cfg.moe.is_none() && cfg.quantization.is_none());
        let src = GgufSource::new(&f);
        assert!(!src.has("lm_head"));
        assert!(src.has("model.layers.1.mlp.down_proj"));
        let ws = load_all(&src, &cfg);
        let q = &ws.iter().find(|(m, _)| m == "model.layers.0.self_attn.q_proj").unwrap().1;
        match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let Weight::Dense(t) = q else { panic!("{ty:?} should be dense") };
                assert_eq!(t.shape(), &[64, 64]);
                assert_eq!(t.dtype().name(), ty.name());
            }
            _ => assert!(matches!(q, Weight::Gguf { ty: t, .. } if *t == ty), "{ty:?}: {}", q.format()),
        }
        assert_eq!(ws[0].1.format(), "Q8_0");
    }
}

#[test]
fn synthetic_qwen3_and_untied_output() {
    let dir = tempfile::tempdir().unwrap();
    let g = tiny_model("qwen3", GgmlType::Q8_0)
        .kv("qwen3.attention.key_length", V::U32(16))
        .kv("qwen3.attention.value_length", V::U32(16))
        .tensor("output.weight", &[64, 256], GgmlType::F16);
    let p = g.write(dir.path(), "qwen3.gguf");
    let f = GgufFile::open(&p).unwrap();
    let cfg = gguf::model_config(&f).unwrap();
    assert_eq!(cfg.arch, Arch::Qwen3);
    assert_eq!(cfg.rope_style, RopeStyle::Half);
    assert!(cfg.qk_norm);
    assert!(!cfg.tie_word_embeddings);
    let src = GgufSource::new(&f);
    assert!(src.has("lm_head"));
    let ws = load_all(&src, &cfg);
    assert!(ws.iter().any(|(m, w)| m == "lm_head" && w.format() == "F16"));
}

#[test]
fn synthetic_qwen3_moe() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gguf::new()
        .kv("general.architecture", s("qwen3moe"))
        .kv("qwen3moe.embedding_length", V::U32(64))
        .kv("qwen3moe.block_count", V::U32(3))
        .kv("qwen3moe.feed_forward_length", V::U32(96))
        .kv("qwen3moe.expert_feed_forward_length", V::U32(32))
        .kv("qwen3moe.expert_count", V::U32(4))
        .kv("qwen3moe.expert_used_count", V::U32(2))
        .kv("qwen3moe.attention.head_count", V::U32(4))
        .kv("qwen3moe.attention.head_count_kv", V::U32(2))
        .kv("qwen3moe.attention.key_length", V::U32(32))
        .kv("qwen3moe.attention.layer_norm_rms_epsilon", V::F32(1e-6))
        .kv("qwen3moe.rope.freq_base", V::F32(1e6))
        .kv("tokenizer.ggml.eos_token_id", V::U32(7))
        .tensor("token_embd.weight", &[64, 128], GgmlType::F32)
        .tensor("output_norm.weight", &[64], GgmlType::F32);
    for i in 0..3 {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        g = g
            .tensor(&b("attn_norm"), &[64], GgmlType::F32)
            .tensor(&b("ffn_norm"), &[64], GgmlType::F32)
            .tensor(&b("attn_q"), &[64, 128], GgmlType::Q8_0)
            .tensor(&b("attn_k"), &[64, 64], GgmlType::Q8_0)
            .tensor(&b("attn_v"), &[64, 64], GgmlType::Q8_0)
            .tensor(&b("attn_output"), &[128, 64], GgmlType::Q8_0)
            .tensor(&b("attn_q_norm"), &[32], GgmlType::F32)
            .tensor(&b("attn_k_norm"), &[32], GgmlType::F32);
        if i == 1 {
            // a dense layer
            g = g
                .tensor(&b("ffn_gate"), &[64, 96], GgmlType::Q8_0)
                .tensor(&b("ffn_up"), &[64, 96], GgmlType::Q8_0)
                .tensor(&b("ffn_down"), &[96, 64], GgmlType::Q8_0);
        } else {
            g = g
                .tensor(&b("ffn_gate_inp"), &[64, 4], GgmlType::F32)
                .tensor(&b("ffn_gate_exps"), &[64, 32, 4], GgmlType::Q8_0)
                .tensor(&b("ffn_up_exps"), &[64, 32, 4], GgmlType::Q4_0)
                .tensor(&b("ffn_down_exps"), &[32, 64, 4], GgmlType::BF16);
        }
    }
    let p = g.write(dir.path(), "moe.gguf");
    let f = GgufFile::open(&p).unwrap();
    let cfg = gguf::model_config(&f).unwrap();
    assert_eq!(cfg.arch, Arch::Qwen3Moe);
    assert_eq!((cfg.head_dim, cfg.intermediate_size, cfg.vocab_size), (32, 96, 128));
    assert_eq!(cfg.eos_token_ids, vec![7]);
    assert_eq!(cfg.bos_token_id, None);
    let moe = cfg.moe.clone().unwrap();
    assert_eq!((moe.num_experts, moe.top_k, moe.intermediate_size), (4, 2, 32));
    assert!(moe.norm_topk_prob);
    assert_eq!((moe.decoder_sparse_step, moe.mlp_only_layers.clone()), (1, vec![1]));
    let src = GgufSource::new(&f);
    let ws = load_all(&src, &cfg);
    let find = |m: &str| &ws.iter().find(|(n, _)| n == m).unwrap().1;
    assert!(matches!(
        find("model.layers.0.mlp.experts.gate_proj"),
        Weight::Gguf { ty: GgmlType::Q8_0, experts: 4, rows: 32, cols: 64, .. }
    ));
    let Weight::Dense(t) = find("model.layers.2.mlp.experts.down_proj") else { panic!("BF16 experts should be dense") };
    assert_eq!(t.shape(), &[4, 64, 32]);
    // A wrong expected shape names the tensor, the expected and the actual dims.
    let e = format!("{:#}", src.experts("model.layers.0.mlp", "up_proj", 4, 64, 32).unwrap_err());
    assert!(e.contains("blk.0.ffn_up_exps.weight") && e.contains("[64, 32, 4]") && e.contains("[32, 64, 4]"), "{e}");
    check_line(&e, &p);
}

#[test]
fn shape_and_name_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_model("llama", GgmlType::Q4_0).write(dir.path(), "shapes.gguf");
    let f = GgufFile::open(&p).unwrap();
    let src = GgufSource::new(&f);
    let e = format!("{:#}", src.linear("model.layers.0.self_attn.k_proj", 64, 64).unwrap_err());
    assert!(e.contains("blk.0.attn_k.weight") && e.contains("[64, 64]") && e.contains("[64, 32]"), "{e}");
    check_line(&e, &p);
    let e = format!("{:#}", src.linear("model.layers.7.self_attn.k_proj", 32, 64).unwrap_err());
    assert!(e.contains("blk.7.attn_k.weight") && e.contains("not found"), "{e}");
    let e = format!("{:#}", src.linear("model.vision.proj", 32, 64).unwrap_err());
    assert!(e.contains("model.vision.proj"), "{e}");
    let e = format!("{:#}", src.norm("model.layers.0.self_attn.q_proj", 64).unwrap_err());
    assert!(e.contains("blk.0.attn_q.weight"), "{e}");
    check_line(&e, &p);
}

#[test]
fn linear_rope_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let g = tiny_model("llama", GgmlType::F32)
        .kv("llama.rope.scaling.type", s("linear"))
        .kv("llama.rope.scaling.factor", V::F32(2.0));
    let f = GgufFile::open(g.write(dir.path(), "linear.gguf")).unwrap();
    assert_eq!(gguf::model_config(&f).unwrap().rope_scaling, RopeScaling::Linear { factor: 2.0 });
    let g = tiny_model("llama", GgmlType::F32).kv("llama.rope.scaling.type", s("yarn"));
    let p = g.write(dir.path(), "yarn.gguf");
    let e = format!("{:#}", gguf::model_config(&GgufFile::open(&p).unwrap()).unwrap_err());
    assert!(e.contains("yarn") && e.contains("llama.rope.scaling.type"), "{e}");
    check_line(&e, &p);
}

/// llama.cpp's per-frequency divisors for Llama 3 scaling, as its converter writes them.
fn llama3_factors(head_dim: usize, theta: f64, factor: f64, lo: f64, hi: f64, old: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < old / hi {
                1.0
            } else if wavelen > old / lo {
                factor
            } else {
                let smooth = (old / wavelen - lo) / (hi - lo);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

#[test]
fn llama3_rope_freqs_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for (hd, theta, factor, lo, hi, old) in [
        (16usize, 10000.0, 8.0, 1.0, 4.0, 32.0),
        (128, 500000.0, 8.0, 1.0, 4.0, 8192.0),
        (64, 10000.0, 32.0, 1.0, 4.0, 8192.0),
    ] {
        let ff = llama3_factors(hd, theta, factor, lo, hi, old);
        let g = Gguf::new()
            .kv("general.architecture", s("llama"))
            .kv("llama.embedding_length", V::U32(hd as u32 * 2))
            .kv("llama.block_count", V::U32(1))
            .kv("llama.feed_forward_length", V::U32(64))
            .kv("llama.attention.head_count", V::U32(2))
            .kv("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5))
            .kv("llama.rope.freq_base", V::F32(theta as f32))
            .tensor("token_embd.weight", &[hd as u64 * 2, 8], GgmlType::F32)
            .raw_tensor("rope_freqs.weight", &[hd as u64 / 2], 0, ff.iter().flat_map(|f| f.to_le_bytes()).collect());
        let p = g.write(dir.path(), "llama3.gguf");
        let cfg = gguf::model_config(&GgufFile::open(&p).unwrap()).unwrap();
        let want = fusebox_core::rope::inv_freq(
            hd,
            theta as f32 as f64,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: old,
            },
        );
        let got = fusebox_core::rope::inv_freq(hd, cfg.rope_theta, cfg.rope_scaling);
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { .. }), "{:?}", cfg.rope_scaling);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs(), "hd {hd}: {got:?} vs {want:?}");
        }
    }
}

// ---- bad files -------------------------------------------------------------------

#[test]
fn bad_magic() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tiny_model("llama", GgmlType::Q4_0).bytes();
    b[..4].copy_from_slice(b"\x89PNG");
    let e = open_err(&write_bytes(dir.path(), "picture.gguf", &b));
    assert!(e.contains("not a GGUF file") && e.contains("magic"), "{e}");
    let e = open_err(&write_bytes(dir.path(), "empty.gguf", b""));
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn unsupported_versions() {
    let dir = tempfile::tempdir().unwrap();
    let e = open_err(&Gguf { version: 1, ..Gguf::new() }.write(dir.path(), "v1.gguf"));
    assert!(e.contains("version 1"), "{e}");
    let e = open_err(&Gguf { version: 4, ..Gguf::new() }.write(dir.path(), "v4.gguf"));
    assert!(e.contains("version 4"), "{e}");
    let e = open_err(&Gguf { version: 3u32.swap_bytes(), ..Gguf::new() }.write(dir.path(), "be.gguf"));
    assert!(e.contains("big-endian"), "{e}");
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let b = tiny_model("llama", GgmlType::Q4_0).bytes();
    // Half the file: the header is whole, the tensor data is not.
    let p = write_bytes(dir.path(), "half.gguf", &b[..b.len() / 2]);
    let e = open_err(&p);
    assert!(e.contains("past end of file") && e.contains("truncated?") && e.contains("tensor `"), "{e}");
    // Cut before the counts can be satisfied.
    let e = open_err(&write_bytes(dir.path(), "cut-early.gguf", &b[..100]));
    assert!(e.contains("truncated"), "{e}");
    // Cut inside a metadata value.
    let b2 = bpe_gguf("gpt2").bytes();
    let key = b"tokenizer.ggml.merges";
    let at = b2.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 40;
    let e = open_err(&write_bytes(dir.path(), "cut-meta.gguf", &b2[..at]));
    assert!(e.contains("truncated") && e.contains("metadata key `tokenizer.ggml.merges`"), "{e}");
    // Cut inside the tensor directory.
    let b3 = Gguf::new()
        .kv("general.architecture", s("llama"))
        .kv("general.name", s("a long enough name to cover the tensor count bound"))
        .tensor("a.weight", &[32], GgmlType::F32)
        .tensor("blk.1.ffn_up.weight", &[32], GgmlType::F32)
        .bytes();
    let name = b"blk.1.ffn_up.weight";
    let at = b3.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 6;
    let e = open_err(&write_bytes(dir.path(), "cut-infos.gguf", &b3[..at]));
    assert!(e.contains("truncated") && e.contains("tensor info `blk.1.ffn_up.weight`"), "{e}");
    // Every prefix fails cleanly, with one line naming the file.
    let step = (b.len() / 300).max(1);
    for n in (0..b.len()).step_by(step).chain([b.len() - 1]) {
        let p = write_bytes(dir.path(), "prefix.gguf", &b[..n]);
        open_err(&p);
    }
}

#[test]
fn tensor_data_past_end() {
    let dir = tempfile::tempdir().unwrap();
    // The tensor directory says 64x64 F32 (16 KiB), but only 1 KiB follows.
    let g = Gguf::new()
        .kv("general.architecture", s("llama"))
        .tensor("blk.0.attn_norm.weight", &[64], GgmlType::F32)
        .raw_tensor("blk.3.ffn_down.weight", &[64, 64], 0, vec![0; 1024]);
    let e = open_err(&g.write(dir.path(), "short.gguf"));
    assert!(e.contains("tensor `blk.3.ffn_down.weight`") && e.contains("past end of file"), "{e}");
}

#[test]
fn unknown_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gguf::new().kv("general.architecture", s("llama")).raw_tensor("x", &[256, 4], 16, vec![0; 512]);
    let e = open_err(&g.write(dir.path(), "iq.gguf"));
    let want = format!("tensor `x` has type {} (16), which fusebox does not support", GgmlType::name_of_id(16));
    assert!(e.contains(&want), "{e}");
    let g = Gguf::new().raw_tensor("y", &[32], 1000, vec![0; 64]);
    let e = open_err(&g.write(dir.path(), "weird.gguf"));
    assert!(e.contains("tensor `y`") && e.contains("(1000)"), "{e}");
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = tiny_model("llama", GgmlType::Q4_0);
    g.kv[0].1 = s("gpt2");
    let p = g.write(dir.path(), "gpt2.gguf");
    let f = GgufFile::open(&p).unwrap();
    let e = format!("{:#}", gguf::model_config(&f).unwrap_err());
    assert!(e.contains("\"gpt2\"") && e.contains("llama, qwen3, qwen3moe"), "{e}");
    check_line(&e, &p);
}

#[test]
fn missing_required_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = tiny_model("qwen3", GgmlType::Q4_0);
    g.kv.retain(|(k, _)| k != "qwen3.embedding_length");
    let p = g.write(dir.path(), "no-hidden.gguf");
    let e = format!("{:#}", gguf::model_config(&GgufFile::open(&p).unwrap()).unwrap_err());
    assert!(e.contains("`qwen3.embedding_length`") && e.contains("missing"), "{e}");
    check_line(&e, &p);
    let mut g = tiny_model("llama", GgmlType::Q4_0);
    g.kv.retain(|(k, _)| k != "general.architecture");
    let p = g.write(dir.path(), "no-arch.gguf");
    let e = format!("{:#}", gguf::model_config(&GgufFile::open(&p).unwrap()).unwrap_err());
    assert!(e.contains("`general.architecture`"), "{e}");
    check_line(&e, &p);
}

#[test]
fn corrupt_counts_do_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let header = |nt: u64, nkv: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(nt.to_le_bytes());
        b.extend(nkv.to_le_bytes());
        b
    };
    for (name, b) in [("many-tensors.gguf", header(u64::MAX, 0)), ("many-kv.gguf", header(0, 1 << 60))] {
        let e = open_err(&write_bytes(dir.path(), name, &b));
        assert!(e.contains("claims"), "{e}");
    }
    // A huge string length and a huge array count inside a metadata value.
    let mut b = header(0, 1);
    write_str(&mut b, "k");
    b.extend(8u32.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    let e = open_err(&write_bytes(dir.path(), "long-string.gguf", &b));
    assert!(e.contains("`k`"), "{e}");
    let mut b = header(0, 1);
    write_str(&mut b, "arr");
    b.extend(9u32.to_le_bytes());
    b.extend(9u32.to_le_bytes());
    b.extend((1u64 << 62).to_le_bytes());
    let e = open_err(&write_bytes(dir.path(), "huge-array.gguf", &b));
    assert!(e.contains("`arr`") && e.contains("claims"), "{e}");
    // Deeply nested arrays are refused, not recursed into.
    let mut b = header(0, 1);
    write_str(&mut b, "deep");
    b.extend(9u32.to_le_bytes());
    for _ in 0..100_000 {
        b.extend(9u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    let e = open_err(&write_bytes(dir.path(), "deep.gguf", &b));
    assert!(e.contains("`deep`"), "{e}");
    // Impossible tensor dims.
    let g = Gguf::new().raw_tensor("big", &[1 << 62, 1 << 62], 0, vec![]);
    let e = open_err(&g.write(dir.path(), "big-dims.gguf"));
    assert!(e.contains("tensor `big`"), "{e}");
    // Too many dims.
    let g = Gguf::new().raw_tensor("five", &[1, 1, 1, 1, 1], 0, vec![0; 4]);
    let e = open_err(&g.write(dir.path(), "five-dims.gguf"));
    assert!(e.contains("tensor `five`") && e.contains("5 dimensions"), "{e}");
    // Unknown metadata value type.
    let mut b = header(0, 1);
    write_str(&mut b, "odd");
    b.extend(77u32.to_le_bytes());
    let e = open_err(&write_bytes(dir.path(), "odd-type.gguf", &b));
    assert!(e.contains("`odd`") && e.contains("77"), "{e}");
}

#[test]
fn corrupted_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_model("qwen3", GgmlType::Q4_1).kv("tokenizer.ggml.model", s("gpt2")).bytes();
    let header_len = 600.min(base.len());
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..300 {
        let mut b = base.clone();
        for _ in 0..1 + i % 4 {
            let pos = (rnd() as usize) % header_len;
            b[pos] = rnd() as u8;
        }
        let p = write_bytes(dir.path(), "fuzz.gguf", &b);
        // Either outcome is fine; a panic is not. Errors stay one line.
        match GgufFile::open(&p) {
            Ok(f) => {
                if let Ok(cfg) = gguf::model_config(&f) {
                    let src = GgufSource::new(&f);
                    let _ =
                        src.linear("model.layers.0.self_attn.q_proj", cfg.num_heads * cfg.head_dim, cfg.hidden_size);
                    let _ = src.norm("model.norm", cfg.hidden_size);
                }
                let _ = gguf::tokenizer(&f);
            }
            Err(e) => check_line(&format!("{e:#}"), &p),
        }
    }
}

// ---- tokenizer from metadata -------------------------------------------------------

/// A byte-level BPE vocabulary: the 256 byte symbols, a few merges, and
/// control / user-defined tokens.
fn bpe_gguf(pre: &str) -> Gguf {
    // GPT-2's byte-to-unicode table.
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut sym = vec![String::new(); 256];
    for (b, c) in bs.iter().zip(&cs) {
        sym[*b as usize] = char::from_u32(*c).unwrap().to_string();
    }
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    tokens.extend(sym);
    let merges = ["Ġ t", "h e", "Ġt he", "Ġ 1", "1 2", "l l", "he ll", "hell o"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<think>".into());
    let mut types = vec![V::I32(3); 3];
    types.extend(std::iter::repeat_n(V::I32(1), tokens.len() - 4));
    types.push(V::I32(4));
    let toks: Vec<&str> = tokens.iter().map(String::as_str).collect();
    Gguf::new()
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s(pre))
        .kv("tokenizer.ggml.tokens", strs(&toks))
        .kv("tokenizer.ggml.token_type", V::Arr(5, types))
        .kv("tokenizer.ggml.merges", strs(&merges))
        .kv("tokenizer.ggml.bos_token_id", V::U32(0))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .kv("tokenizer.chat_template", s("{{ messages }}"))
}

#[test]
fn synthetic_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    for pre in ["gpt2", "smollm", "qwen2", "llama-bpe", "default"] {
        let f = GgufFile::open(bpe_gguf(pre).write(dir.path(), &format!("tok-{pre}.gguf"))).unwrap();
        let tok = gguf::tokenizer(&f).unwrap_or_else(|e| panic!("{pre}: {e:#}"));
        let text = "<|im_start|>hello the 12<think> é!<|im_end|>";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids[0], 1, "{pre}: {ids:?}");
        assert_eq!(*ids.last().unwrap(), 2, "{pre}: {ids:?}");
        let hello = tok.token_to_id("hello").unwrap();
        let the = tok.token_to_id("Ġthe").unwrap();
        let think = tok.token_to_id("<think>").unwrap();
        assert_eq!(&ids[1..3], &[hello, the], "{pre}");
        assert!(ids.contains(&think), "{pre}: {ids:?}");
        // Digits: smollm and qwen2 split every digit, gpt2 keeps " 12" whole.
        let twelve = tok.token_to_id("12").unwrap();
        let sp1 = tok.token_to_id("Ġ1").unwrap();
        match pre {
            "smollm" | "qwen2" => assert!(!ids.contains(&twelve) && !ids.contains(&sp1), "{pre}: {ids:?}"),
            "llama-bpe" => assert!(ids.contains(&twelve), "{pre}: {ids:?}"),
            _ => assert!(!ids.contains(&twelve), "{pre}: {ids:?}"),
        }
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{pre}");
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello the 12<think> é!", "{pre}");
        assert_eq!(gguf::chat_template(&f).as_deref(), Some("{{ messages }}"));
    }
    // BOS is added only when asked for.
    let f = GgufFile::open(
        bpe_gguf("gpt2").kv("tokenizer.ggml.add_bos_token", V::Bool(true)).write(dir.path(), "bos.gguf"),
    )
    .unwrap();
    let tok = gguf::tokenizer(&f).unwrap();
    assert_eq!(tok.encode("hello", true).unwrap()[0], 0);
    assert_ne!(tok.encode("hello", false).unwrap()[0], 0);
}

fn tok_err(p: &Path) -> String {
    match gguf::tokenizer(&GgufFile::open(p).unwrap()) {
        Ok(_) => panic!("{}: tokenizer built, but an error was expected", p.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn tokenizer_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = bpe_gguf("gpt2");
    g.kv[0].1 = s("llama");
    let p = g.write(dir.path(), "spm.gguf");
    let e = tok_err(&p);
    assert!(e.contains("\"llama\"") && e.contains("tokenizer.ggml.model"), "{e}");
    check_line(&e, &p);
    let p = bpe_gguf("mystery").write(dir.path(), "pre.gguf");
    let e = tok_err(&p);
    assert!(e.contains("\"mystery\"") && e.contains("tokenizer.ggml.pre"), "{e}");
    check_line(&e, &p);
    let mut g = bpe_gguf("gpt2");
    g.kv.retain(|(k, _)| k != "tokenizer.ggml.tokens");
    let p = g.write(dir.path(), "no-tokens.gguf");
    let e = tok_err(&p);
    assert!(e.contains("`tokenizer.ggml.tokens`"), "{e}");
    check_line(&e, &p);
    let mut g = bpe_gguf("gpt2");
    for (k, v) in g.kv.iter_mut() {
        if k == "tokenizer.ggml.merges" {
            *v = strs(&["Ġ t", "zz qq"]);
        }
    }
    let p = g.write(dir.path(), "bad-merge.gguf");
    let e = tok_err(&p);
    assert!(e.contains("merges") && e.contains("zz qq"), "{e}");
    check_line(&e, &p);
}

// ---- the real SmolLM2 file ---------------------------------------------------------

const SMOL: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

#[test]
fn smollm2_header_and_config() {
    let Some(path) = asset_or_skip(SMOL, "smollm2_header_and_config") else { return };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.tensor_names().count(), 272);
    let emb = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!((emb.ty, emb.dims.clone()), (GgmlType::Q8_0, vec![576, 49152]));
    assert_eq!(f.tensor_info("blk.0.attn_q.weight").unwrap().ty, GgmlType::Q4_1);
    assert_eq!(f.tensor_info("blk.29.ffn_down.weight").unwrap().dims, vec![1536, 576]);
    assert_eq!(f.tensor_info("output_norm.weight").unwrap().ty, GgmlType::F32);
    assert!(f.tensor_info("output.weight").is_none());
    let mut types: Vec<&str> = f.tensors().iter().map(|t| t.ty.name()).collect();
    types.sort_unstable();
    types.dedup();
    assert_eq!(types, vec!["F32", "Q4_1", "Q8_0"]);

    let cfg = gguf::model_config(&f).unwrap();
    assert_eq!(cfg.arch, Arch::Llama);
    assert_eq!((cfg.num_layers, cfg.hidden_size, cfg.intermediate_size), (30, 576, 1536));
    assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (9, 3, 64));
    assert_eq!(cfg.vocab_size, 49152);
    assert_eq!(cfg.rope_theta, 100000.0);
    assert_eq!(cfg.rope_scaling, RopeScaling::None);
    assert_eq!(cfg.rope_style, RopeStyle::Interleaved);
    assert!((cfg.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(cfg.max_position_embeddings, 8192);
    assert!(cfg.tie_word_embeddings);
    assert!(!cfg.qk_norm);
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_ids, vec![2]);
    assert!(cfg.moe.is_none());
}

#[test]
fn smollm2_weights() {
    let Some(path) = asset_or_skip(SMOL, "smollm2_weights") else { return };
    let f = GgufFile::open(&path).unwrap();
    let cfg = gguf::model_config(&f).unwrap();
    let src = GgufSource::new(&f);
    let ws = load_all(&src, &cfg);
    assert_eq!(ws.len(), 1 + 30 * 7);
    for (m, w) in &ws {
        let want = if m == "model.embed_tokens" { "Q8_0" } else { "Q4_1" };
        assert_eq!(w.format(), want, "{m}");
        let Weight::Gguf { data, .. } = w else { unreachable!() };
        assert!(matches!(data.storage(), fusebox_core::Storage::Mapped { .. }), "{m} was copied");
    }
    // The embedding of `<|im_start|>` is a real vector.
    let mut row = vec![0f32; 576];
    ws[0].1.dequant_row(0, 1, &mut row).unwrap();
    let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(norm > 0.1 && norm < 1000.0, "{norm}");
}

#[test]
fn smollm2_tokenizer_and_template() {
    let Some(path) = asset_or_skip(SMOL, "smollm2_tokenizer_and_template") else { return };
    let f = GgufFile::open(&path).unwrap();
    let tok = gguf::tokenizer(&f).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    let text = "What is the capital of France?";
    let ids = tok.encode(text, true).unwrap();
    let want: Vec<u32> = ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]
        .iter()
        .map(|t| tok.token_to_id(t).unwrap_or_else(|| panic!("{t} not in vocab")))
        .collect();
    assert_eq!(ids, want);
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    // SmolLM splits digits; special tokens are matched whole and skipped on decode.
    let ids = tok.encode("<|im_start|>user\nIn 2024?<|im_end|>", false).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
    for d in ["2", "0", "4"] {
        assert!(ids.contains(&tok.token_to_id(d).unwrap()), "{ids:?}");
    }
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nIn 2024?");
    let tpl = gguf::chat_template(&f).unwrap();
    assert!(tpl.contains("<|im_start|>") && tpl.contains("messages"), "{tpl}");
}

// ---- fixtures produced from the tiny HF models ------------------------------------

fn fixture_or_skip(rel: &str, test: &str) -> Option<PathBuf> {
    let p = fixture(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP {test}: fixture {} not present", p.display());
        None
    }
}

/// Check a GGUF fixture's config against its HF config.json and load every weight.
fn check_tiny(gguf_rel: &str, hf_dir: &str, test: &str) {
    let Some(path) = fixture_or_skip(gguf_rel, test) else { return };
    let Some(hf) = fixture_or_skip(&format!("{hf_dir}/config.json"), test) else { return };
    let f = GgufFile::open(&path).unwrap();
    let got = gguf::model_config(&f).unwrap();
    let want = ModelConfig::from_file(&hf).unwrap();
    assert_eq!(got.arch, want.arch);
    assert_eq!(got.hidden_size, want.hidden_size);
    assert_eq!(got.num_layers, want.num_layers);
    assert_eq!(got.num_heads, want.num_heads);
    assert_eq!(got.num_kv_heads, want.num_kv_heads);
    assert_eq!(got.head_dim, want.head_dim);
    assert_eq!(got.vocab_size, want.vocab_size);
    if want.moe.is_none() {
        assert_eq!(got.intermediate_size, want.intermediate_size);
    }
    assert!((got.rms_norm_eps - want.rms_norm_eps).abs() <= 1e-6 * want.rms_norm_eps.max(1e-6));
    assert!((got.rope_theta - want.rope_theta).abs() <= 1e-6 * want.rope_theta);
    let (gf, wf) = (
        fusebox_core::rope::inv_freq(got.head_dim, got.rope_theta, got.rope_scaling),
        fusebox_core::rope::inv_freq(want.head_dim, want.rope_theta, want.rope_scaling),
    );
    for (g, w) in gf.iter().zip(&wf) {
        assert!((g - w).abs() <= 1e-5 * w.abs(), "rope: {:?} vs {:?}", got.rope_scaling, want.rope_scaling);
    }
    assert_eq!(got.tie_word_embeddings, want.tie_word_embeddings);
    assert_eq!(got.qk_norm, want.qk_norm);
    assert_eq!(got.max_position_embeddings, want.max_position_embeddings);
    assert_eq!(got.rope_style, if got.arch == Arch::Llama { RopeStyle::Interleaved } else { RopeStyle::Half });
    match (&got.moe, &want.moe) {
        (Some(g), Some(w)) => {
            assert_eq!((g.num_experts, g.top_k, g.intermediate_size), (w.num_experts, w.top_k, w.intermediate_size));
            assert_eq!(g.mlp_only_layers, w.mlp_only_layers);
            assert_eq!(g.decoder_sparse_step, w.decoder_sparse_step);
        }
        (None, None) => {}
        (g, w) => panic!("moe: {g:?} vs {w:?}"),
    }
    let src = GgufSource::new(&f);
    load_all(&src, &got);

    // The tokenizer from the metadata agrees with the HF tokenizer.json.
    let Some(hf_tok) = fixture_or_skip(&format!("{hf_dir}/tokenizer.json"), test) else { return };
    let hf_tok = fusebox_models::Tokenizer::from_file(&hf_tok).unwrap();
    let tok = gguf::tokenizer(&f).unwrap();
    for text in [
        "Hello world",
        "The capital of France is Paris.",
        "<|im_start|>user\nHi 123<think>ok</think><|im_end|>\n",
        "It's 2024!  two  spaces\n\n\tnewlines and tabs",
        "h\u{e9}llo w\u{f6}rld \u{4f60}\u{597d} e\u{301} \u{1f600}",
        "",
    ] {
        for special in [false, true] {
            let (g, h) = (tok.encode(text, special).unwrap(), hf_tok.encode(text, special).unwrap());
            assert_eq!(g, h, "{test}: {text:?}");
        }
        let ids = hf_tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), hf_tok.decode(&ids, false).unwrap(), "{test}: {text:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), hf_tok.decode(&ids, true).unwrap(), "{test}: {text:?}");
    }
}

#[test]
fn fixture_tiny_qwen3() {
    check_tiny("gguf/tiny-qwen3.gguf", "tiny-qwen3", "fixture_tiny_qwen3");
}

#[test]
fn fixture_tiny_llama() {
    check_tiny("gguf/tiny-llama.gguf", "tiny-llama", "fixture_tiny_llama");
}

#[test]
fn fixture_tiny_qwen3_moe() {
    check_tiny("gguf/tiny-qwen3-moe.gguf", "tiny-qwen3-moe", "fixture_tiny_qwen3_moe");
}

/// One tensor per ggml type, checked against the reference dequantization in
/// `types_expected.safetensors` (same tensor names, F32).
#[test]
fn fixture_types() {
    let Some(path) = fixture_or_skip("gguf/types.gguf", "fixture_types") else { return };
    let Some(exp) = fixture_or_skip("gguf/types_expected.safetensors", "fixture_types") else { return };
    let f = GgufFile::open(&path).unwrap();
    let ck = fusebox_models::safetensors::Checkpoint::open_files(&[exp]).unwrap();
    let mut checked = 0;
    for t in f.tensors() {
        if !ck.contains(&t.name) {
            eprintln!("fixture_types: no expected values for `{}`", t.name);
            continue;
        }
        let want = ck.get(&t.name).unwrap().to_f32_vec().unwrap();
        let (data, ty, dims) = f.tensor_raw(&t.name).unwrap();
        let cols = dims[0];
        let rows = dims[1..].iter().product::<usize>();
        let w = match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let mut d = f.float_tensor(&t.name).unwrap();
                d.reshape(&[rows, cols]).unwrap();
                Weight::Dense(d)
            }
            _ => Weight::gguf(data, ty, 1, rows, cols).unwrap(),
        };
        assert_eq!(want.len(), rows * cols, "{}", t.name);
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            w.dequant_row(0, r, &mut row).unwrap();
            for (c, (g, e)) in row.iter().zip(&want[r * cols..(r + 1) * cols]).enumerate() {
                assert!((g - e).abs() <= 1e-6 + 1e-6 * e.abs(), "{} ({}) [{r}, {c}]: {g} vs {e}", t.name, ty.name());
            }
        }
        checked += 1;
    }
    assert!(checked > 0, "no tensor of types.gguf has expected values");
}
