#!/usr/bin/env python3
"""The markdown record of a peer benchmark (scripts/peer-bench.sh): fusebox
against llama.cpp's llama-bench on the same GGUF files, one table of ratios.

    python3 tools/synthetic/peer_table.py DATA_DIR [DATA_DIR ...] > RECORD.md

Each DATA_DIR holds meta.json (machine, versions, commands) and one folder per
model row: model.json (what the row is), llama-N.json (llama-bench -o json of
round N), fusebox-N.json (fusebox bench's JSON of round N) and skip.txt (why a
side did not run). Several DATA_DIRs (say, one per GPU call) are merged; the
first one's meta.json heads the record, and the others' are listed if they
differ.

Speeds are medians over all repetitions of all rounds, leaving out the first
repetition of every invocation (llama-bench's first pp512 repetition is 25-60%
slow; fusebox's first is treated the same way). Needs only the standard library.
"""
import argparse
import json
import os
import statistics
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def rest(samples):
    """All but the first repetition of one invocation (all, if there is only one)."""
    return list(samples[1:]) if len(samples) > 1 else list(samples)


def llama_samples(row_dir):
    """pp and tg tokens/s samples of llama-bench over the rounds of one row, and the
    depth the tg samples were taken at. llama-bench's tg test generates from an
    empty context unless run with `-d`; fusebox decodes after its prompt, so runs
    with `-d 0,PROMPT_LEN` compare tg at depth PROMPT_LEN (pp at depth 0) and older
    runs, which have only depth 0, compare tg at depth 0."""
    tests = []
    for f in sorted(os.listdir(row_dir)):
        if f.startswith("llama-") and f.endswith(".json"):
            tests += load(os.path.join(row_dir, f))
    info = tests[-1] if tests else {}
    tg_depths = [t.get("n_depth", 0) for t in tests if t["n_prompt"] == 0 and t["n_gen"] > 0]
    tg_depth = max(tg_depths, default=0)
    pp, tg = [], []
    for t in tests:
        depth = t.get("n_depth", 0)
        if t["n_gen"] == 0 and t["n_prompt"] > 0 and depth == 0:
            pp += rest(t["samples_ts"])
        elif t["n_prompt"] == 0 and t["n_gen"] > 0 and depth == tg_depth:
            tg += rest(t["samples_ts"])
    return pp, tg, dict(info, tg_depth=tg_depth)


def fusebox_samples(row_dir):
    pp, tg, info = [], [], {}
    for f in sorted(os.listdir(row_dir)):
        if f.startswith("fusebox-") and f.endswith(".json"):
            r = load(os.path.join(row_dir, f))
            info = r
            pp += rest(r["prefill_tok_s"]["runs"])
            tg += rest(r["decode_tok_s"]["runs"])
    return pp, tg, info


SHAPE_ORDER = ["smollm2-135m", "qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b"]
TYPE_ORDER = ["bf16", "q8_0", "q8_0-pure", "q4_0", "q4_0-pure", "q4_k_m", "q4_k_m-pure", "q4_1", "mlx-q8g64", "mlx-q4g64"]


def row_key(label):
    """Rows by model size, then format (a row of an unknown name goes last)."""
    for i, shape in enumerate(SHAPE_ORDER):
        if label.startswith(shape + "-"):
            rest_ = label[len(shape) + 1:]
            return (i, TYPE_ORDER.index(rest_) if rest_ in TYPE_ORDER else len(TYPE_ORDER), label)
    return (len(SHAPE_ORDER), 0, label)


def med(v):
    return statistics.median(v) if v else None


def num(x):
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def spread(v):
    return f"{num(med(v))} ({num(min(v))}-{num(max(v))}, n={len(v)})" if v else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+")
    ap.add_argument("--title", help="the record's heading (default: from meta.json)")
    a = ap.parse_args()

    metas, rows = [], {}
    for d in a.data:
        metas.append(load(os.path.join(d, "meta.json")))
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if os.path.isfile(os.path.join(p, "model.json")):
                m = load(os.path.join(p, "model.json"))
                lpp, ltg, linfo = llama_samples(p)
                fpp, ftg, finfo = fusebox_samples(p)
                skip = open(os.path.join(p, "skip.txt")).read().strip() if os.path.exists(os.path.join(p, "skip.txt")) else ""
                rows[m["label"]] = dict(m=m, lpp=lpp, ltg=ltg, linfo=linfo, fpp=fpp, ftg=ftg, finfo=finfo, skip=skip)
    if not metas:
        sys.exit("no data")
    meta = metas[0]
    order = sorted(rows, key=row_key)

    out = []
    w = out.append
    w(f"# {a.title or meta['title']}")
    w("")
    w(f"- Machine: {meta['machine']}")
    fb = {m["fusebox"]["commit"] for m in metas}
    w(f"- fusebox: commit {', '.join(sorted(fb))} ({meta['fusebox']['bin']}; {meta['fusebox']['note']})")
    w(f"- llama.cpp: {meta['llama_cpp']['version']}; built with `{meta['llama_cpp']['build']}`")
    w(f"- Date: {', '.join(sorted({m['date'] for m in metas}))}")
    w(f"- Method: {meta['method']}")
    w("- Commands, per model row (FILE the row's GGUF file; OUT a fresh folder per round):")
    w("")
    w("      " + meta["commands"]["llama"])
    w("      " + meta["commands"]["fusebox"])
    if meta["commands"].get("mlx"):
        w("      " + meta["commands"]["mlx"])
    w("")
    w(f"  with the whole run started as `{meta['commands']['script']}`.")
    for m in metas[1:]:
        if m["machine"] != meta["machine"]:
            w(f"- Also: {m['machine']} ({m['date']})")
    w("")
    pl, gen = meta["prompt_len"], meta["gen"]
    depths = {r["linfo"].get("tg_depth", 0) for r in rows.values() if r["ltg"]}
    depth = max(depths, default=0)
    tgname = f"tg{gen} @ d{depth}" if depth else f"tg{gen}"
    w("Tokens/s, medians; ratio = fusebox / llama.cpp (above 1: fusebox is faster).")
    if depth:
        w(f"Decode on both sides is measured after {depth} tokens of context: fusebox decodes after its")
        w(f"{pl}-token prompt, and llama-bench runs its tg{gen} test at depth {depth} (`-d 0,{depth}`; its pp")
        w("test is taken at depth 0).")
    else:
        w(f"llama-bench's tg{gen} decodes from an empty context while fusebox decodes after its {pl}-token")
        w("prompt (longer attention per token): this table favours llama.cpp's decode column; newer runs")
        w("measure llama.cpp at fusebox's depth.")
    w("")
    w(f"| model | fusebox decode | llama.cpp {tgname} | ratio | fusebox pp{pl} | llama.cpp pp{pl} | ratio |")
    w("|---|---|---|---|---|---|---|")
    notes = []
    for lbl in order:
        r = rows[lbl]
        m = r["m"]
        if m.get("vs"):  # an MLX row: compared with the llama.cpp numbers of its GGUF counterpart
            peer = rows.get(m["vs"])
            lpp, ltg = (peer["lpp"], peer["ltg"]) if peer else ([], [])
            name = f"{m['title']} (vs llama.cpp {peer['m']['title'] if peer else m['vs'] + ', not run'})"
        else:
            lpp, ltg, name = r["lpp"], r["ltg"], m["title"]
        fd, ld, fp, lp = med(r["ftg"]), med(ltg), med(r["fpp"]), med(lpp)
        w(f"| {name} | {num(fd)} | {num(ld)} | {ratio(fd, ld)} | {num(fp)} | {num(lp)} | {ratio(fp, lp)} |")
        if r["skip"]:
            notes.append(f"- {m['title']}: {r['skip']}")
    w("")
    if notes:
        w("Not measured:")
        w("")
        out.extend(notes)
        w("")
    w("## Spread: median (min-max, samples)")
    w("")
    w(f"| model | fusebox decode | llama.cpp {tgname} | fusebox pp{pl} | llama.cpp pp{pl} |")
    w("|---|---|---|---|---|")
    for lbl in order:
        r = rows[lbl]
        w(f"| {r['m']['title']} | {spread(r['ftg'])} | {spread(r['ltg'])} | {spread(r['fpp'])} | {spread(r['lpp'])} |")
    w("")
    w("## Files")
    w("")
    w("| model | file | bytes | tensor types | made with |")
    w("|---|---|---|---|---|")
    for lbl in order:
        m = rows[lbl]["m"]
        if m.get("file"):
            w(f"| {m['title']} | `{m['file']}` | {m['file_bytes']:,} | {m.get('mix', '-')} | {m.get('made', '-')} |")
    w("")
    li = next((r["linfo"] for r in rows.values() if r["linfo"]), {})
    fi = next((r["finfo"] for r in rows.values() if r["finfo"]), {})
    if li or fi:
        w("## As the programs reported themselves")
        w("")
        if li:
            w(f"- llama-bench: build_commit {li.get('build_commit')}, build_number {li.get('build_number')}, "
              f"backends {li.get('backends')}, cpu_info \"{li.get('cpu_info')}\", gpu_info \"{li.get('gpu_info')}\", "
              f"n_threads {li.get('n_threads')}, n_gpu_layers {li.get('n_gpu_layers')}, flash_attn {li.get('flash_attn')}, "
              f"type_k {li.get('type_k')}, n_batch {li.get('n_batch')}, n_ubatch {li.get('n_ubatch')}")
        if fi:
            graphs = "" if str(fi.get("backend", "")).startswith("cpu") else f", CUDA graphs {fi.get('cuda_graphs')}"
            w(f"- fusebox bench: device \"{fi.get('device')}\", backend {fi.get('backend')}, commit {fi.get('commit')}{graphs}")
        w("")
    w(f"Raw JSON: {meta.get('data_note', 'beside this record')}.")
    print("\n".join(out))


if __name__ == "__main__":
    main()
