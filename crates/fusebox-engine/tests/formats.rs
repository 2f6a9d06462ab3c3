//! Quantized and MoE checkpoints against their references: MLX affine models
//! vs mlx-lm, Qwen3-MoE vs transformers, GGUF files vs the transformers
//! logits of the models they were converted from, GGUF block dequantization
//! vs gguf-py, and the real SmolLM2 GGUF vs transformers.

mod common;

use std::path::Path;

use fusebox_core::fixtures::{asset_or_skip, fixture};
use fusebox_core::{cpu::CpuBackend, GgmlType, Weight};
use fusebox_engine::generate::full_logits;
use fusebox_engine::{GenerateOptions, SamplingParams};
use fusebox_models::safetensors::Checkpoint;
use fusebox_models::Model;
use serde_json::Value;

fn be() -> CpuBackend {
    CpuBackend::new(0).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    num / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
}

/// Compare a model's logits at every position of every case, and its greedy
/// continuation, with `expected.json` / `expected_logits.safetensors` in `exp_dir`.
fn check_model(model_path: &Path, exp_dir: &Path, tol: f32) -> f32 {
    let be = be();
    let model = Model::load(model_path, &be).unwrap_or_else(|e| panic!("{}: {e:#}", model_path.display()));
    let vocab = model.config().vocab_size;
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(exp_dir.join("expected.json")).unwrap()).unwrap();
    let ck = Checkpoint::open_files(&[exp_dir.join("expected_logits.safetensors")]).unwrap();
    let mut worst = 0f32;
    for case in exp["cases"].as_array().unwrap() {
        let want = ck.get(case["logits_tensor"].as_str().unwrap()).unwrap().to_f32_vec().unwrap();
        let got = full_logits(&model.decoder, &be, &ids(&case["input_ids"])).unwrap();
        for (pos, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let e = rel_err(g, w);
            worst = worst.max(e);
            assert!(
                e < tol,
                "{}: {} position {pos}: relative error {e:e} (limit {tol:e})",
                model_path.display(),
                case["name"]
            );
        }
    }
    let want = ids(&exp["greedy"]["new_tokens"]);
    let opts = GenerateOptions { max_new_tokens: want.len(), stop_ids: vec![], sampling: SamplingParams::greedy() };
    let out = common::generate(&model.decoder, &be, 128, &ids(&exp["greedy"]["prompt_ids"]), &opts);
    assert_eq!(out.tokens, want, "{}: greedy continuation", model_path.display());
    eprintln!("{}: worst relative error {worst:.2e}", model_path.display());
    worst
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_model(&fixture("tiny-qwen3-moe"), &fixture("tiny-qwen3-moe"), 1e-4);
}

#[test]
fn mlx_quantized_models_match_mlx_lm() {
    for name in ["tiny-qwen3-4bit-g64", "tiny-qwen3-8bit-g32", "tiny-qwen3-mixed", "tiny-qwen3-moe-4bit-g64"] {
        let dir = fixture(&format!("mlx/{name}"));
        check_model(&dir, &dir, 1e-3);
    }
}

#[test]
fn gguf_models_match_transformers() {
    for (file, src) in [
        ("tiny-qwen3.gguf", "tiny-qwen3"),
        ("tiny-llama.gguf", "tiny-llama"),
        ("tiny-qwen3-moe.gguf", "tiny-qwen3-moe"),
    ] {
        check_model(&fixture(&format!("gguf/{file}")), &fixture(src), 1e-4);
    }
}

#[test]
fn gguf_block_types_dequantize_like_gguf_py() {
    let file = fusebox_models::gguf::GgufFile::open(fixture("gguf/types.gguf")).unwrap();
    let exp = Checkpoint::open_files(&[fixture("gguf/types_expected.safetensors")]).unwrap();
    let mut seen = 0;
    for name in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"] {
        let (data, ty, dims) = file.tensor_raw(name).unwrap();
        let (cols, rows) = (dims[0], dims[1]);
        let want = exp.get(name).unwrap().to_f32_vec().unwrap();
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            match ty {
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                    let rb = ty.row_bytes(cols);
                    fusebox_core::quant::ggml::dequant_row(
                        ty,
                        &data.host_bytes().unwrap()[r * rb..(r + 1) * rb],
                        &mut row,
                    )
                }
                _ => Weight::gguf(data.clone(), ty, 1, rows, cols).unwrap().dequant_row(0, r, &mut row).unwrap(),
            }
            assert_eq!(&row[..], &want[r * cols..(r + 1) * cols], "{name} row {r}");
        }
        seen += 1;
    }
    assert_eq!(seen, 9);
}

#[test]
fn smollm2_matches_transformers() {
    let Some(gguf) =
        asset_or_skip("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2_matches_transformers")
    else {
        return;
    };
    let dir = fixture("smollm2");
    if !dir.join("expected.json").exists() {
        eprintln!("SKIP smollm2_matches_transformers: {} not present", dir.display());
        return;
    }
    let be = be();
    let model = Model::load(&gguf, &be).unwrap();
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    // the chat template from the file renders the prompt exactly as transformers does
    let t = model.chat_template.as_ref().expect("SmolLM2 GGUF carries a chat template");
    let msgs: Vec<fusebox_models::Message> = serde_json::from_value(exp["messages"].clone()).unwrap();
    let prompt = t.render(&msgs, true, None).unwrap();
    assert_eq!(prompt, exp["prompt"].as_str().unwrap());
    let prompt_ids = model.tokenizer.encode(&prompt, false).unwrap();
    assert_eq!(prompt_ids, ids(&exp["prompt_ids"]));
    for c in exp["tokenize_cases"].as_array().unwrap() {
        assert_eq!(
            model.tokenizer.encode(c["text"].as_str().unwrap(), false).unwrap(),
            ids(&c["ids"]),
            "{}",
            c["text"]
        );
    }
    // logits of the last prompt positions: Q4_1/Q8_0 dequantized to f32 on both sides
    // (int_dot off), so the difference is f32 summation order only; with int_dot on
    // (int16 inputs, the default) within 1e-3 (its parity gate: 5e-3)
    let vocab = model.config().vocab_size;
    let ck = Checkpoint::open_files(&[dir.join("expected_logits.safetensors")]).unwrap();
    let want = ck.get("prompt_last").unwrap().to_f32_vec().unwrap();
    let last = want.len() / vocab;
    let n = prompt_ids.len();
    for (int_dot, tol) in [(false, 1e-4), (true, 1e-3)] {
        be.policy().override_site(fusebox_core::fusion::Site::IntDot, Some(int_dot));
        let got = full_logits(&model.decoder, &be, &prompt_ids).unwrap();
        for i in 0..last {
            let pos = n - last + i;
            let e = rel_err(&got[pos * vocab..(pos + 1) * vocab], &want[i * vocab..(i + 1) * vocab]);
            eprintln!("SmolLM2 position {pos}, int_dot {int_dot}: relative error {e:.2e}");
            assert!(e < tol, "SmolLM2 position {pos}, int_dot {int_dot}: relative error {e:e}");
        }
    }
    be.policy().override_site(fusebox_core::fusion::Site::IntDot, None);
    // greedy continuation of 32 tokens, token for token
    let want = ids(&exp["greedy"]["new_tokens"]);
    let opts = GenerateOptions { max_new_tokens: want.len(), stop_ids: vec![], sampling: SamplingParams::greedy() };
    let out = common::generate(&model.decoder, &be, 256, &prompt_ids, &opts);
    assert_eq!(out.tokens, want);
    assert!(model.tokenizer.decode(&out.tokens, true).unwrap().contains("Paris"));
}

#[test]
fn mlx_affine_dequantizes_like_mx_dequantize() {
    use fusebox_core::{Backend, DType, Tensor};
    let ck = Checkpoint::open_files(&[fixture("mlx-quant/cases.safetensors")]).unwrap();
    let be = be();
    // the f32 dot products, exact to 1e-5 (int_dot's own tests: fusebox-core's cpu_int_dot)
    be.policy().override_site(fusebox_core::fusion::Site::IntDot, Some(false));
    let mut n = 0;
    for bits in [2, 3, 4, 5, 6, 8] {
        for gs in [32, 64, 128] {
            let k = format!("b{bits}_g{gs}");
            let w = Weight::affine(
                ck.get(&format!("{k}.q")).unwrap(),
                ck.get(&format!("{k}.scales")).unwrap(),
                ck.get(&format!("{k}.biases")).unwrap(),
                bits,
                gs,
            )
            .unwrap();
            let want = ck.get(&format!("{k}.deq")).unwrap().to_f32_vec().unwrap();
            let (_, rows, cols) = w.dims();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequant_row(0, r, &mut row).unwrap();
                assert_eq!(&row[..], &want[r * cols..(r + 1) * cols], "{k} row {r}");
            }
            // the CPU GEMV on the packed data agrees with a GEMV on mx.dequantize's output
            let x: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
            let mut out = Tensor::zeros(&[1, rows], DType::F32);
            be.matmul(&Tensor::from_f32(&[1, cols], &x).unwrap(), &w, &mut out).unwrap();
            let reff: Vec<f32> = (0..rows)
                .map(|r| {
                    want[r * cols..(r + 1) * cols].iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                        as f32
                })
                .collect();
            assert!(rel_err(out.as_f32().unwrap(), &reff) < 1e-5, "{k} GEMV");
            n += 1;
        }
    }
    assert_eq!(n, 18);
}

#[test]
fn quantize_round_trip_matches_mlx_lm_quantization() {
    use fusebox_models::mlx_quant::{quantize_dir, QuantizeOptions};
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours");
    let opts = QuantizeOptions { bits: 4, group_size: 32, router_bits: 8, force: false, ..Default::default() };
    quantize_dir(&fixture("tiny-qwen3"), &ours, &opts, &mut |_| {}).unwrap();
    // mlx-lm's own conversion of the same model, with the tokenizer files beside it
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("mlx-lm-q4g32").join(f), theirs.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-qwen3").join(f), theirs.join(f)).unwrap();
    }
    let be = be();
    let a = Model::load(&ours, &be).unwrap();
    let b = Model::load(&theirs, &be).unwrap();
    let dense = Model::load(&fixture("tiny-qwen3"), &be).unwrap();
    let input = [429, 1, 200, 300, 427, 13, 430, 276, 5, 99];
    let la = full_logits(&a.decoder, &be, &input).unwrap();
    let lb = full_logits(&b.decoder, &be, &input).unwrap();
    assert_eq!(la, lb, "fusebox's quantization and mlx-lm's give different logits");
    // and an 8-bit quantization stays close to the dense model (random weights
    // of std 0.25 lose too much at 4 bits for a meaningful closeness bound)
    let eight = tmp.path().join("eight");
    quantize_dir(&fixture("tiny-qwen3"), &eight, &QuantizeOptions { bits: 8, ..opts }, &mut |_| {}).unwrap();
    let c = Model::load(&eight, &be).unwrap();
    let lc = full_logits(&c.decoder, &be, &input).unwrap();
    let ld = full_logits(&dense.decoder, &be, &input).unwrap();
    let e = rel_err(&lc, &ld);
    eprintln!("8-bit g32 vs f32: relative error {e:.4}");
    assert!(e < 0.05, "8-bit g32 vs f32: relative error {e}");
}
