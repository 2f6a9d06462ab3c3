#!/usr/bin/env python3
"""Write a random-weight Hugging Face checkpoint with the exact shapes of a
real model, for speed measurements (decode speed does not depend on the
weight values).

    python3 tools/synthetic/make_checkpoint.py qwen3-0.6b OUT_DIR [--dtype bf16]

Shapes come from the models' published config.json files (see
shared/reference.md). The tokenizer is the real Qwen3 one from the assets
cache (scripts/fetch-assets.sh), so prompts tokenize as they would for the
real model. Needs numpy (pip install numpy).
The output directory is written under a temporary name and renamed at the
end, so an interrupted run leaves nothing half-written.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np

SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960),
}


def bf16_bits(x):
    """float32 array -> uint16 bfloat16 bits (round to nearest even)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors, dtype):
    """The safetensors layout: u64 header length, JSON header, then the data."""
    header, off = {}, 0
    for k, t in tensors.items():
        header[k] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--assets", default=os.environ.get("FUSEBOX_ASSETS", os.path.expanduser("~/.cache/fusebox/assets")))
    a = ap.parse_args()
    cfg = dict(SHAPES[a.shape])
    tok_dir = os.path.join(a.assets, "qwen3-tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        sys.exit(f"error: {tok_dir}/tokenizer.json not found (run scripts/fetch-assets.sh)")
    if os.path.exists(a.out):
        sys.exit(f"error: {a.out} already exists")
    tmp = a.out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rng = np.random.default_rng(0)
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def w(*shape, std=0.02):
        x = rng.standard_normal(shape, dtype=np.float32) * std
        return bf16_bits(x).view(np.float16) if a.dtype == "bf16" else x  # bf16 bits carried as 2-byte words

    tensors = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": w(d, std=0) + 0}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors.update({
            f"{p}.input_layernorm.weight": w(d, std=0), f"{p}.post_attention_layernorm.weight": w(d, std=0),
            f"{p}.self_attn.q_proj.weight": w(nh * hd, d), f"{p}.self_attn.k_proj.weight": w(nkv * hd, d),
            f"{p}.self_attn.v_proj.weight": w(nkv * hd, d), f"{p}.self_attn.o_proj.weight": w(d, nh * hd),
            f"{p}.self_attn.q_norm.weight": w(hd, std=0), f"{p}.self_attn.k_norm.weight": w(hd, std=0),
            f"{p}.mlp.gate_proj.weight": w(ff, d), f"{p}.mlp.up_proj.weight": w(ff, d), f"{p}.mlp.down_proj.weight": w(d, ff),
        })
        print(f"\rlayer {i + 1}/{cfg['num_hidden_layers']}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = w(v, d)
    # norms are ones
    one = bf16_bits(np.ones(1, np.float32))[0] if a.dtype == "bf16" else 1.0
    for k in tensors:
        if k.endswith("norm.weight"):
            tensors[k] = np.full(tensors[k].shape, one, dtype=tensors[k].dtype)
    write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, "BF16" if a.dtype == "bf16" else "F32")
    cfg.update(architectures=["Qwen3ForCausalLM"], torch_dtype="bfloat16" if a.dtype == "bf16" else "float32",
               bos_token_id=151643, eos_token_id=151645, attention_bias=False)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(tok_dir, name), tmp)
    os.rename(tmp, a.out)
    print(f"wrote {a.out} ({a.shape}, {a.dtype}, {sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
