#!/usr/bin/env python3
"""Insert FB_PROLOGUE(); as the first statement of every extern "C" __global__
kernel in the given .cu files that lacks it (see kernels/common.cuh)."""
import re, sys

for path in sys.argv[1:]:
    s = open(path).read()
    out, i = [], 0
    for m in re.finditer(r'extern\s+"C"\s+__global__', s):
        if m.start() < i:
            continue
        brace = s.index("{", m.end())
        out.append(s[i:brace + 1])
        rest = s[brace + 1:]
        if not rest.lstrip().startswith("FB_PROLOGUE();"):
            out.append("\n    FB_PROLOGUE();")
        i = brace + 1
    out.append(s[i:])
    open(path, "w").write("".join(out))
