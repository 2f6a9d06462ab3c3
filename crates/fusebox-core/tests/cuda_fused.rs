//! The fused decode kernels (fused.cu) against the graph path on random
//! inputs: QKV + norm + RoPE + KV append (site qk_norm), the epilogue alone
//! (rope_kv_append), the MoE expert path (moe) and a dense MLP's gate/up +
//! SwiGLU (swiglu), for dense and quantized
//! weights, bf16 and f32 caches, both RoPE styles, Qwen3 (with QK-norm) and
//! Llama (without). The kernels run the graph path's products and formulas,
//! so the results must be bitwise equal; they are also replayed in a CUDA
//! graph with changing positions and experts (the completion counters must
//! come back to zero). Skips without a GPU (`FUSEBOX_REQUIRE_CUDA=1` makes
//! that a failure).

use fusebox_core::backend::{
    attn_inputs_graph, moe_experts_graph, swiglu_graph, AttnBufs, AttnIn, MoeBufs, MoeIn, SwigluBufs,
};
use fusebox_core::cuda::{backend_for_tests, backend_for_tests_with_graphs, CudaBackend};
use fusebox_core::{rope, Backend, DType, GgmlType, LayerKv, RopeStyle, Tensor, Weight};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod common;
use common::*;

/// Weight formats under test: (name, maker of a [experts, rows, cols] weight).
type Maker = fn(&mut ChaCha8Rng, usize, usize, usize) -> Weight;
const FORMATS: [(&str, Maker); 8] = [
    ("bf16", |r, e, n, k| dense(r, DType::BF16, e, n, k)),
    ("f32", |r, e, n, k| dense(r, DType::F32, e, n, k)),
    ("f16", |r, e, n, k| dense(r, DType::F16, e, n, k)),
    ("4-bit g64 bf16 scales", |r, e, n, k| affine(r, e, n, k, 4, 64, DType::BF16)),
    ("8-bit g32 f32 scales", |r, e, n, k| affine(r, e, n, k, 8, 32, DType::F32)),
    ("6-bit g64 bf16 scales", |r, e, n, k| affine(r, e, n, k, 6, 64, DType::BF16)),
    ("3-bit g128 f16 scales", |r, e, n, k| affine(r, e, n, k, 3, 128, DType::F16)),
    ("Q6_K (6-bit g16)", |r, e, n, k| ggml(r, GgmlType::Q6_K, e, n, k)),
];

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

struct Attn {
    wq: Weight,
    wk: Weight,
    wv: Weight,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    inv_freq: Tensor,
    style: RopeStyle,
}

/// Device buffers of one token's attention inputs and a cache.
struct Bufs {
    q_raw: Tensor,
    k_raw: Tensor,
    v: Tensor,
    q: Tensor,
    k: Tensor,
    cache: LayerKv,
}

impl Bufs {
    fn new(be: &CudaBackend, nh: usize, nkv: usize, hd: usize, cap: usize, kv: DType) -> Bufs {
        Bufs {
            q_raw: poisoned(be, &[1, nh, hd]),
            k_raw: poisoned(be, &[1, nkv, hd]),
            v: poisoned(be, &[1, nkv, hd]),
            q: poisoned(be, &[1, nh, hd]),
            k: poisoned(be, &[1, nkv, hd]),
            cache: LayerKv { k: be.zeros(&[cap, nkv, hd], kv).unwrap(), v: be.zeros(&[cap, nkv, hd], kv).unwrap() },
        }
    }
    fn parts(&mut self) -> (AttnBufs<'_>, &mut LayerKv) {
        (
            AttnBufs { q_raw: &mut self.q_raw, k_raw: &mut self.k_raw, v: &mut self.v, q: &mut self.q, k: &mut self.k },
            &mut self.cache,
        )
    }
    /// The query and the whole cache.
    fn result(&self, be: &CudaBackend) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (read(be, &self.q), read(be, &self.cache.k), read(be, &self.cache.v))
    }
}

/// How one token's attention inputs are computed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Graph,
    RopeKvAppend,
    Qkv,
}

fn run_attn(be: &CudaBackend, at: &Attn, h: &Tensor, pos: &Tensor, b: &mut Bufs, path: Path) {
    let a = AttnIn {
        wq: &at.wq,
        wk: &at.wk,
        wv: &at.wv,
        q_norm: at.q_norm.as_ref(),
        k_norm: at.k_norm.as_ref(),
        eps: 1e-6,
        positions: pos,
        slots: None,
        inv_freq: &at.inv_freq,
        style: at.style,
    };
    let (mut bufs, cache) = b.parts();
    match path {
        Path::Graph => attn_inputs_graph(be, h, &a, &mut bufs, cache, false).unwrap(),
        Path::RopeKvAppend => attn_inputs_graph(be, h, &a, &mut bufs, cache, true).unwrap(),
        Path::Qkv => be.qkv_rope(h, &a, &mut bufs, cache).unwrap(),
    }
}

fn attn_weights(
    be: &CudaBackend,
    r: &mut ChaCha8Rng,
    make: Maker,
    (d, nh, nkv, hd): (usize, usize, usize, usize),
    norms: bool,
    style: RopeStyle,
) -> Attn {
    let up = |w: Weight| be.upload_weight(w).unwrap();
    let norm = |r: &mut ChaCha8Rng| be.upload(Tensor::from_f32(&[hd], &randv(r, hd)).unwrap()).unwrap();
    let inv = rope::inv_freq(hd, 10000.0, fusebox_core::RopeScaling::None);
    Attn {
        wq: up(make(r, 1, nh * hd, d)),
        wk: up(make(r, 1, nkv * hd, d)),
        wv: up(make(r, 1, nkv * hd, d)),
        q_norm: norms.then(|| norm(r)),
        k_norm: norms.then(|| norm(r)),
        inv_freq: be.upload(Tensor::from_f32(&[inv.len()], &inv).unwrap()).unwrap(),
        style,
    }
}

#[test]
fn fused_attention_inputs_equal_the_graph_path() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(11);
    // Qwen3-0.6B's attention shape with QK-norm; a Llama-like one without, interleaved RoPE (768 = whole Q6_K blocks of 256)
    let shapes = [((1024, 16, 8, 128), true, RopeStyle::Half), ((768, 12, 4, 64), false, RopeStyle::Interleaved)];
    let mut cases = 0;
    for (fname, make) in FORMATS {
        for (shape, norms, style) in shapes {
            let (d, nh, nkv, hd) = shape;
            let at = attn_weights(&be, &mut r, make, shape, norms, style);
            for kv in [DType::BF16, DType::F32] {
                let h = be.upload(Tensor::from_f32(&[1, d], &randv(&mut r, d)).unwrap()).unwrap();
                let mut pos = be.zeros(&[1], DType::I32).unwrap();
                let mut runs = vec![];
                for path in [Path::Graph, Path::RopeKvAppend, Path::Qkv] {
                    let mut b = Bufs::new(&be, nh, nkv, hd, 16, kv);
                    for p in [3, 9] {
                        be.write_i32(&mut pos, &[p]).unwrap();
                        run_attn(&be, &at, &h, &pos, &mut b, path);
                    }
                    runs.push((path, b.result(&be)));
                }
                let (_, (gq, gk, gv)) = &runs[0];
                assert!(gq.iter().all(|v| v.is_finite()), "{fname}: graph query not finite");
                for (path, (q, k, v)) in &runs[1..] {
                    let what = format!("{fname} {shape:?} norms={norms} {style:?} cache {kv}: {path:?}");
                    assert!(same_bits(q, gq), "{what}: query differs (rel {:.2e})", rel_err(q, gq, &what));
                    assert!(same_bits(k, gk), "{what}: cached keys differ (rel {:.2e})", rel_err(k, gk, &what));
                    assert!(same_bits(v, gv), "{what}: cached values differ (rel {:.2e})", rel_err(v, gv, &what));
                }
                cases += 1;
            }
        }
    }
    eprintln!("fused attention inputs: {cases} cases bitwise equal to the graph path (qk_norm and rope_kv_append)");
}

/// The fused kernels captured in a CUDA graph and replayed at new positions
/// give what eager graph-path launches give.
#[test]
fn fused_attention_inputs_replay_in_a_graph() {
    let Some(be) = backend_for_tests_with_graphs(true) else { return };
    let mut r = ChaCha8Rng::seed_from_u64(12);
    let shape = (1024, 16, 8, 128);
    let at = attn_weights(&be, &mut r, FORMATS[3].1, shape, true, RopeStyle::Half);
    let h = be.upload(Tensor::from_f32(&[1, 1024], &randv(&mut r, 1024)).unwrap()).unwrap();
    let mut pos = be.zeros(&[1], DType::I32).unwrap();
    let (mut g, mut f) = (Bufs::new(&be, 16, 8, 128, 32, DType::BF16), Bufs::new(&be, 16, 8, 128, 32, DType::BF16));
    for p in 0..6 {
        be.write_i32(&mut pos, &[p]).unwrap();
        run_attn(&be, &at, &h, &pos, &mut g, Path::Graph);
        be.run_graph(77, &mut || {
            run_attn(&be, &at, &h, &pos, &mut f, Path::Qkv);
            Ok(())
        })
        .unwrap();
        let (a, b) = (g.result(&be), f.result(&be));
        assert!(same_bits(&a.0, &b.0) && same_bits(&a.1, &b.1) && same_bits(&a.2, &b.2), "replay {p} differs");
    }
}

struct Moe {
    gate: Weight,
    up: Weight,
    down: Weight,
}

/// Scratch of the MoE path (allocated outside any graph capture).
struct MoeScratch([Tensor; 4]);

impl MoeScratch {
    fn new(be: &CudaBackend, m: &Moe, slots: usize) -> MoeScratch {
        let (ff, d) = (m.gate.dims().1, m.gate.dims().2);
        let p = |n| poisoned(be, &[1, slots, n]);
        MoeScratch([p(ff), p(ff), p(ff), p(d)])
    }
}

#[allow(clippy::too_many_arguments)]
fn run_moe(
    m: &Moe,
    be: &CudaBackend,
    h: &Tensor,
    ids: &Tensor,
    w: &Tensor,
    s: &mut MoeScratch,
    out: &mut Tensor,
    fused: bool,
) {
    let e = MoeIn { gate: &m.gate, up: &m.up, down: &m.down, ids, weights: w };
    let [g, u, act, y] = &mut s.0;
    let mut b = MoeBufs { gate: g, up: u, act, y };
    if fused {
        be.moe_experts(h, &e, &mut b, out).unwrap();
    } else {
        moe_experts_graph(be, h, &e, &mut b, out).unwrap();
    }
}

#[test]
fn fused_moe_equals_the_graph_path() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(13);
    let (experts, slots) = (16, 4);
    let mut cases = 0;
    // Qwen3-30B-A3B's expert shape (hidden 2048, width 768) and a narrow one
    for (d, ff) in [(2048, 768), (512, 256)] {
        for (fname, make) in FORMATS {
            let up = |w: Weight| be.upload_weight(w).unwrap();
            let m = Moe {
                gate: up(make(&mut r, experts, ff, d)),
                up: up(make(&mut r, experts, ff, d)),
                down: up(make(&mut r, experts, d, ff)),
            };
            let h = be.upload(Tensor::from_f32(&[1, d], &randv(&mut r, d)).unwrap()).unwrap();
            let mut ids = be.zeros(&[1, slots], DType::I32).unwrap();
            let mut w = be.zeros(&[1, slots], DType::F32).unwrap();
            for pick in [[3, 0, 15, 7], [1, 2, 3, 4]] {
                be.write_i32(&mut ids, &pick).unwrap();
                be.write_f32(&mut w, &[0.4, 0.3, 0.2, 0.1]).unwrap();
                let (mut og, mut of) = (poisoned(&be, &[1, d]), poisoned(&be, &[1, d]));
                let (mut sg, mut sf) = (MoeScratch::new(&be, &m, slots), MoeScratch::new(&be, &m, slots));
                run_moe(&m, &be, &h, &ids, &w, &mut sg, &mut og, false);
                run_moe(&m, &be, &h, &ids, &w, &mut sf, &mut of, true);
                let (g, f) = (read(&be, &og), read(&be, &of));
                let what = format!("moe {fname} d={d} ff={ff} experts {pick:?}");
                assert!(g.iter().all(|v| v.is_finite()), "{what}: graph output not finite");
                assert!(same_bits(&f, &g), "{what}: fused differs (rel {:.2e})", rel_err(&f, &g, &what));
                cases += 1;
            }
        }
    }
    eprintln!("fused moe: {cases} cases bitwise equal to the graph path");
}

/// Site swiglu: a dense MLP's gate/up + SwiGLU (Qwen3-0.6B's and a Llama-like
/// width), bitwise equal to two matmuls and silu_mul.
#[test]
fn fused_swiglu_equals_the_graph_path() {
    let Some(be) = backend_for_tests() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(15);
    let mut cases = 0;
    for (d, ff) in [(1024, 3072), (768, 2048)] {
        for (fname, make) in FORMATS {
            let gate = be.upload_weight(make(&mut r, 1, ff, d)).unwrap();
            let up = be.upload_weight(make(&mut r, 1, ff, d)).unwrap();
            let h = be.upload(Tensor::from_f32(&[1, d], &randv(&mut r, d)).unwrap()).unwrap();
            let mut outs = vec![];
            for fused in [false, true] {
                let (mut g, mut u, mut act) =
                    (poisoned(&be, &[1, ff]), poisoned(&be, &[1, ff]), poisoned(&be, &[1, ff]));
                let mut b = SwigluBufs { gate: &mut g, up: &mut u, act: &mut act };
                if fused {
                    be.swiglu(&h, &gate, &up, &mut b).unwrap();
                } else {
                    swiglu_graph(&be, &h, &gate, &up, &mut b).unwrap();
                }
                outs.push(read(&be, &act));
            }
            let what = format!("swiglu {fname} d={d} ff={ff}");
            assert!(outs[0].iter().all(|v| v.is_finite()), "{what}: graph output not finite");
            assert!(
                same_bits(&outs[1], &outs[0]),
                "{what}: fused differs (rel {:.2e})",
                rel_err(&outs[1], &outs[0], &what)
            );
            cases += 1;
        }
    }
    eprintln!("fused swiglu: {cases} cases bitwise equal to the graph path");
}

#[test]
fn fused_moe_replays_in_a_graph_with_new_experts() {
    let Some(be) = backend_for_tests_with_graphs(true) else { return };
    let mut r = ChaCha8Rng::seed_from_u64(14);
    let (experts, slots, d, ff) = (8, 2, 1024, 512);
    let up = |w: Weight| be.upload_weight(w).unwrap();
    let make = FORMATS[3].1;
    let m = Moe {
        gate: up(make(&mut r, experts, ff, d)),
        up: up(make(&mut r, experts, ff, d)),
        down: up(make(&mut r, experts, d, ff)),
    };
    let h = be.upload(Tensor::from_f32(&[1, d], &randv(&mut r, d)).unwrap()).unwrap();
    let mut ids = be.zeros(&[1, slots], DType::I32).unwrap();
    let mut w = be.zeros(&[1, slots], DType::F32).unwrap();
    let (mut og, mut of) = (poisoned(&be, &[1, d]), poisoned(&be, &[1, d]));
    let (mut sg, mut sf) = (MoeScratch::new(&be, &m, slots), MoeScratch::new(&be, &m, slots));
    for step in 0..5 {
        be.write_i32(&mut ids, &[step % experts as i32, (step * 3 + 1) % experts as i32]).unwrap();
        be.write_f32(&mut w, &[0.75, 0.25]).unwrap();
        run_moe(&m, &be, &h, &ids, &w, &mut sg, &mut og, false);
        be.run_graph(78, &mut || {
            run_moe(&m, &be, &h, &ids, &w, &mut sf, &mut of, true);
            Ok(())
        })
        .unwrap();
        assert!(same_bits(&read(&be, &of), &read(&be, &og)), "replay {step} differs");
    }
}
