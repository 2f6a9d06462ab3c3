//! `fusebox quantize`: bit-identical to mlx-lm's own convert, exactly
//! `mx.quantize` for every bits x group size, and atomic (an existing output is
//! refused or replaced only on success; a failure leaves nothing behind).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fusebox_core::fixtures::fixture;
use fusebox_models::mlx_quant::{dequantize_affine, quantize_affine, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

fn fusebox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusebox")).args(args).env("RUST_BACKTRACE", "1").output().expect("run fusebox")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn quantize(from: &Path, to: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["quantize", "--from", from.to_str().unwrap(), "--to", to.to_str().unwrap()];
    args.extend_from_slice(extra);
    fusebox(&args)
}

/// Exit status 2, one `error:` line containing every needle, no panic.
fn assert_clean_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit status; stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
}

/// Names in `dir` (sorted).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A copy of a fixture model directory to break.
fn copy_model(name: &str, parent: &Path) -> PathBuf {
    let dst = parent.join(name);
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(path: &Path) -> (Tensors, Option<std::collections::HashMap<String, String>>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Tensors =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    (v, meta.metadata().clone())
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn matches_mlx_lm_convert_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q4g32");
    let o = quantize(&fixture("tiny-qwen3"), &out, &["--bits", "4", "--group-size", "32"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("bits per weight") && err.contains(" -> "), "{err}");

    let reference = fixture("mlx-lm-q4g32");
    let (want, want_meta) = read_tensors(&reference.join("model.safetensors"));
    let (got, got_meta) = read_tensors(&out.join("model.safetensors"));
    assert_eq!(got_meta, want_meta, "safetensors metadata");
    assert_eq!(got_meta.unwrap().get("format").map(String::as_str), Some("mlx"));
    let names = |t: &Tensors| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want), "tensor names");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((g.1, &g.2), (w.1, &w.2), "{}: dtype and shape", g.0);
        assert!(g.3 == w.3, "{}: bytes differ from mlx-lm", g.0);
    }
    assert!(got.iter().any(|t| t.0.ends_with(".scales") && t.1 == Dtype::F32));

    let (cg, cw) = (json(&out.join("config.json")), json(&reference.join("config.json")));
    for key in ["quantization", "quantization_config"] {
        assert_eq!(cg[key], cw[key], "config.json `{key}`");
    }
    assert_eq!(cg["quantization"], serde_json::json!({"group_size": 32, "bits": 4, "mode": "affine"}));
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(entries(tmp.path()), vec!["q4g32"], "no temporary directory left behind");
}

#[test]
fn quantize_affine_matches_mx_quantize_cases() {
    let path = fixture("mlx-quant/cases.safetensors");
    if !path.exists() {
        eprintln!("SKIP quantize_affine_matches_mx_quantize_cases: {} not present", path.display());
        return;
    }
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let mut checked = 0;
    for bits in SUPPORTED_BITS {
        for gs in SUPPORTED_GROUP_SIZES {
            let k = format!("b{bits}_g{gs}");
            let (shape, w) = f32s(&format!("{k}.w"));
            let cols = *shape.last().unwrap();
            let rows = w.len() / cols;
            let (q, s, b) = quantize_affine(&w, rows, cols, bits, gs);
            let tq = st.tensor(&format!("{k}.q")).unwrap();
            assert_eq!(tq.dtype(), Dtype::U32, "{k}.q");
            let want_q: Vec<u32> =
                tq.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
            assert!(q == want_q, "{k}: packed weights differ from mx.quantize");
            let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits_of(&s), bits_of(&f32s(&format!("{k}.scales")).1), "{k}: scales");
            assert_eq!(bits_of(&b), bits_of(&f32s(&format!("{k}.biases")).1), "{k}: biases");
            let deq = dequantize_affine(&q, &s, &b, cols, bits, gs).unwrap();
            let want = f32s(&format!("{k}.deq")).1;
            for (i, (x, y)) in deq.iter().zip(&want).enumerate() {
                assert_eq!(x.to_bits(), y.to_bits(), "{k}.deq[{i}]: {x} vs mx.dequantize {y}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 18);

    // bf16 sources: scales and biases are the f32 ones rounded to bf16
    let bf16 = |name: &str| -> (Vec<usize>, Vec<u16>) {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
        assert_eq!(t.dtype(), Dtype::BF16, "{name}");
        (t.shape().to_vec(), t.data().chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| fusebox_core::dtype::f32_to_bf16(x)).collect::<Vec<_>>();
    let round = |x: f32| fusebox_core::dtype::bf16_to_f32(fusebox_core::dtype::f32_to_bf16(x));
    let mut names: Vec<String> =
        st.names().into_iter().filter(|n| n.starts_with("bf16_") && n.ends_with(".w")).map(|n| n.to_string()).collect();
    names.sort();
    for name in &names {
        let k = name.strip_suffix(".w").unwrap();
        let (bits, gs): (u32, usize) = {
            let rest = k.strip_prefix("bf16_b").unwrap();
            let (b, g) = rest.split_once("_g").unwrap();
            (b.parse().unwrap(), g.parse().unwrap())
        };
        let (shape, w) = bf16(name);
        let w: Vec<f32> = w.iter().map(|&x| fusebox_core::dtype::bf16_to_f32(x)).collect();
        let cols = *shape.last().unwrap();
        let (q, s, b) = quantize_affine(&w, w.len() / cols, cols, bits, gs);
        let tq = st.tensor(&format!("{k}.q")).unwrap();
        let want_q: Vec<u32> = tq.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        assert!(q == want_q, "{k}: packed weights differ from mx.quantize");
        assert_eq!(to_bf16(&s), bf16(&format!("{k}.scales")).1, "{k}: scales");
        assert_eq!(to_bf16(&b), bf16(&format!("{k}.biases")).1, "{k}: biases");
        // mlx dequantizes in bf16: round(round(scale * q) + bias)
        let (sr, br): (Vec<f32>, Vec<f32>) =
            (s.iter().map(|&x| round(x)).collect(), b.iter().map(|&x| round(x)).collect());
        let ones = vec![1.0f32; sr.len()];
        let zeros = vec![0.0f32; sr.len()];
        let qv = dequantize_affine(&q, &ones, &zeros, cols, bits, gs).unwrap();
        let want = f32s(&format!("{k}.deq")).1;
        for (i, (&qi, &y)) in qv.iter().zip(&want).enumerate() {
            let g = i / gs;
            let x = round(round(sr[g] * qi) + br[g]);
            assert_eq!(x.to_bits(), y.to_bits(), "{k}.deq[{i}]: {x} vs mx.dequantize {y}");
        }
        checked += 1;
    }
    eprintln!("checked {checked} cases ({} bf16) against {}", names.len(), path.display());
}

#[test]
fn refuses_non_empty_output_without_force_and_replaces_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = quantize(&fixture("tiny-qwen3"), &out, &["--group-size", "32"]);
    assert_clean_error(&o, &[out.to_str().unwrap(), "--force"]);
    assert_eq!(entries(&out), vec!["keep.txt"], "the existing directory is untouched");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");

    let o = quantize(&fixture("tiny-qwen3"), &out, &["--group-size", "32", "--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!out.join("keep.txt").exists(), "--force replaces the directory");
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
    assert_eq!(entries(tmp.path()), vec!["out"], "no temporary or old directory left behind");

    // an existing empty directory is fine without --force
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = quantize(&fixture("tiny-qwen3"), &empty, &["--group-size", "32"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(empty.join("model.safetensors").is_file());
}

#[test]
fn failures_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let src_parent = tmp.path().join("src");
    let outs = tmp.path().join("outs");
    std::fs::create_dir_all(&src_parent).unwrap();
    std::fs::create_dir_all(&outs).unwrap();
    let out = outs.join("q");

    // unsupported flags
    let o = quantize(&fixture("tiny-qwen3"), &out, &["--bits", "7"]);
    assert_clean_error(&o, &["--bits 7", "2, 3, 4, 5, 6 or 8"]);
    let o = quantize(&fixture("tiny-qwen3"), &out, &["--group-size", "48"]);
    assert_clean_error(&o, &["--group-size 48", "32, 64 or 128"]);
    assert!(entries(&outs).is_empty());

    // a truncated safetensors file
    let trunc = copy_model("tiny-qwen3", &src_parent);
    let st = trunc.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&st).unwrap().set_len(len - 1000).unwrap();
    let o = quantize(&trunc, &out, &["--group-size", "32"]);
    assert_clean_error(&o, &["model.safetensors"]);
    assert!(entries(&outs).is_empty(), "left behind: {:?}", entries(&outs));

    // a failure half way through writing (a NaN in the last layer's weights)
    std::fs::remove_dir_all(&trunc).unwrap();
    let bad = copy_model("tiny-qwen3", &src_parent);
    let path = bad.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (n, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.info("model.layers.1.mlp.up_proj.weight").unwrap();
    let at = 8 + n + info.data_offsets.0 + 4 * 70;
    let mut bytes = bytes.clone();
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let o = quantize(&bad, &out, &["--group-size", "32"]);
    assert_clean_error(&o, &["model.layers.1.mlp.up_proj.weight", "non-finite"]);
    assert!(entries(&outs).is_empty(), "left behind: {:?}", entries(&outs));

    // an unsupported model type names the file and the field
    let cfg = bad.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"qwen3\"", "\"gpt2\"");
    std::fs::write(&cfg, text).unwrap();
    let o = quantize(&bad, &out, &[]);
    assert_clean_error(&o, &["config.json", "gpt2"]);
    assert!(entries(&outs).is_empty());
}

#[test]
fn help_mentions_every_flag() {
    let o = fusebox(&["quantize", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    for flag in ["--from", "--to", "--bits", "--group-size", "--router-bits", "--force", "mlx"] {
        assert!(text.contains(flag), "--help does not mention {flag}:\n{text}");
    }
    let top = fusebox(&["--help"]);
    assert!(String::from_utf8_lossy(&top.stdout).contains("quantize"));
}
