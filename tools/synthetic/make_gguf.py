#!/usr/bin/env python3
"""Write a random-weight GGUF file with the exact shapes of a real Qwen3 model,
in the tensor-type mix that llama.cpp's llama-quantize gives, for speed
measurements (decode and prefill speed do not depend on the weight values).

    python3 tools/synthetic/make_gguf.py SHAPE TYPE OUT.gguf [--layers N] [--pure]

SHAPE: qwen3-0.6b, qwen3-8b (tools/synthetic/make_checkpoint.py SHAPES) or
qwen3-30b-a3b (below; shared/reference.md). TYPE: bf16, q8_0, q4_0 or q4_k_m.

Tensor types follow llama.cpp's src/llama-quant.cpp (llama_tensor_get_type_impl,
as vendored in llama-cpp-python 0.3.36, llama.cpp 0c1e57098), applied to a BF16
file from convert_hf_to_gguf.py:
  * 1-D tensors, *_norm.weight and the MoE router ffn_gate_inp stay F32;
  * bf16: every matrix BF16;
  * the output projection (and token_embd when the embeddings are tied, as in
    Qwen3-0.6B) is Q6_K unless the type is Q8_0 (then Q8_0);
  * q4_k_m: Q4_K, except attn_v and ffn_down (ffn_down_exps) in the layers where
    use_more_bits(i, n) = i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, which are Q6_K;
  * q4_0 / q8_0: that type everywhere else.
--pure makes every matrix the nominal type (llama-quantize --pure).
Tensors are written in llama-quantize's order (non-layer tensors by name, then
layer by layer, by name within a layer). Checked against llama-quantize of that
llama.cpp run on this script's bf16 files (qwen3-0.6b in Q4_K_M, Q4_0 and Q8_0;
qwen3-8b and qwen3-30b-a3b with --layers 2 in Q4_K_M and Q4_0): the same type
for every tensor, the same order and the same file size.

Values: matrices are random blocks from a 64 MiB pool of random bytes (reused
round-robin from a random block offset per tensor), with each block's f16
scales (d, dmin) set to finite values that give weights of about 0.02 std, so
no activation overflows; BF16 matrices are N(0, 0.02); norms are ones; the
router is N(0, 0.02) in F32, so tokens spread over the experts as in a real
model. Generation is I/O bound and holds one tensor in memory at a time.

The tokenizer metadata is the real Qwen3 one (tokenizer.ggml.pre "qwen2"),
from the assets cache (scripts/fetch-assets.sh), written by
tools/fixtures/make_gguf_fixtures.py's tokenizer_meta. Needs numpy and the
`gguf` package (0.19.0; llama.cpp's gguf-py, on PYTHONPATH, works).
The file is written under OUT.partial and renamed at the end.
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from make_checkpoint import SHAPES as DENSE_SHAPES, bf16_bits  # noqa: E402
from make_gguf_fixtures import tokenizer_meta  # noqa: E402

SHAPES = dict(DENSE_SHAPES)
SHAPES["qwen3-30b-a3b"] = dict(
    model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    vocab_size=151936, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960)

FTYPES = {  # TYPE -> (nominal ggml type, general.file_type)
    "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": (T.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
}

POOL_BYTES = 64 << 20


def use_more_bits(i, n):
    """llama-quant.cpp's use_more_bits (C++ integer division; i - n/8 >= 0 where it matters)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name, ndim, cols, ftype, n_layer, tied, pure):
    """The ggml type llama-quantize gives tensor `name` (a 2-D or 3-D matrix of `cols` columns)."""
    if ndim < 2 or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
        return T.F32
    nominal = FTYPES[ftype][0]
    if nominal == T.BF16 or pure:
        return nominal
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        t = T.Q8_0 if nominal == T.Q8_0 or cols % gguf.GGML_QUANT_SIZES[nominal][0] else T.Q6_K
    elif name == "token_embd.weight":
        t = nominal
    elif ".attn_v." in name or ".ffn_down" in name:
        t = T.Q6_K if ftype == "q4_k_m" and use_more_bits(layer, n_layer) else nominal
    else:
        t = nominal
    assert cols % gguf.GGML_QUANT_SIZES[t][0] == 0, (name, cols, t)  # no llama-quantize fallback needed here
    return t


def tensors_of(cfg, n_layer):
    """(name, numpy shape [.., rows, cols]) in llama-quantize's order."""
    d, hd, v = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    top = [("output_norm.weight", (d,)), ("token_embd.weight", (v, d))]
    if not cfg["tie_word_embeddings"]:
        top.append(("output.weight", (v, d)))
    out = sorted(top)
    for i in range(n_layer):
        layer = {
            "attn_norm": (d,), "ffn_norm": (d,), "attn_q_norm": (hd,), "attn_k_norm": (hd,),
            "attn_q": (nh * hd, d), "attn_k": (nkv * hd, d), "attn_v": (nkv * hd, d), "attn_output": (d, nh * hd),
        }
        if cfg.get("num_experts"):
            e, ff = cfg["num_experts"], cfg["moe_intermediate_size"]
            layer.update(ffn_gate_inp=(e, d), ffn_gate_exps=(e, ff, d), ffn_up_exps=(e, ff, d), ffn_down_exps=(e, d, ff))
        else:
            ff = cfg["intermediate_size"]
            layer.update(ffn_gate=(ff, d), ffn_up=(ff, d), ffn_down=(d, ff))
        out += sorted((f"blk.{i}.{k}.weight", s) for k, s in layer.items())
    return out


def block_pool(rng, t):
    """About POOL_BYTES of random blocks of type t (uint8 [n_blocks, type_size]) with sane f16 scales."""
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    if t == T.BF16:
        return bf16_bits(rng.standard_normal(POOL_BYTES // 2, dtype=np.float32) * 0.02).view(np.uint8).reshape(-1, 2)
    n = POOL_BYTES // ts
    raw = rng.integers(0, 256, size=(n, ts), dtype=np.uint8)

    def f16(lo, hi):
        return rng.uniform(lo, hi, size=n).astype("<f2").view(np.uint8).reshape(n, 2)

    # Ranges chosen for a weight std of about 0.02, with every scale a normal (not subnormal) f16.
    if t == T.Q4_0:  # d @0, 16 bytes of nibbles: w = d * (q - 8), std(q - 8) ~ 4.6
        raw[:, 0:2] = f16(0.002, 0.006)
    elif t == T.Q8_0:  # d @0, 32 x i8: std(q) ~ 74
        raw[:, 0:2] = f16(0.0001, 0.0004)
    elif t == T.Q4_K:  # d @0, dmin @2, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles: w = d*sc*q - dmin*m;
        raw[:, 0:2] = f16(0.000065, 0.00015)  # dmin = 7.5 d on average centres w (q averages 7.5, sc and m alike)
        raw[:, 2:4] = f16(0.00049, 0.0011)
    elif t == T.Q6_K:  # ql[128], qh[64], 16 x i8 scales, d @208: w = d * sc * (q - 32)
        raw[:, 192:208] = rng.integers(-8, 9, size=(n, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = f16(0.0001, 0.0002)
    else:
        raise ValueError(t)
    return raw


def random_data(rng, pools, t, shape):
    """The raw bytes of one tensor (uint8 [.., rows, row_bytes]) from the pool of its type."""
    if t == T.F32:
        return None
    if t not in pools:
        pools[t] = block_pool(rng, t)
    pool = pools[t]
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    nblk = int(np.prod(shape)) // bs
    out = np.empty((nblk, ts), dtype=np.uint8)
    pos, src = 0, int(rng.integers(0, len(pool)))
    while pos < nblk:
        k = min(nblk - pos, len(pool) - src)
        out[pos:pos + k] = pool[src:src + k]
        pos, src = pos + k, 0
    return out.reshape(*shape[:-1], shape[-1] // bs * ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("type", choices=sorted(FTYPES))
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, help="write only the first N layers (block_count N): quick load checks")
    ap.add_argument("--pure", action="store_true", help="every matrix the nominal type (llama-quantize --pure)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--assets", default=os.environ.get("FUSEBOX_ASSETS", os.path.expanduser("~/.cache/fusebox/assets")))
    a = ap.parse_args()
    cfg = SHAPES[a.shape]
    tok_dir = os.path.join(a.assets, "qwen3-tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        sys.exit(f"error: {tok_dir}/tokenizer.json not found (run scripts/fetch-assets.sh)")
    if os.path.exists(a.out):
        sys.exit(f"error: {a.out} already exists")
    n_layer = a.layers or cfg["num_hidden_layers"]
    moe = bool(cfg.get("num_experts"))
    arch = "qwen3moe" if moe else "qwen3"
    tied = cfg["tie_word_embeddings"]
    t0 = time.time()

    tmp = a.out + ".partial"
    wr = gguf.GGUFWriter(tmp, arch)
    label = f"{a.shape} {a.type}{' pure' if a.pure else ''}{f' {n_layer} layers' if a.layers else ''}"
    wr.add_type("model")
    wr.add_name(f"fusebox synthetic {label} (random weights)")
    wr.add_description("random weights of the real shape for speed measurements (tools/synthetic/make_gguf.py)")
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_block_count(n_layer)
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(cfg["num_attention_heads"])
    wr.add_head_count_kv(cfg["num_key_value_heads"])
    wr.add_rope_freq_base(float(cfg["rope_theta"]))
    wr.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    wr.add_key_length(cfg["head_dim"])
    wr.add_value_length(cfg["head_dim"])
    if moe:
        wr.add_expert_count(cfg["num_experts"])
        wr.add_expert_used_count(cfg["num_experts_per_tok"])
        wr.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    wr.add_file_type(FTYPES[a.type][1])
    wr.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_meta(wr, tok_dir, cfg, "qwen2")

    plan = []
    for name, shape in tensors_of(cfg, n_layer):
        t = tensor_type(name, len(shape), shape[-1], a.type, n_layer, tied, a.pure)
        bs, ts = gguf.GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(shape)) // bs * ts
        if t == T.F32:
            wr.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:
            wr.add_tensor_info(name, (*shape[:-1], shape[-1] // bs * ts), np.dtype(np.uint8), nbytes, raw_dtype=t)
        plan.append((name, shape, t, nbytes))
    total = sum(p[3] for p in plan)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_ti_data_to_file()

    rng = np.random.default_rng(a.seed)
    pools, done, shown = {}, 0, 0.0
    for name, shape, t, nbytes in plan:
        if t == T.F32:
            if "ffn_gate_inp" in name:
                x = rng.standard_normal(shape, dtype=np.float32) * 0.02
            else:
                x = np.ones(shape, dtype=np.float32)
        else:
            x = random_data(rng, pools, t, shape)
        wr.write_tensor_data(x)
        done += nbytes
        if time.time() - shown > 5 or done == total:
            shown = time.time()
            print(f"  {done / 1e9:.2f}/{total / 1e9:.2f} GB", file=sys.stderr, flush=True)
    wr.close()
    os.rename(tmp, a.out)
    counts = {}
    for name, shape, t, nbytes in plan:
        c = counts.setdefault(t.name, [0, 0])
        c[0] += 1
        c[1] += nbytes
    mix = ", ".join(f"{k} {n} tensors {b / 1e9:.2f} GB" for k, (n, b) in sorted(counts.items()))
    print(f"wrote {a.out} ({label}, {os.path.getsize(a.out) / 1e9:.2f} GB: {mix}) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
