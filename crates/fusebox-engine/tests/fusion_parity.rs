//! The parity gate for fused decode sites: a model run with a site fused
//! against the same model on the graph path, on the fixtures. On the CPU the
//! fused residual-add + RMSNorm is the same arithmetic (bitwise equal); on
//! CUDA (skipped without a GPU) within relative RMS 5e-3, with identical greedy
//! tokens and bitwise-deterministic fused runs.

use fusebox_core::cpu::CpuBackend;
use fusebox_core::fixtures::fixture;
use fusebox_core::fusion::Site;
use fusebox_core::Backend;
use fusebox_engine::generate::full_logits;
use fusebox_engine::{GenerateOptions, SamplingParams, Session};
use fusebox_models::Model;

const FIXTURES: [&str; 4] = ["tiny-qwen3", "tiny-llama", "tiny-qwen3-moe", "mlx/tiny-qwen3-4bit-g64"];

fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn run(be: &dyn Backend, name: &str) -> (Vec<f32>, Vec<u32>) {
    let m = Model::load(&fixture(name), be).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % m.config().vocab_size as u32).collect();
    let logits = full_logits(&m.decoder, be, &ids).unwrap();
    let mut s = Session::new(&m.decoder, be, 64).unwrap();
    let opts = GenerateOptions { max_new_tokens: 24, stop_ids: vec![], sampling: SamplingParams::greedy() };
    let toks = s.generate(&ids, &opts, |_| Ok(true)).unwrap().tokens;
    (logits, toks)
}

#[test]
fn add_rms_norm_fused_matches_the_graph_path_on_the_cpu() {
    let graph = CpuBackend::new(0).unwrap();
    graph.set_fused(Site::AddRmsNorm, false);
    let fused = CpuBackend::new(0).unwrap();
    fused.set_fused(Site::AddRmsNorm, true);
    for name in FIXTURES {
        let (lg, tg) = run(&graph, name);
        let (lf, tf) = run(&fused, name);
        assert_eq!(lf, lg, "{name}: fused logits differ from the graph path");
        assert_eq!(tf, tg, "{name}: fused greedy tokens differ");
    }
}

#[test]
fn add_rms_norm_fused_matches_the_graph_path_on_cuda() {
    let Some(graph) = fusebox_core::cuda::backend_for_tests() else { return };
    graph.set_fused(Site::AddRmsNorm, false);
    let fused = fusebox_core::cuda::backend_for_tests().unwrap();
    fused.set_fused(Site::AddRmsNorm, true);
    for name in FIXTURES {
        let (lg, tg) = run(&graph, name);
        let (lf, tf) = run(&fused, name);
        let (lf2, tf2) = run(&fused, name);
        let e = rel_rms(&lf, &lg);
        eprintln!("{name}: add_rms_norm fused vs graph: relative RMS {e:.2e}");
        assert!(e < 5e-3, "{name}: relative RMS {e:.3e}");
        assert_eq!(tf, tg, "{name}: greedy tokens differ");
        assert!(lf.iter().zip(&lf2).all(|(a, b)| a.to_bits() == b.to_bits()) && tf == tf2, "{name}: not deterministic");
    }
}
