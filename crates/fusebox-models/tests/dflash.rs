//! DFlash drafts: config parsing (old and new layouts), loading, the fit
//! check against a target, and the errors for drafts that do not fit.

use std::path::Path;

use fusebox_core::cpu::CpuBackend;
use fusebox_core::fixtures::fixture;
use fusebox_core::Backend;
use fusebox_models::decoder::Logits;
use fusebox_models::dflash::{DFlashConfig, DFlashDraft};
use fusebox_models::safetensors::Checkpoint;
use fusebox_models::Model;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

/// A DFlash draft config for the tiny Qwen3 fixture (hidden 64, 2 layers).
fn draft_config() -> Value {
    json!({
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "intermediate_size": 96, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 512,
        "block_size": 8, "num_target_layers": 2,
        "dflash_config": {"mask_token_id": 431, "target_layer_ids": [0, 1]}
    })
}

/// Write `config` and random f32 weights of the z-lab layout to `dir`.
fn write_draft(dir: &Path, config: &Value) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let (d, ff, hd) = (64usize, 96usize, 32usize);
    let taps = config["dflash_config"]["target_layer_ids"].as_array().map_or(2, |a| a.len());
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("fc.weight".into(), vec![d, taps * d]),
        ("hidden_norm.weight".into(), vec![d]),
        ("norm.weight".into(), vec![d]),
    ];
    for (name, shape) in [
        ("self_attn.q_proj.weight", vec![4 * hd, d]),
        ("self_attn.k_proj.weight", vec![2 * hd, d]),
        ("self_attn.v_proj.weight", vec![2 * hd, d]),
        ("self_attn.o_proj.weight", vec![d, 4 * hd]),
        ("self_attn.q_norm.weight", vec![hd]),
        ("self_attn.k_norm.weight", vec![hd]),
        ("mlp.gate_proj.weight", vec![ff, d]),
        ("mlp.up_proj.weight", vec![ff, d]),
        ("mlp.down_proj.weight", vec![d, ff]),
        ("input_layernorm.weight", vec![d]),
        ("post_attention_layernorm.weight", vec![d]),
    ] {
        shapes.push((format!("layers.0.{name}"), shape));
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let len: usize = s.iter().product();
            let v: Vec<u8> = (0..len)
                .flat_map(|j| fusebox_core::dtype::random_f32(i as u64, j as u64, -0.1, 0.1).to_le_bytes())
                .collect();
            (n, s, v)
        })
        .collect();
    let views: Vec<(String, TensorView)> =
        data.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn a_draft_loads_and_fits_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    write_draft(tmp.path(), &draft_config());
    let be = CpuBackend::new(1).unwrap();
    let draft = DFlashDraft::load(tmp.path(), &be).unwrap();
    let c = &draft.cfg;
    assert_eq!((c.block_size, c.mask_token_id, c.num_target_layers), (8, 431, 2));
    assert_eq!(c.target_layer_ids, vec![0, 1]);
    assert!(!c.is_causal);
    assert_eq!(draft.layers.len(), 1);
    assert_eq!(draft.fc.dims(), (1, 64, 128));
    let per_layer = 4 * 32 * 64 * 2 + 2 * 32 * 64 * 2 + 2 * 32 + 3 * 96 * 64 + 2 * 64;
    assert_eq!(draft.parameter_count(), 64 * 128 + 2 * 64 + per_layer);
    let tiny_qwen3 = Model::config_at(&fixture("tiny-qwen3")).unwrap();
    c.check_target(&tiny_qwen3).unwrap();
    // the same target as a GGUF file
    c.check_target(&Model::config_at(&fixture("gguf/tiny-qwen3.gguf")).unwrap()).unwrap();
    // a target with another layer count
    let llama = Model::config_at(&fixture("tiny-llama")).unwrap();
    let e = c.check_target(&llama).unwrap_err().to_string();
    assert!(e.contains("made for a target of 2 layers") && e.contains("has 3"), "{e}");
    // run by itself: a clear error
    let e = Model::load(tmp.path(), &be).err().unwrap().to_string();
    assert!(e.contains("a DFlash draft") && e.contains("no embedding or lm_head"), "{e}");
}

#[test]
fn newer_drafts_keep_settings_in_dflash_config() {
    let mut v = draft_config();
    v["dflash_config"]["block_size"] = 16.into();
    v["dflash_config"]["is_causal"] = true.into();
    v["sliding_window"] = 2048.into();
    let c = DFlashConfig::from_value(&v, "config.json").unwrap();
    assert_eq!((c.block_size, c.is_causal, c.sliding_window), (16, true, Some(2048)));
}

/// A change to a draft config.
type Edit = fn(&mut Value);

#[test]
fn bad_draft_configs_are_clear_errors() {
    let cases: [(&str, Edit); 5] = [
        ("dflash_config.mask_token_id", |v| {
            v["dflash_config"].as_object_mut().unwrap().remove("mask_token_id");
        }),
        ("target layer 5 is outside the 2 target layers", |v| v["dflash_config"]["target_layer_ids"] = json!([0, 5])),
        ("num_target_layers", |v| {
            v.as_object_mut().unwrap().remove("num_target_layers");
        }),
        ("`block_size` must be at least 2", |v| v["block_size"] = 1.into()),
        ("not a DFlash draft", |v| v["architectures"] = json!(["Qwen3ForCausalLM"])),
    ];
    for (want, edit) in cases {
        let mut v = draft_config();
        edit(&mut v);
        let e = DFlashConfig::from_value(&v, "draft/config.json").unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("draft/config.json"), "want {want:?}, got: {e}");
    }
    // a tensor of the wrong shape names the tensor
    let tmp = tempfile::tempdir().unwrap();
    let mut v = draft_config();
    v["dflash_config"]["target_layer_ids"] = json!([1]);
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    write_draft(tmp.path(), &draft_config()); // fc is [64, 128], the config wants [64, 64]
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    let be = CpuBackend::new(1).unwrap();
    let e = DFlashDraft::load(tmp.path(), &be).err().unwrap().to_string();
    assert!(e.contains("fc"), "{e}");
}

/// max |a - b| / max |b| over one row.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    num / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn read(be: &CpuBackend, t: &fusebox_core::Tensor) -> Vec<f32> {
    let mut v = vec![];
    be.read_f32(t, &mut v).unwrap();
    v
}

/// tests/fixtures/tiny-dflash (tools/fixtures/make_dflash_fixture.py): the
/// target's captured layer outputs and the draft's logits for blocks at six
/// starts match the torch reference, whether the context goes into the
/// draft's cache all at once or a few rows per round (bitwise the same).
#[test]
fn draft_logits_match_the_reference_from_scratch_and_with_a_cache() {
    let be = CpuBackend::new(0).unwrap();
    let target = Model::load(&fixture("tiny-qwen3"), &be).unwrap();
    let dir = fixture("tiny-dflash");
    let draft = DFlashDraft::load(&dir, &be).unwrap();
    draft.cfg.check_target(target.config()).unwrap();
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ck = Checkpoint::open_files(&[dir.join("expected.safetensors")]).unwrap();
    let seq = ids(&exp["sequence"]);
    let (dec, vocab, bs) = (&target.decoder, target.config().vocab_size, draft.cfg.block_size);
    let width = draft.cfg.target_layer_ids.len() * target.config().hidden_size;

    // the target's taps over the whole sequence
    let ws = dec.workspace(&be, seq.len(), Logits::Last).unwrap();
    let mut ws = ws.with_taps(&be, &draft.cfg.target_layer_ids).unwrap();
    let mut kv: Vec<_> = (0..dec.layers.len()).map(|_| dec.kv_layer(&be, 64).unwrap()).collect();
    ws.set_tokens(&be, &seq, 0).unwrap();
    dec.forward(&be, &mut ws, &mut kv).unwrap();
    let taps = ws.taps().unwrap();
    let want_taps = ck.get("taps").unwrap().to_f32_vec().unwrap();
    for (p, (g, w)) in read(&be, taps).chunks(width).zip(want_taps.chunks(width)).enumerate() {
        assert!(rel_err(g, w) < 1e-4, "taps at position {p}: relative error {:e}", rel_err(g, w));
    }

    let mut bb = draft.block_bufs(&be, vocab).unwrap();
    // the incremental cache: context added in chunks of 1..=block_size rows
    let mut inc_kv = draft.kv_layers(&be, 64).unwrap();
    let mut cached = 0;
    let mut chunk = 1;
    for case in exp["cases"].as_array().unwrap() {
        let s = case["start"].as_u64().unwrap() as usize;
        let block = ids(&case["block"]);
        assert_eq!(block[0], seq[s]);
        // from scratch
        let mut cb = draft.context_bufs(&be, s).unwrap();
        be.copy_rows(taps, 0, &mut cb.taps, 0, s).unwrap();
        let mut dkv = draft.kv_layers(&be, 64).unwrap();
        draft.add_context(&be, &mut cb, 0, &mut dkv).unwrap();
        draft.draft(&be, dec, &mut bb, seq[s], s, &mut dkv).unwrap();
        let got = read(&be, &bb.logits);
        let want = ck.get(case["logits_tensor"].as_str().unwrap()).unwrap().to_f32_vec().unwrap();
        assert_eq!(got.len(), (bs - 1) * vocab);
        for (row, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let e = rel_err(g, w);
            assert!(e < 1e-4, "start {s}, block row {}: relative error {e:e}", row + 1);
        }
        let argmax: Vec<u32> = got
            .chunks(vocab)
            .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32)
            .collect();
        assert_eq!(argmax, ids(&case["drafts"]), "start {s}: greedy drafts");
        // incrementally, over the blocks drafted before
        while cached < s {
            let n = chunk.min(s - cached).min(bs);
            chunk = chunk % bs + 1;
            let mut cb = draft.context_bufs(&be, n).unwrap();
            be.copy_rows(taps, cached, &mut cb.taps, 0, n).unwrap();
            draft.add_context(&be, &mut cb, cached, &mut inc_kv).unwrap();
            cached += n;
        }
        draft.draft(&be, dec, &mut bb, seq[s], s, &mut inc_kv).unwrap();
        assert_eq!(read(&be, &bb.logits), got, "start {s}: the cached context drafts differently");
    }
}

/// The synthetic drafts of `bench --spec dflash` spread their taps as the
/// reference's `build_target_layer_ids` does (36 and 52 layers: the
/// published drafts' ids).
#[test]
fn synthetic_drafts_spread_their_taps_like_the_reference() {
    let mut target = Model::config_at(&fixture("tiny-qwen3")).unwrap();
    for (layers, want) in [(36, vec![1, 9, 17, 25, 33]), (52, vec![1, 13, 25, 37, 49]), (28, vec![1, 7, 13, 19, 25])] {
        target.num_layers = layers;
        let c = DFlashConfig::synthetic(&target, 5, 16);
        assert_eq!(c.target_layer_ids, want, "{layers} layers");
        assert_eq!((c.base.num_layers, c.block_size, c.num_target_layers), (5, 16, layers));
        c.check_target(&target).unwrap();
    }
}
