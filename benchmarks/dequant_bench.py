"""Dequantization throughput, ours vs gguf-py's numpy `dequantize`, over every tensor of a GGUF (side by side).

Two gguf-py baselines, run in turn with ours, pass by pass (one side over all tensors, then the next), best of
N rounds, so that this VM's drifting speed hits all alike (tensor by tensor interleaving would hand each side
the other's cache and page-table debris: gguf-py frees ~2.5 GB per pass):
* "gguf": what a user calling gguf-py gets: `GGUFReader(path).tensors[i].data` (an np.memmap) into
  `gguf.quants.dequantize`, which allocates its output (the setting of the issue's "about 6.5 s here");
* "gguf-plain": the same function on a plain ndarray view of the same mapping (how our loader holds it),
  gguf-py's best case: its numpy ops skip np.memmap's per-result bookkeeping.
Ours writes into one reused buffer (how the streaming loader calls it); the buffer's first touch counts in
pass 1, since fresh memory costs ~2 s/GB on these machines. Prints MB/s of float32 output per quant type,
and the ratios.

    python benchmarks/dequant_bench.py --model data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict

import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from fp8parity.dequant import dequantize
from fp8parity.gguf_file import GGUFModel

SIDES = ("gguf", "gguf-plain", "ours")


def one_pass(side: str, stock, tensors, buf) -> dict[str, float]:
    """Seconds per quant type for one side's pass over all tensors."""
    took: dict[str, float] = defaultdict(float)
    for st, t in zip(stock, tensors, strict=True):
        t0 = time.perf_counter()
        if side == "gguf":
            gguf_dequantize(st.data, st.tensor_type)
        elif side == "gguf-plain":
            gguf_dequantize(t.data, t.tensor_type)
        else:
            dequantize(t.data, t.tensor_type, int(t.n_elements), out=buf)
        took[t.tensor_type.name] += time.perf_counter() - t0
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each side keeps its best pass")
    args = ap.parse_args()
    m = GGUFModel(args.model)
    stock = GGUFReader(args.model)  # gguf-py as a user opens it (np.memmap tensor data)
    with open(args.model, "rb") as f:  # into the page cache first, so that no side pays for the disk
        while f.read(1 << 24):
            pass
    tensors = list(m.tensors.values())
    assert [t.name for t in stock.tensors] == [t.name for t in tensors]
    buf = torch.empty(max(int(t.n_elements) for t in tensors))  # reused; its first touch counts in pass 1
    nbytes: dict[str, int] = defaultdict(int)
    for t in tensors:
        nbytes[t.tensor_type.name] += int(t.n_elements) * 4
    best = {s: defaultdict(lambda: 1e9) for s in SIDES}
    first: dict[str, float] = {}  # each side's first pass: for ours, the buffer's first touch included
    for _ in range(args.repeats):
        for s in SIDES:
            took = one_pass(s, stock.tensors, tensors, buf)
            first.setdefault(s, sum(took.values()))
            for q, sec in took.items():
                best[s][q] = min(best[s][q], sec)

    print(f"machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"model {m.path.name}; MB/s of float32 output, best of {args.repeats} passes")
    print(f"{'type':6} {'tensors':>7} {'MB out':>7} {'gguf':>7} {'gguf-plain':>10} {'ours':>7} {'vs gguf':>8} {'vs plain':>8}")
    for q in sorted(nbytes, key=lambda k: -nbytes[k]):
        n = sum(1 for t in tensors if t.tensor_type.name == q)
        mb = nbytes[q] / 1e6
        g, p, o = best["gguf"][q], best["gguf-plain"][q], best["ours"][q]
        print(f"{q:6} {n:7d} {mb:7.0f} {mb / g:7.0f} {mb / p:10.0f} {mb / o:7.0f} {g / o:7.1f}x {p / o:7.1f}x")
    tot = {s: sum(best[s].values()) for s in SIDES}
    mb = sum(nbytes.values()) / 1e6
    print(f"{'all':6} {len(tensors):7d} {mb:7.0f} {mb / tot['gguf']:7.0f} {mb / tot['gguf-plain']:10.0f} "
          f"{mb / tot['ours']:7.0f} {tot['gguf'] / tot['ours']:7.1f}x {tot['gguf-plain'] / tot['ours']:7.1f}x")
    print(f"best pass: gguf {tot['gguf']:.2f} s, gguf-plain {tot['gguf-plain']:.2f} s, ours {tot['ours']:.2f} s")
    print(f"first pass of each side (fresh memory counted, file in the page cache): gguf {first['gguf']:.2f} s, "
          f"gguf-plain {first['gguf-plain']:.2f} s, ours {first['ours']:.2f} s: "
          f"{first['gguf'] / first['ours']:.1f}x, {first['gguf-plain'] / first['ours']:.1f}x")


if __name__ == "__main__":
    main()
