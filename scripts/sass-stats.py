#!/usr/bin/env python3
"""Instruction mix of a kernel's loops, from its SASS, without a GPU.

    FUSEBOX_CUBIN_DIR=/tmp/cubin cargo test --release -p fusebox-core --test cuda_compile every_kernel_file
    scripts/sass-stats.py /tmp/cubin/gemv.cubin gemv_q4_m1 [--values N]

Needs nvdisasm (PyPI: `pip download --no-deps nvidia-cuda-nvdisasm`, unzip; NVDISASM=path, or on PATH).
Prints the kernel's opcode counts and, for each loop (a backward branch to a label), its length and opcode
mix, largest first. With --values N (the weight values one warp consumes in one pass of the hot loop, e.g.
4096 for gemv_q4_m1: 4 rows x 32 lanes x 32 values; 4096 for qmm4_g64_n1: 4 steps x 16 rows x 64), also warp
instructions per value and the bound that issue puts on the kernel: an SM issues at most 4 warp instructions a
cycle (one a scheduler), so it consumes at most 4 / (instructions a value) values a cycle; with --sms, --ghz
and --bytes (per value) that is a bandwidth (an H100 SXM: 132 SMs at about 1.83 GHz under load).
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

OP = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
BRANCH = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?BRA\b.*`\((\.L_x_\d+)\)")


def sass_of(cubin, kernel):
    tool = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if not tool:
        sys.exit("error: nvdisasm not found (set NVDISASM; PyPI nvidia-cuda-nvdisasm has it)")
    text = subprocess.run([tool, "-c", cubin], check=True, capture_output=True, text=True).stdout
    lines = text.split("\n")
    start = next((i for i, l in enumerate(lines) if l.strip() == f".text.{kernel}:"), None)
    if start is None:
        names = sorted({l.strip()[6:-1] for l in lines if l.strip().startswith(".text.")})
        sys.exit(f"error: no kernel {kernel} in {cubin} (it has: {', '.join(names)})")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(".text.")), len(lines))
    return lines[start:end]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cubin")
    ap.add_argument("kernel")
    ap.add_argument("--values", type=int, help="weight values one pass of the largest loop consumes")
    ap.add_argument("--top", type=int, default=14, help="opcodes to show a loop")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--ghz", type=float, default=1.83)
    ap.add_argument("--bytes", type=float, default=0.5625, help="weight bytes a value (4-bit, groups of 64: 0.5625)")
    a = ap.parse_args()
    lines = sass_of(a.cubin, a.kernel)
    ops = [(i, m.group(3)) for i, l in enumerate(lines) if (m := OP.match(l))]
    print(f"{a.kernel}: {len(ops)} instructions")
    print("  " + ", ".join(f"{o} {n}" for o, n in collections.Counter(o for _, o in ops).most_common(a.top)))
    labels = {l.strip()[:-1]: i for i, l in enumerate(lines) if re.match(r"\.L_x_\d+:$", l.strip())}
    loops = []
    for i, l in enumerate(lines):
        m = BRANCH.match(l)
        if m and labels.get(m.group(2), i) < i:
            body = [o for j, o in ops if labels[m.group(2)] < j <= i]
            loops.append((len(body), labels[m.group(2)], i, collections.Counter(body)))
    # innermost first among equals: a loop's count includes its inner loops'
    loops.sort(key=lambda t: -t[0])
    for n, a0, a1, mix in loops:
        print(f"loop at lines {a0}-{a1}: {n} instructions")
        print("  " + ", ".join(f"{o} {c}" for o, c in mix.most_common(a.top)))
    if a.values and loops:
        # the hot loop: the densest in math (FFMA/HMMA a instruction) among those with
        # a fair share of it, so that neither an outer loop around several copies
        # (a kernel may hold one per dtype) nor a small epilogue loop is taken
        math = lambda t: t[3]["FFMA"] + t[3]["HMMA"]
        most = max(math(t) for t in loops)
        hot = max((t for t in loops if math(t) * 4 >= most), key=lambda t: (math(t) / t[0], -t[0]))
        per = hot[0] / a.values
        vps = 4 / per * a.sms * a.ghz * 1e9
        print(f"hot loop (lines {hot[1]}-{hot[2]}): {hot[0]} warp instructions for {a.values} values = {per:.3f} a value;")
        print(f"  at full issue an SM consumes {4 / per:.1f} values a cycle: {vps / 1e12:.2f} T values/s, "
              f"{vps * a.bytes / 1e12:.2f} TB/s of weight ({a.sms} SMs, {a.ghz} GHz, {a.bytes} B a value)")


if __name__ == "__main__":
    main()
