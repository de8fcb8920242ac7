"""Dequantization throughput, ours vs gguf-py's numpy `dequantize`, over every tensor of a GGUF (side by side).

Ours writes into one reused buffer (how the streaming loader calls it; the buffer is touched once first,
since fresh memory costs ~2 s/GB on these machines); gguf-py allocates its output, as a user calling it would.
Prints MB/s of float32 output per quant type for both and the ratio.

    python benchmarks/dequant_bench.py --model data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict

import torch
from gguf.quants import dequantize as gguf_dequantize

from fp8parity.dequant import dequantize
from fp8parity.gguf_file import GGUFModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeats", type=int, default=2, help="best of N passes over all tensors")
    args = ap.parse_args()
    m = GGUFModel(args.model)
    with open(args.model, "rb") as f:  # into the page cache first, so that neither side pays for the disk
        while f.read(1 << 24):
            pass
    tensors = list(m.tensors.values())
    buf = torch.empty(max(int(t.n_elements) for t in tensors))  # reused; its first touch counts in pass 1
    ours, theirs, nbytes = defaultdict(lambda: 1e9), defaultdict(lambda: 1e9), defaultdict(int)
    first: dict[str, float] = {}  # pass 1: what one call over the model costs in a fresh process
    for t in tensors:
        nbytes[t.tensor_type.name] += int(t.n_elements) * 4
    for _ in range(args.repeats):
        o, g = defaultdict(float), defaultdict(float)
        for t in tensors:
            q = t.tensor_type.name
            t0 = time.perf_counter()
            gguf_dequantize(t.data, t.tensor_type)
            t1 = time.perf_counter()
            dequantize(t.data, t.tensor_type, int(t.n_elements), out=buf)
            t2 = time.perf_counter()
            g[q] += t1 - t0
            o[q] += t2 - t1
        if not first:
            first = {"gguf": sum(g.values()), "ours": sum(o.values())}
        for q in o:
            ours[q], theirs[q] = min(ours[q], o[q]), min(theirs[q], g[q])
    print(f"machine: {platform.node()} {platform.machine()}, torch threads {torch.get_num_threads()}, model {m.path.name}")
    print(f"{'type':6} {'tensors':>7} {'MB out':>8} {'gguf MB/s':>10} {'ours MB/s':>10} {'ratio':>7}")
    for q in sorted(nbytes, key=lambda k: -nbytes[k]):
        n = sum(1 for t in tensors if t.tensor_type.name == q)
        mb = nbytes[q] / 1e6
        print(f"{q:6} {n:7d} {mb:8.0f} {mb / theirs[q]:10.0f} {mb / ours[q]:10.0f} {theirs[q] / ours[q]:6.1f}x")
    tg, to = sum(theirs.values()), sum(ours.values())
    mb = sum(nbytes.values()) / 1e6
    print(f"{'all':6} {len(tensors):7d} {mb:8.0f} {mb / tg:10.0f} {mb / to:10.0f} {tg / to:6.1f}x   "
          f"(best pass: gguf {tg:.2f} s, ours {to:.2f} s)")
    print(f"first pass in this process: gguf {first['gguf']:.2f} s, ours {first['ours']:.2f} s, "
          f"{first['gguf'] / first['ours']:.1f}x (fresh memory included; file already in the page cache)")


if __name__ == "__main__":
    main()
