//! The parity gate of the fused decode sites, on whole models: decode steps
//! with a site fused against the same steps on the graph path, on the
//! fixtures (dense, MoE, MLX 4-bit, GGUF), and 256 greedy tokens of SmolLM2
//! (real weights) with every fused site on against every site off.
//!
//! On the CPU the fused residual-add + RMSNorm is the same arithmetic, and on
//! CUDA the fused kernels run the graph path's products and formulas, so both
//! must be bitwise equal (the gate itself is relative RMS < 5e-3, identical
//! greedy tokens, and bitwise-deterministic fused runs). CUDA tests skip
//! without a GPU (`FUSEBOX_REQUIRE_CUDA=1` makes that a failure).

use fusebox_core::cpu::CpuBackend;
use fusebox_core::fixtures::{asset_or_skip, fixture};
use fusebox_core::fusion::{Site, SITES};
use fusebox_core::Backend;
use fusebox_engine::{BatchEngine, GenerateOptions, SamplingParams, Session};
use fusebox_models::Model;

const FIXTURES: [&str; 6] = [
    "tiny-qwen3",
    "tiny-llama",
    "tiny-qwen3-moe",
    "mlx/tiny-qwen3-4bit-g64",
    "mlx/tiny-qwen3-moe-4bit-g64",
    "gguf/tiny-llama.gguf",
];

fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Switch exactly the sites in `on` to their fused path.
fn set_sites(be: &dyn Backend, on: &[Site]) {
    for s in SITES {
        be.set_fused(s, on.contains(&s));
    }
}

/// Logits of 16 decode steps after a 6-token prefill, then 24 greedy tokens.
fn decode_run(be: &dyn Backend, name: &str) -> (Vec<f32>, Vec<u32>) {
    let m = Model::load(&fixture(name), be).unwrap();
    let ids: Vec<u32> = (0..22).map(|i| (i * 37 + 5) % m.config().vocab_size as u32).collect();
    let mut s = Session::new(&m.decoder, be, 64).unwrap();
    s.prefill(&ids[..6]).unwrap();
    let mut logits = vec![];
    for &t in &ids[6..] {
        logits.extend_from_slice(s.step(t).unwrap());
    }
    let opts = GenerateOptions { max_new_tokens: 24, stop_ids: vec![], sampling: SamplingParams::greedy() };
    let mut engine = BatchEngine::lone(&m.decoder, be, 64).unwrap();
    let toks = engine.generate(&ids[..6], &opts, &mut None, |_| Ok(true)).unwrap().0.tokens;
    (logits, toks)
}

#[test]
fn add_rms_norm_fused_matches_the_graph_path_on_the_cpu() {
    let graph = CpuBackend::new(0).unwrap();
    set_sites(&graph, &[]);
    let fused = CpuBackend::new(0).unwrap();
    set_sites(&fused, &[Site::AddRmsNorm]);
    for name in FIXTURES {
        let (lg, tg) = decode_run(&graph, name);
        let (lf, tf) = decode_run(&fused, name);
        assert_eq!(lf, lg, "{name}: fused logits differ from the graph path");
        assert_eq!(tf, tg, "{name}: fused greedy tokens differ");
    }
}

/// The CPU's `int_dot` (int16 inputs to the packed matmuls) against the f32
/// path: not bitwise (the inputs are rounded to int16), so the gate proper:
/// relative RMS < 5e-3, the same greedy tokens, bitwise-deterministic runs.
#[test]
fn int_dot_passes_the_parity_gate_on_the_cpu() {
    let graph = CpuBackend::new(0).unwrap();
    set_sites(&graph, &[]);
    let fused = CpuBackend::new(0).unwrap();
    set_sites(&fused, &[Site::IntDot]);
    for name in FIXTURES {
        let (lg, tg) = decode_run(&graph, name);
        let (lf, tf) = decode_run(&fused, name);
        let (lf2, tf2) = decode_run(&fused, name);
        let e = rel_rms(&lf, &lg);
        eprintln!("{name}: int_dot vs f32: relative RMS {e:.2e}");
        assert!(e < 5e-3, "{name}: relative RMS {e:.3e}");
        assert_eq!(tf, tg, "{name}: greedy tokens differ");
        assert!(lf == lf2 && tf == tf2, "{name}: int_dot runs are not bitwise deterministic");
    }
}

/// Every site alone, and all of them together, against the graph path.
#[test]
fn every_fused_site_passes_the_parity_gate_on_cuda() {
    let Some(graph) = fusebox_core::cuda::backend_for_tests() else { return };
    set_sites(&graph, &[]);
    let fused = fusebox_core::cuda::backend_for_tests().unwrap();
    let mut configs: Vec<(String, Vec<Site>)> = SITES.iter().map(|s| (s.name().to_string(), vec![*s])).collect();
    configs.push(("all".into(), SITES.to_vec()));
    for name in FIXTURES {
        let (lg, tg) = decode_run(&graph, name);
        for (what, sites) in &configs {
            set_sites(&fused, sites);
            let (lf, tf) = decode_run(&fused, name);
            let (lf2, tf2) = decode_run(&fused, name);
            let e = rel_rms(&lf, &lg);
            let bitwise = lf.iter().zip(&lg).all(|(a, b)| a.to_bits() == b.to_bits());
            eprintln!(
                "{name}: {what} fused vs graph: relative RMS {e:.2e}{}",
                if bitwise { " (bitwise equal)" } else { "" }
            );
            assert!(e < 5e-3, "{name} {what}: relative RMS {e:.3e}");
            assert_eq!(tf, tg, "{name} {what}: greedy tokens differ");
            assert!(
                lf.iter().zip(&lf2).all(|(a, b)| a.to_bits() == b.to_bits()) && tf == tf2,
                "{name} {what}: fused runs are not bitwise deterministic"
            );
        }
    }
}

/// SmolLM2 (real Q4_1/Q8_0 weights): 256 greedy tokens with every fused site
/// on equal the graph path's.
#[test]
fn smollm2_greedy_256_tokens_fused_equal_graph() {
    let Some(path) = asset_or_skip(
        "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2_greedy_256_tokens_fused_equal_graph",
    ) else {
        return;
    };
    let Some(be) = fusebox_core::cuda::backend_for_tests() else { return };
    smollm2_greedy_fused_equal_graph(&path, &be);
}

/// The same on the CPU, where `add_rms_norm` and `int_dot` have fused paths.
/// `int_dot` is not bitwise (relative RMS about 2e-4 on the logits), so over
/// 256 tokens the two paths may part at a near-tie: they must agree up to the
/// first step whose top two logits on the graph path are closer than 5e-3 of
/// the logits' RMS (the gate's own tolerance), and at least 32 tokens.
#[test]
fn smollm2_greedy_256_tokens_fused_equal_graph_on_the_cpu() {
    let Some(path) = asset_or_skip(
        "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2_greedy_256_tokens_fused_equal_graph_on_the_cpu",
    ) else {
        return;
    };
    let be = CpuBackend::new(0).unwrap();
    let (m, ids, runs) = smollm2_greedy_runs(&path, &be);
    let i = runs[0].iter().zip(&runs[1]).take_while(|(a, b)| a == b).count();
    if i == runs[0].len() {
        return;
    }
    // the graph path's logits at the step where the runs part
    set_sites(&be, &[]);
    let mut s = Session::new(&m.decoder, &be, 512).unwrap();
    let ctx: Vec<u32> = ids.iter().chain(&runs[0][..i]).copied().collect();
    s.prefill(&ctx[..ctx.len() - 1]).unwrap();
    let l = s.step(ctx[ctx.len() - 1]).unwrap().to_vec();
    let rms = (l.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / l.len() as f64).sqrt();
    let margin = (l[runs[0][i] as usize] - l[runs[1][i] as usize]) as f64;
    eprintln!(
        "smollm2 (cpu): fused and graph part at token {i} of 256, a top-2 margin of {:.2e} of the RMS",
        margin / rms
    );
    assert!(
        i >= 32 && margin < 5e-3 * rms,
        "the runs part at {i}, where the margin is {:.2e} of the RMS",
        margin / rms
    );
}

type Runs = (Model, Vec<u32>, Vec<Vec<u32>>);

/// 256 greedy tokens of SmolLM2's chat prompt with every site on the graph
/// path, then with every site fused.
fn smollm2_greedy_runs(path: &std::path::Path, be: &dyn Backend) -> Runs {
    let m = Model::load(path, be).unwrap();
    let t = m.chat_template.as_ref().expect("SmolLM2 GGUF carries a chat template");
    let msgs: Vec<fusebox_models::Message> =
        serde_json::from_str(r#"[{"role": "user", "content": "Write a short story about a lighthouse keeper."}]"#)
            .unwrap();
    let ids = m.tokenizer.encode(&t.render(&msgs, true, None).unwrap(), false).unwrap();
    let opts = GenerateOptions { max_new_tokens: 256, stop_ids: vec![], sampling: SamplingParams::greedy() };
    let mut runs = vec![];
    for sites in [&[][..], &SITES[..]] {
        set_sites(be, sites);
        let mut engine = BatchEngine::lone(&m.decoder, be, 512).unwrap();
        runs.push(engine.generate(&ids, &opts, &mut None, |_| Ok(true)).unwrap().0.tokens);
    }
    (m, ids, runs)
}

fn smollm2_greedy_fused_equal_graph(path: &std::path::Path, be: &dyn Backend) {
    let (m, _, runs) = smollm2_greedy_runs(path, be);
    let i = runs[0].iter().zip(&runs[1]).take_while(|(a, b)| a == b).count();
    assert_eq!(runs[0].len(), 256);
    assert_eq!(i, 256, "fused and graph greedy tokens diverge at {i}");
    eprintln!("smollm2: 256 greedy tokens identical with every site fused: {:?}", {
        let s = m.tokenizer.decode(&runs[1], true).unwrap_or_default();
        s.chars().take(160).collect::<String>()
    });
}
