//! Every op of the CPU backend against a naive f64 reference, on seeded random
//! inputs and awkward shapes: odd sizes, single rows, and tensors big enough to
//! take the backend's parallel paths.

use fusebox_core::cpu::CpuBackend;
use fusebox_core::rope::{inv_freq, RopeScaling, RopeStyle};
use fusebox_core::Weight;
use fusebox_core::{Backend, DType, LayerKv, Pages, Tensor};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
/// `[rows, n]` shapes, from one element to past the backend's parallel threshold.
const ROWS_N: [[usize; 2]; 9] = [[1, 1], [1, 3], [1, 17], [2, 33], [3, 129], [1, 1000], [3, 1031], [40, 1000], [7, 17]];

// ---------------------------------------------------------------- helpers

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Three threads, so parallel splits are uneven whatever the machine.
fn backend() -> CpuBackend {
    CpuBackend::new(3).expect("cpu backend")
}

fn uniform(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// An f32 tensor.
fn tf(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::from_f32(shape, data).unwrap()
}

/// A 1-D i32 tensor (ids, positions).
fn ti(data: &[i32]) -> Tensor {
    Tensor::from_i32(&[data.len()], data).unwrap()
}

/// A zero f32 tensor.
fn zf(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32)
}

/// `data` stored as `dtype`, and the exact f64 value of every stored element.
fn float_tensor(shape: &[usize], data: &[f32], dtype: DType) -> (Tensor, Vec<f64>) {
    let (bits, exact): (Vec<u16>, Vec<f64>) = match dtype {
        DType::F32 => return (tf(shape, data), to_f64(data)),
        DType::BF16 => data.iter().map(|&x| bf16::from_f32(x)).map(|h| (h.to_bits(), h.to_f64())).unzip(),
        DType::F16 => data.iter().map(|&x| f16::from_f32(x)).map(|h| (h.to_bits(), h.to_f64())).unzip(),
        d => panic!("not a float dtype: {d}"),
    };
    let t = Tensor::from_bytes(shape, dtype, bytemuck::cast_slice(&bits)).unwrap();
    (t, exact)
}

fn read(b: &CpuBackend, t: &Tensor) -> Vec<f32> {
    let mut v = Vec::new();
    b.read_f32(t, &mut v).unwrap();
    v
}

/// `f(a[i], b[i])` in f64.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(&x, &y)| f(x as f64, y as f64)).collect()
}

#[derive(Clone, Copy, Debug)]
enum Tol {
    /// Bit-exact (gathers and copies).
    Exact,
    /// Elementwise ops: `|got - ref| <= 1e-5 * max(1, max|ref|) + slack`.
    Elementwise { slack: f64 },
    /// Reductions: `max|got - ref| / max|ref| < 1e-5`.
    Reduction,
}
const ELEMENTWISE: Tol = Tol::Elementwise { slack: 0.0 };

/// Compare `got` with the f64 reference; on failure name the worst element.
fn check_close(what: &str, got: &[f32], want: &[f64], tol: Tol) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w).abs();
        let d = if d.is_nan() { f64::INFINITY } else { d };
        if d > worst {
            (worst, at) = (d, i);
        }
    }
    let (err, ok) = match tol {
        Tol::Exact => (worst, worst == 0.0),
        Tol::Elementwise { slack } => (worst, worst <= 1e-5 * max_ref.max(1.0) + slack),
        Tol::Reduction => {
            let rel = worst / max_ref.max(f64::MIN_POSITIVE);
            (rel, rel < 1e-5)
        }
    };
    assert!(
        ok,
        "{what}: {tol:?} failed, error {err:.3e}; worst at index {at}: got {} want {} \
         (max|ref| {max_ref:.3e})",
        got[at], want[at]
    );
}

// ---------------------------------------------------------------- references

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn ref_rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let n = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let inv = 1.0 / (dot(row, row) / n as f64 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, wv)| v * inv * wv));
    }
    out
}

fn ref_matmul(x: &[f64], w: &[f64], k: usize) -> Vec<f64> {
    x.chunks_exact(k).flat_map(|xr| w.chunks_exact(k).map(|wr| dot(xr, wr))).collect()
}

fn ref_rope(x: &[f64], d: usize, pos: &[i32], freqs: &[f32], style: RopeStyle) -> Vec<f64> {
    let mut out = x.to_vec();
    for (row, &p) in out.chunks_exact_mut(x.len() / pos.len()).zip(pos) {
        for h in row.chunks_exact_mut(d) {
            for (i, &f) in freqs.iter().enumerate() {
                let (a, b) = match style {
                    RopeStyle::Half => (i, i + d / 2),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (sin, cos) = (p as f64 * f as f64).sin_cos();
                let (x0, x1) = (h[a], h[b]);
                h[a] = x0 * cos - x1 * sin;
                h[b] = x1 * cos + x0 * sin;
            }
        }
    }
    out
}

fn ref_softmax(row: &[f64]) -> Vec<f64> {
    let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|v| (v - mx).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// Causal GQA attention of `q` (`dims` = `[heads, kv_heads, d]`) over full
/// `[cap, kv_heads, d]` caches `k`, `v`.
fn ref_attn(q: &[f64], k: &[f64], v: &[f64], dims: [usize; 3], pos: &[i32], s: f64) -> Vec<f64> {
    let [heads, kv_heads, d] = dims;
    let mut out = vec![0.0; q.len()];
    for (i, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let kv_at = |t: usize| (t * kv_heads + h / (heads / kv_heads)) * d;
            let qv = &q[(i * heads + h) * d..][..d];
            let scores: Vec<f64> = (0..=p as usize).map(|t| dot(qv, &k[kv_at(t)..][..d]) * s).collect();
            let o = &mut out[(i * heads + h) * d..][..d];
            for (t, wt) in ref_softmax(&scores).into_iter().enumerate() {
                o.iter_mut().zip(&v[kv_at(t)..][..d]).for_each(|(oj, vj)| *oj += wt * vj);
            }
        }
    }
    out
}

// ---------------------------------------------------------------- embedding

#[test]
fn embedding_gathers_rows_of_every_float_dtype() {
    let (b, mut r) = (backend(), rng(1));
    for dtype in FLOAT_DTYPES {
        for [vocab, dim] in [[1, 1], [3, 17], [33, 129], [50, 1031]] {
            let data = uniform(&mut r, vocab * dim, 3.0);
            let (table, exact) = float_tensor(&[vocab, dim], &data, dtype);
            for n in [1, 5] {
                let mut ids: Vec<i32> = (0..n).map(|_| r.random_range(0..vocab as i32)).collect();
                (ids[0], ids[n - 1]) = (vocab as i32 - 1, 0);
                let mut out = zf(&[n, dim]);
                b.embedding(&Weight::Dense(table.clone()), &ti(&ids), &mut out).unwrap();
                let want: Vec<f64> =
                    ids.iter().flat_map(|&id| exact.chunks(dim).nth(id as usize).unwrap().to_vec()).collect();
                let what = format!("embedding {dtype} [{vocab}, {dim}] ids {ids:?}");
                check_close(&what, &read(&b, &out), &want, Tol::Exact);
            }
        }
    }
}

#[test]
fn embedding_rejects_out_of_range_ids() {
    let b = backend();
    for dtype in FLOAT_DTYPES {
        let (table, _) = float_tensor(&[7, 3], &[0.5; 21], dtype);
        for ids in [&[7][..], &[0, 7], &[-1], &[i32::MAX], &[i32::MIN]] {
            let res = b.embedding(&Weight::Dense(table.clone()), &ti(ids), &mut zf(&[ids.len(), 3]));
            assert!(res.is_err(), "embedding {dtype} accepted ids {ids:?}");
        }
    }
}

// ---------------------------------------------------------------- rms_norm

#[test]
fn rms_norm_matches_reference() {
    let (b, mut r) = (backend(), rng(2));
    // [m, heads, n] shapes with an [n] weight: plain rows when heads = 1, per-head (QK) norms else.
    let shapes = [[3, 4, 64], [1, 8, 128], [2, 3, 17]].into_iter().chain(ROWS_N.map(|[m, n]| [m, 1, n]));
    for shape in shapes {
        let n = shape[2];
        for eps in [1e-6f32, 1e-5] {
            let x = uniform(&mut r, shape.iter().product(), 3.0);
            let w: Vec<f32> = uniform(&mut r, n, 0.5).iter().map(|v| v + 1.0).collect();
            let mut out = zf(&shape);
            b.rms_norm(&tf(&shape, &x), &tf(&[n], &w), eps, &mut out).unwrap();
            let want = ref_rms_norm(&to_f64(&x), &to_f64(&w), eps as f64);
            let what = format!("rms_norm {shape:?} eps {eps}");
            check_close(&what, &read(&b, &out), &want, Tol::Reduction);
        }
    }
}

// ---------------------------------------------------------------- matmul

#[test]
fn matmul_matches_reference_for_gemv_and_prefill() {
    let (b, mut r) = (backend(), rng(3));
    for dtype in FLOAT_DTYPES {
        for [k, n] in [[1, 1], [17, 1], [33, 7], [100, 300], [1031, 7], [1031, 300]] {
            let (w, w_exact) = float_tensor(&[n, k], &uniform(&mut r, n * k, 1.0), dtype);
            for m in [1, 2, 5, 19] {
                let x = uniform(&mut r, m * k, 2.0);
                let mut out = zf(&[m, n]);
                b.matmul(&tf(&[m, k], &x), &Weight::Dense(w.clone()), &mut out).unwrap();
                let want = ref_matmul(&to_f64(&x), &w_exact, k);
                let what = format!("matmul {dtype} m={m} k={k} n={n}");
                check_close(&what, &read(&b, &out), &want, Tol::Reduction);
            }
        }
    }
    // A 3-D input is 2 * 3 rows of k.
    let (x, w) = (uniform(&mut r, 6 * 33, 1.0), uniform(&mut r, 7 * 33, 1.0));
    let mut out = zf(&[2, 3, 7]);
    b.matmul(&tf(&[2, 3, 33], &x), &Weight::Dense(tf(&[7, 33], &w)), &mut out).unwrap();
    let want = ref_matmul(&to_f64(&x), &to_f64(&w), 33);
    check_close("matmul 3-D input", &read(&b, &out), &want, Tol::Reduction);
}

#[test]
fn matmul_rejects_mismatched_shapes() {
    let b = backend();
    let (w, w_1d) = (Weight::Dense(tf(&[7, 17], &[0.25; 119])), Weight::Dense(tf(&[119], &[0.25; 119])));
    let w_i32 = Weight::Dense(Tensor::zeros(&[7, 17], DType::I32));
    let (x, x_k18, x_k16) = (zf(&[2, 17]), zf(&[2, 18]), zf(&[2, 16]));
    b.matmul(&x, &w, &mut zf(&[2, 7])).unwrap();
    assert!(b.matmul(&x_k18, &w, &mut zf(&[2, 7])).is_err());
    assert!(b.matmul(&x_k16, &w, &mut zf(&[2, 7])).is_err());
    assert!(b.matmul(&x, &w, &mut zf(&[2, 8])).is_err()); // output too big
    assert!(b.matmul(&x, &w, &mut zf(&[1, 7])).is_err()); // output too small
    assert!(b.matmul(&x, &w_1d, &mut zf(&[2, 7])).is_err());
    assert!(b.matmul(&x, &w_i32, &mut zf(&[2, 7])).is_err());
}

// ---------------------------------------------------------------- rope

#[test]
fn rope_matches_reference_for_both_styles_and_scalings() {
    let (b, mut r) = (backend(), rng(4));
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let linear = RopeScaling::Linear { factor: 4.0 };
    let tables = [("default", 1e4, RopeScaling::None), ("linear", 1e4, linear), ("llama3", 5e5, llama3)];
    // Single rows (decode), a mixed batch, and 64 consecutive rows (parallel path at d=128).
    let mut position_sets: Vec<Vec<i32>> = [0, 1, 37, 1000].map(|p| vec![p]).into();
    position_sets.extend([vec![0, 1, 37, 1000], (990..1054).collect()]);
    for style in [RopeStyle::Half, RopeStyle::Interleaved] {
        for (name, theta, scaling) in tables {
            for [d, heads] in [[8, 3], [64, 3], [128, 4]] {
                let freqs = inv_freq(d, theta, scaling);
                for pos in &position_sets {
                    let x = uniform(&mut r, pos.len() * heads * d, 1.0);
                    let mut t = tf(&[pos.len(), heads, d], &x);
                    b.rope(&mut t, &ti(pos), &tf(&[d / 2], &freqs), style).unwrap();
                    let want = ref_rope(&to_f64(&x), d, pos, &freqs, style);
                    // The backend forms `pos * inv_freq` in f32 (as HF transformers does); that
                    // rounding (<= 2^-24 relative) turns each pair (|pair| <= sqrt 2) a little.
                    let max_angle = *pos.iter().max().unwrap() as f64 * freqs[0] as f64;
                    let slack = max_angle * 2f64.powi(-24) * 2f64.sqrt();
                    let what = format!("rope {style:?} {name} d={d} heads={heads} pos {pos:?}");
                    check_close(&what, &read(&b, &t), &want, Tol::Elementwise { slack });
                }
            }
        }
    }
}

// ---------------------------------------------------------------- kv_write + attention

fn new_cache(cap: usize, kv_heads: usize, d: usize) -> LayerKv {
    LayerKv { k: zf(&[cap, kv_heads, d]), v: zf(&[cap, kv_heads, d]) }
}

/// Fill the cache with random rows written in a shuffled order, then write
/// fresh rows at `new_pos`, and check that the cache holds exactly what was
/// written. Returns host copies of the keys and values.
fn fill_cache(b: &CpuBackend, seed: u64, cache: &mut LayerKv, new_pos: &[i32]) -> [Vec<f32>; 2] {
    let mut r = rng(seed);
    let s = cache.k.shape().to_vec();
    let (cap, row) = (s[0], s[1] * s[2]);
    let mut kv = [vec![0f32; cap * row], vec![0f32; cap * row]];
    let mut order: Vec<i32> = (0..cap as i32).collect();
    for i in (1..cap).rev() {
        order.swap(i, r.random_range(0..=i));
    }
    for pos in [&order[..], new_pos] {
        let shape = [pos.len(), s[1], s[2]];
        let nk = uniform(&mut r, shape.iter().product(), 1.0);
        let nv = uniform(&mut r, nk.len(), 1.0);
        b.kv_write(&tf(&shape, &nk), &tf(&shape, &nv), &ti(pos), cache).unwrap();
        for (i, &p) in pos.iter().enumerate() {
            kv[0][p as usize * row..][..row].copy_from_slice(&nk[i * row..][..row]);
            kv[1][p as usize * row..][..row].copy_from_slice(&nv[i * row..][..row]);
        }
    }
    assert!(cache.k.as_f32().unwrap() == kv[0], "kv_write: wrong keys");
    assert!(cache.v.as_f32().unwrap() == kv[1], "kv_write: wrong values");
    kv
}

#[test]
fn attention_matches_reference_for_decode_and_prefill() {
    let mut r = rng(5);
    let b = backend();
    // (cap, p0, m): decode late in the cache, then prefill from 0 and after a prefix;
    // past 32 rows the blocked prefill path (also with the positions reversed: m < 0).
    // Cache rows past the last position hold random data that must stay masked.
    let cases = [(333, 300, 1), (40, 0, 1), (40, 0, 5), (64, 11, 19), (29, 10, 19), (80, 0, 40), (100, 17, -45i32)];
    for [heads, kv_heads] in [[4, 2], [4, 1], [6, 3], [4, 4], [16, 1], [18, 1]] {
        for d in [8, 32, 64, 128] {
            for (cap, p0, m) in cases {
                let (m, rev) = (m.unsigned_abs() as usize, m < 0);
                let mut cache = new_cache(cap, kv_heads, d);
                let mut pos: Vec<i32> = (p0..p0 + m as i32).collect();
                if rev {
                    pos.reverse();
                }
                let [k, v] = fill_cache(&b, r.random(), &mut cache, &pos);
                let (shape, scale) = ([m, heads, d], 1.0 / (d as f32).sqrt());
                let q = uniform(&mut r, m * heads * d, 2.0);
                let mut out = zf(&shape);
                b.attention(&tf(&shape, &q), &cache, &ti(&pos), scale, &mut out).unwrap();
                let (q, k, v) = (to_f64(&q), to_f64(&k), to_f64(&v));
                let want = ref_attn(&q, &k, &v, [heads, kv_heads, d], &pos, scale as f64);
                let what = format!("attention {heads}/{kv_heads} heads d={d} cap={cap} pos {pos:?}");
                check_close(&what, &read(&b, &out), &want, Tol::Reduction);
            }
        }
    }
}

#[test]
fn kv_write_and_attention_reject_positions_past_capacity() {
    let b = backend();
    let mut cache = new_cache(8, 2, 16);
    let (kv, q) = (tf(&[1, 2, 16], &[1.0; 32]), tf(&[2, 4, 16], &[0.5; 128]));
    b.kv_write(&kv, &kv, &ti(&[7]), &mut cache).unwrap();
    assert!(b.kv_write(&kv, &kv, &ti(&[8]), &mut cache).is_err());
    assert!(b.kv_write(&kv, &kv, &ti(&[-1]), &mut cache).is_err());
    let attend = |pos: &[i32]| b.attention(&q, &cache, &ti(pos), 0.25, &mut zf(&[2, 4, 16]));
    attend(&[6, 7]).unwrap();
    assert!(attend(&[7, 8]).is_err());
    assert!(attend(&[7, 100]).is_err());
}

// ---------------------------------------------------------------- paged attention

/// `n` block ids `0..n` in a shuffled order.
fn shuffled(r: &mut ChaCha8Rng, n: usize) -> Vec<i32> {
    let mut ids: Vec<i32> = (0..n as i32).collect();
    for i in (1..n).rev() {
        ids.swap(i, r.random_range(0..=i));
    }
    ids
}

/// Sequences laid out each in a contiguous cache and, the same rows, in one
/// paged cache whose blocks are handed out in a shuffled order (the rest of
/// both caches random): every query row of one paged call over all of them
/// (prefill runs on and off the blocked path, decode rows, a verify run)
/// equals bitwise the contiguous call for its sequence alone.
#[test]
fn paged_attention_is_bitwise_contiguous_attention_per_sequence() {
    let mut r = rng(23);
    let b = backend();
    let bs = 16;
    // per sequence: (positions cached before the call, rows in the call)
    let seqs = [(0usize, 40usize), (70, 1), (5, 3), (200, 1), (33, 34), (16, 1)];
    let width = seqs.iter().map(|&(p, m)| (p + m).div_ceil(bs)).max().unwrap();
    let used: usize = seqs.iter().map(|&(p, m)| (p + m).div_ceil(bs)).sum();
    let blocks = used + 3;
    for dtype in [DType::F32, DType::F16] {
        for [heads, kv_heads] in [[4, 2], [16, 1], [6, 3]] {
            for d in [8, 24, 64, 128] {
                let row = kv_heads * d;
                let ids = shuffled(&mut r, blocks);
                let mut tables = vec![-1i32; seqs.len() * width];
                let mut paged = [uniform(&mut r, blocks * bs * row, 1.0), uniform(&mut r, blocks * bs * row, 1.0)];
                let (mut q, mut pos, mut seq_of, mut alone) = (vec![], vec![], vec![], vec![]);
                let mut next = 0;
                for (s, &(p, m)) in seqs.iter().enumerate() {
                    let (len, cap) = (p + m, p + m + 5);
                    let kv = [uniform(&mut r, cap * row, 1.0), uniform(&mut r, cap * row, 1.0)];
                    for j in 0..len.div_ceil(bs) {
                        let id = ids[next] as usize;
                        next += 1;
                        tables[s * width + j] = id as i32;
                        let rows = bs.min(len - j * bs) * row;
                        for (dst, src) in paged.iter_mut().zip(&kv) {
                            dst[id * bs * row..][..rows].copy_from_slice(&src[j * bs * row..][..rows]);
                        }
                    }
                    let qs = uniform(&mut r, m * heads * d, 2.0);
                    let ps: Vec<i32> = (p as i32..len as i32).collect();
                    let cache = LayerKv {
                        k: float_tensor(&[cap, kv_heads, d], &kv[0], dtype).0,
                        v: float_tensor(&[cap, kv_heads, d], &kv[1], dtype).0,
                    };
                    let mut out = zf(&[m, heads, d]);
                    let scale = 1.0 / (d as f32).sqrt();
                    b.attention(&tf(&[m, heads, d], &qs), &cache, &ti(&ps), scale, &mut out).unwrap();
                    alone.extend(read(&b, &out));
                    q.extend(qs);
                    pos.extend(ps);
                    seq_of.extend(std::iter::repeat_n(s as i32, m));
                }
                let mt = pos.len();
                let cache = LayerKv {
                    k: float_tensor(&[blocks * bs, kv_heads, d], &paged[0], dtype).0,
                    v: float_tensor(&[blocks * bs, kv_heads, d], &paged[1], dtype).0,
                };
                let tables = Tensor::from_i32(&[seqs.len(), width], &tables).unwrap();
                let (positions, seqs_t, slots) = (ti(&pos), ti(&seq_of), ti(&vec![0; mt]));
                let pages =
                    Pages { positions: &positions, seqs: &seqs_t, tables: &tables, slots: &slots, block_size: bs };
                let mut out = zf(&[mt, heads, d]);
                b.paged_attention(&tf(&[mt, heads, d], &q), &cache, &pages, 1.0 / (d as f32).sqrt(), &mut out).unwrap();
                let got = read(&b, &out);
                let what = format!("paged attention {dtype} {heads}/{kv_heads} heads d={d}");
                for (i, (g, a)) in got.chunks(heads * d).zip(alone.chunks(heads * d)).enumerate() {
                    assert!(
                        g.iter().zip(a).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{what}: row {i} (sequence {}, position {}) differs from the sequence alone",
                        seq_of[i],
                        pos[i]
                    );
                }
            }
        }
    }
}

#[test]
fn paged_attention_rejects_bad_tables() {
    let b = backend();
    let cache = new_cache(16, 1, 8); // four blocks of 4
    let q = tf(&[1, 1, 8], &[0.5; 8]);
    let attend = |tables: &[i32], width: usize, seq: i32, pos: i32, bs: usize| {
        let tables = Tensor::from_i32(&[tables.len() / width, width], tables).unwrap();
        let (positions, seqs, slots) = (ti(&[pos]), ti(&[seq]), ti(&[0]));
        let pages = Pages { positions: &positions, seqs: &seqs, tables: &tables, slots: &slots, block_size: bs };
        b.paged_attention(&q, &cache, &pages, 0.25, &mut zf(&[1, 1, 8]))
    };
    attend(&[2, 0], 2, 0, 5, 4).unwrap();
    // entries past the position are not read
    attend(&[2, -7], 2, 0, 3, 4).unwrap();
    let bad = [
        attend(&[2, 0], 2, 1, 5, 4),  // no sequence 1
        attend(&[2, 0], 2, -1, 5, 4), // negative sequence
        attend(&[2, 0], 2, 0, 8, 4),  // position 8 needs a third block
        attend(&[2, 4], 2, 0, 5, 4),  // block 4 of 4
        attend(&[2, -1], 2, 0, 5, 4), // negative block
        attend(&[2, 0], 2, 0, 5, 3),  // block size not a power of two
        attend(&[0], 1, 0, 5, 32),    // the cache is not whole blocks
        attend(&[2, 0], 2, 0, -1, 4), // negative position
    ];
    for (i, e) in bad.iter().enumerate() {
        let msg = e.as_ref().err().map(|e| e.to_string());
        assert!(msg.as_deref().is_some_and(|m| m.starts_with("paged attention")), "case {i}: {msg:?}");
    }
}

// ---------------------------------------------------------------- elementwise

#[test]
fn silu_mul_matches_reference() {
    let (b, mut r) = (backend(), rng(6));
    for shape in ROWS_N {
        let mut gate = uniform(&mut r, shape[0] * shape[1], 8.0);
        let up = uniform(&mut r, gate.len(), 3.0);
        let mid = gate.len() / 2;
        (gate[0], gate[mid]) = (80.0, -80.0);
        let mut out = zf(&shape);
        b.silu_mul(&tf(&shape, &gate), &tf(&shape, &up), &mut out).unwrap();
        let want = zip_map(&gate, &up, |g, u| g / (1.0 + (-g).exp()) * u);
        let what = format!("silu_mul {shape:?}");
        check_close(&what, &read(&b, &out), &want, ELEMENTWISE);
    }
    assert!(b.silu_mul(&zf(&[2, 3]), &zf(&[3, 2]), &mut zf(&[2, 3])).is_err());
}

#[test]
fn add_assign_matches_reference() {
    let (b, mut r) = (backend(), rng(7));
    for shape in ROWS_N {
        let x = uniform(&mut r, shape[0] * shape[1], 100.0);
        let y = uniform(&mut r, x.len(), 1.0);
        let mut t = tf(&shape, &x);
        b.add_assign(&mut t, &tf(&shape, &y)).unwrap();
        let want = zip_map(&x, &y, |a, c| a + c);
        let what = format!("add_assign {shape:?}");
        check_close(&what, &read(&b, &t), &want, ELEMENTWISE);
    }
    assert!(b.add_assign(&mut zf(&[3]), &zf(&[4])).is_err());
}

#[test]
fn softmax_matches_reference_and_is_stable() {
    let (b, mut r) = (backend(), rng(8));
    // Random rows at several magnitudes, then rows of huge, equal and mixed-sign values.
    let mut cases: Vec<(Vec<usize>, Vec<f32>)> = Vec::new();
    for shape in ROWS_N.iter().map(|s| s.to_vec()).chain([vec![2, 3, 17]]) {
        for scale in [1.0, 10.0, 80.0, 1000.0] {
            let mut x = uniform(&mut r, shape.iter().product(), scale);
            let mid = x.len() / 2;
            (x[0], x[mid]) = (80.0, -80.0);
            cases.push((shape.clone(), x));
        }
    }
    let extreme: [[f32; 6]; 6] = [
        [80.0, -80.0, 79.5, -79.5, 0.0, 80.0],
        [80.0; 6],
        [-80.0; 6],
        [-1e4, 1e4, -3e4, 3e4, 0.0, 1.0],
        [-88.0, -87.0, -104.0, -150.0, -89.0, -88.5],
        [88.0, 87.0, 104.0, 150.0, 89.0, 88.5],
    ];
    cases.push((vec![2, 3, 6], extreme.concat()));
    for (shape, x) in cases {
        let n = *shape.last().unwrap();
        let mut out = zf(&shape);
        b.softmax(&tf(&shape, &x), &mut out).unwrap();
        let want: Vec<f64> = to_f64(&x).chunks_exact(n).flat_map(ref_softmax).collect();
        let max_abs = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let what = format!("softmax {shape:?} max|x| {max_abs}");
        check_close(&what, &read(&b, &out), &want, ELEMENTWISE);
    }
}

#[test]
fn argmax_matches_reference_and_prefers_first_on_ties() {
    let (b, mut r) = (backend(), rng(9));
    let first_max = |row: &[f32]| (0..row.len()).fold(0, |bi, i| if row[i] > row[bi] { i } else { bi });
    for [rows, n] in ROWS_N {
        let mut x = uniform(&mut r, rows * n, 5.0);
        if n > 3 {
            (x[n - 1], x[n / 2]) = (6.0, 6.0); // tie row 0's maximum at two columns
        }
        let mut out = Tensor::zeros(&[rows], DType::I32);
        b.argmax(&tf(&[rows, n], &x), &mut out).unwrap();
        let want: Vec<i32> = x.chunks_exact(n).map(|row| first_max(row) as i32).collect();
        assert_eq!(out.as_i32().unwrap(), want, "argmax [{rows}, {n}]");
    }
    let ties: [(&[f32], i32); 5] = [
        (&[2.0, 7.0, 7.0, 1.0, 7.0], 1),
        (&[3.0; 17], 0),
        (&[-5.0, -1.0, -1.0, -3.0], 1),
        (&[0.0, -0.0, 0.0], 0),
        (&[-80.0, 80.0, 79.99999, 80.0], 1),
    ];
    for (row, want) in ties {
        let mut out = Tensor::zeros(&[1], DType::I32);
        b.argmax(&tf(&[1, row.len()], row), &mut out).unwrap();
        assert_eq!(out.as_i32().unwrap(), [want], "argmax of {row:?}");
    }
}

// ---------------------------------------------------------------- copy_rows

#[test]
fn copy_rows_copies_exactly_the_requested_rows() {
    let (b, mut r) = (backend(), rng(10));
    // (src shape, dst shape, width): rows are [numel / width, width].
    let pairs: [(&[usize], &[usize], usize); 3] =
        [(&[7, 33], &[5, 33], 33), (&[2, 3, 17], &[4, 17], 17), (&[1, 1031], &[3, 1031], 1031)];
    for dtype in FLOAT_DTYPES {
        for (src_shape, dst_shape, w) in pairs {
            let sn: usize = src_shape.iter().product();
            let dn: usize = dst_shape.iter().product();
            let (src_rows, dst_rows) = (sn / w, dn / w);
            let spans = [(0, 0, 1), (src_rows - 1, dst_rows - 1, 1), (0, 0, src_rows.min(dst_rows)), (1, 2, 1)];
            for (sr, dr, n) in spans {
                if sr + n > src_rows || dr + n > dst_rows {
                    continue;
                }
                let (src, src_v) = float_tensor(src_shape, &uniform(&mut r, sn, 1.0), dtype);
                let (mut dst, mut want) = float_tensor(dst_shape, &uniform(&mut r, dn, 1.0), dtype);
                b.copy_rows(&src, sr, &mut dst, dr, n).unwrap();
                want[dr * w..(dr + n) * w].copy_from_slice(&src_v[sr * w..(sr + n) * w]);
                let what = format!("copy_rows {dtype} {src_shape:?}[{sr}..+{n}] -> {dst_shape:?}[{dr}..]");
                check_close(&what, &read(&b, &dst), &want, Tol::Exact);
            }
        }
    }
    // source / destination rows past the end, width mismatch, dtype mismatch
    let (src, mut bf) = (tf(&[4, 8], &[1.0; 32]), Tensor::zeros(&[3, 8], DType::BF16));
    assert!(b.copy_rows(&src, 3, &mut zf(&[3, 8]), 0, 2).is_err());
    assert!(b.copy_rows(&src, 0, &mut zf(&[3, 8]), 2, 2).is_err());
    assert!(b.copy_rows(&src, 0, &mut zf(&[3, 9]), 0, 1).is_err());
    assert!(b.copy_rows(&src, 0, &mut bf, 0, 1).is_err());
}

#[test]
fn copy_cols_writes_one_slot_of_every_row() {
    let (b, mut r) = (backend(), rng(11));
    for (m, n, wide, col) in [(1, 8, 24, 16), (5, 7, 21, 0), (5, 7, 21, 7), (3, 64, 64, 0)] {
        let src_v = uniform(&mut r, m * n, 1.0);
        let mut want = uniform(&mut r, m * wide, 1.0);
        let mut dst = tf(&[m, wide], &want);
        b.copy_cols(&tf(&[m, n], &src_v), &mut dst, col).unwrap();
        for row in 0..m {
            want[row * wide + col..row * wide + col + n].copy_from_slice(&src_v[row * n..(row + 1) * n]);
        }
        let what = format!("copy_cols [{m},{n}] -> [{m},{wide}] at {col}");
        check_close(&what, &read(&b, &dst), &to_f64(&want), Tol::Exact);
    }
    // columns past the end, row count mismatch, non-f32
    let src = tf(&[2, 8], &[1.0; 16]);
    assert!(b.copy_cols(&src, &mut zf(&[2, 16]), 9).is_err());
    assert!(b.copy_cols(&src, &mut zf(&[3, 16]), 0).is_err());
    assert!(b.copy_cols(&src, &mut Tensor::zeros(&[2, 16], DType::BF16), 0).is_err());
}

#[test]
fn kv_write_failure_leaves_cache_untouched_and_layouts_are_checked() {
    let b = backend();
    let mut cache = new_cache(8, 2, 16);
    let k = tf(&[2, 2, 16], &[1.0; 64]);
    // the second position is past capacity: nothing may be written
    assert!(b.kv_write(&k, &k, &ti(&[3, 100]), &mut cache).is_err());
    assert!(cache.k.as_f32().unwrap().iter().chain(cache.v.as_f32().unwrap()).all(|&x| x == 0.0));
    // same element count per row, wrong layout
    let wrong = tf(&[1, 4, 8], &[1.0; 32]);
    assert!(b.kv_write(&wrong, &wrong, &ti(&[0]), &mut cache).is_err());
    // keys and values of different shapes are refused, not a panic
    let mut odd = LayerKv { k: zf(&[8, 2, 16]), v: zf(&[4, 2, 16]) };
    let one = tf(&[1, 2, 16], &[1.0; 32]);
    assert!(b.kv_write(&one, &one, &ti(&[7]), &mut odd).is_err());
    let q = tf(&[1, 4, 16], &[1.0; 64]);
    assert!(b.attention(&q, &odd, &ti(&[7]), 0.25, &mut zf(&[1, 4, 16])).is_err());
}

#[test]
fn zero_width_rows_are_errors_not_panics() {
    let b = backend();
    assert!(b.softmax(&zf(&[2, 0]), &mut zf(&[2, 0])).is_err());
    assert!(b.rms_norm(&zf(&[2, 0]), &zf(&[0]), 1e-6, &mut zf(&[2, 0])).is_err());
}

/// `FUSEBOX_KV_DTYPE=f16`: kv_write rounds keys and values to f16 once, and
/// attention over the f16 cache is bitwise attention over an f32 cache that
/// holds the same rounded values (decode and prefill, every tail length).
#[test]
fn attention_over_an_f16_cache_is_attention_over_its_values() {
    let mut r = rng(41);
    let b = backend();
    for (heads, kv_heads, d) in [(4, 2, 64), (6, 3, 128), (2, 1, 24), (8, 2, 40), (3, 1, 32)] {
        for (cap, p0, m) in [(37, 30, 1), (21, 0, 7), (64, 13, 5), (80, 13, 41)] {
            let shape = [cap, kv_heads, d];
            let k = uniform(&mut r, cap * kv_heads * d, 3.0);
            let v = uniform(&mut r, k.len(), 3.0);
            let mut c16 = LayerKv { k: Tensor::zeros(&shape, DType::F16), v: Tensor::zeros(&shape, DType::F16) };
            let all: Vec<i32> = (0..cap as i32).collect();
            b.kv_write(&tf(&shape, &k), &tf(&shape, &v), &ti(&all), &mut c16).unwrap();
            let round = |x: &[f32]| x.iter().map(|&a| f16::from_f32(a).to_f32()).collect::<Vec<f32>>();
            let (kr, vr) = (round(&k), round(&v));
            assert_eq!(c16.k.to_f32_vec().unwrap(), kr, "kv_write into f16: keys");
            assert_eq!(c16.v.to_f32_vec().unwrap(), vr, "kv_write into f16: values");
            let c32 = LayerKv { k: tf(&shape, &kr), v: tf(&shape, &vr) };
            let pos: Vec<i32> = (p0..p0 + m as i32).collect();
            let q = tf(&[m, heads, d], &uniform(&mut r, m * heads * d, 2.0));
            let scale = 1.0 / (d as f32).sqrt();
            let (mut a, mut want) = (zf(&[m, heads, d]), zf(&[m, heads, d]));
            b.attention(&q, &c16, &ti(&pos), scale, &mut a).unwrap();
            b.attention(&q, &c32, &ti(&pos), scale, &mut want).unwrap();
            let (a, want) = (a.as_f32().unwrap(), want.as_f32().unwrap());
            assert!(
                a.iter().zip(want).all(|(x, y)| x.to_bits() == y.to_bits()),
                "heads {heads}/{kv_heads} d {d} cap {cap} p0 {p0} m {m}: f16 cache differs"
            );
        }
    }
}

/// Benchmark, not a check (run with `--ignored --nocapture`): decode
/// attention of one row over Qwen3-0.6B's shape (16 heads over 8 kv heads of
/// 128) at 512 and 1024 positions, 28 layers' caches so they do not sit in
/// the caches, on 2 threads; f16 cache, or f32 with `FUSEBOX_BENCH_F32=1`;
/// with `FUSEBOX_BENCH_PAGED=1` through `paged_attention`, the cache as
/// blocks of 16 in a shuffled order. Prints the 10th-percentile and median
/// time of one layer.
#[test]
#[ignore]
fn cpu_attention_bandwidth() {
    let b = CpuBackend::new(2).unwrap();
    let (cap, kvh, heads, d) = (1024, 8, 16, 128);
    let shape = [cap, kvh, d];
    let mut r = rng(5);
    let kr: Vec<f32> = (0..cap * kvh * d).map(|_| r.random::<f32>() - 0.5).collect();
    let f32c = std::env::var("FUSEBOX_BENCH_F32").is_ok_and(|v| v == "1");
    let cache = || {
        if f32c {
            return LayerKv { k: tf(&shape, &kr), v: tf(&shape, &kr) };
        }
        let mut c = LayerKv { k: Tensor::zeros(&shape, DType::F16), v: Tensor::zeros(&shape, DType::F16) };
        let all: Vec<i32> = (0..cap as i32).collect();
        b.kv_write(&tf(&shape, &kr), &tf(&shape, &kr), &ti(&all), &mut c).unwrap();
        c
    };
    let caches: Vec<LayerKv> = (0..28).map(|_| cache()).collect();
    let q = tf(&[1, heads, d], &kr[..heads * d]);
    let mut out = zf(&[1, heads, d]);
    let paged = std::env::var("FUSEBOX_BENCH_PAGED").is_ok_and(|v| v == "1");
    let tables = Tensor::from_i32(&[1, cap / 16], &shuffled(&mut r, cap / 16)).unwrap();
    let (seqs, slots) = (ti(&[0]), ti(&[0]));
    for len in [512i32, 1024] {
        let pos = ti(&[len - 1]);
        let pages = Pages { positions: &pos, seqs: &seqs, tables: &tables, slots: &slots, block_size: 16 };
        let mut v = Vec::new();
        b.run(&mut || {
            for _ in 0..20 {
                let t = std::time::Instant::now();
                for c in &caches {
                    if paged {
                        b.paged_attention(&q, c, &pages, 0.1, &mut out)?;
                    } else {
                        b.attention(&q, c, &pos, 0.1, &mut out)?;
                    }
                }
                v.push(t.elapsed().as_secs_f64() / caches.len() as f64);
            }
            Ok(())
        })
        .unwrap();
        v.sort_by(f64::total_cmp);
        let bytes = 2.0 * len as f64 * (kvh * d * if f32c { 4 } else { 2 }) as f64;
        println!(
            "{} cache, {len} positions: {:.1} us p10, {:.1} us median a layer, {:.2} GB/s of keys and values (p10)",
            if f32c { "f32" } else { "f16" },
            v[2] * 1e6,
            v[10] * 1e6,
            bytes / v[2] / 1e9
        );
    }
}
