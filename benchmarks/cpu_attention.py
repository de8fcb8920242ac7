"""A CPU prefill's attention, the two ways the workbook can run it, side by side: the textbook form (fp32 scores, masked
softmax, weighted sum) and torch's fused CPU kernel (flash attention, causal, one pass), by prompt length, with each
one's error against the textbook form in fp64. qwen2.attention takes the fused kernel from
CPU_FUSED_ATTENTION_MIN_TOKENS tokens: where it is faster, and its error is a correct fp32 attention's.

    python benchmarks/cpu_attention.py                 # the default model's heads, one thread (a run-all notebook's)
    python benchmarks/cpu_attention.py --threads 2 --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fp8parity.config import RunConfig
from fp8parity.gguf_file import GGUFModel
from fp8parity.metrics import rel_l2
from fp8parity.qwen2 import CPU_FUSED_ATTENTION_MIN_TOKENS, causal_mask, cpu_fused_attention, textbook_attention

TOKENS = (36, 64, 128, 256, 512, 1024)


def best_ms(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=RunConfig.model)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = GGUFModel(args.model).config
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in TOKENS:
        # scores of a real model's spread (q, k ~ 3: some heads nearly one-hot), values ~ 1
        q, k, v = (torch.randn(n, T, cfg.head_dim, generator=gen) * sd
                   for n, sd in ((cfg.n_heads, 3.0), (cfg.n_kv_heads, 3.0), (cfg.n_kv_heads, 1.0)))
        rep = cfg.n_heads // cfg.n_kv_heads
        ke, ve = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scale, mask = cfg.head_dim ** -0.5, causal_mask(T, T, 0, "cpu")
        exact = textbook_attention(q.double(), ke.double(), ve.double(), mask, scale)
        textbook = best_ms(lambda: textbook_attention(q, ke, ve, mask, scale), args.repeats)  # noqa: B023
        fused = best_ms(lambda: cpu_fused_attention(q, ke, ve, scale), args.repeats)  # noqa: B023
        row = {"tokens": T, "textbook_ms": textbook, "fused_ms": fused, "speedup": textbook / fused,
               "textbook_rel_l2": rel_l2(textbook_attention(q, ke, ve, mask, scale), exact),
               "fused_rel_l2": rel_l2(cpu_fused_attention(q, ke, ve, scale), exact)}
        rows.append(row)
        print(f"{T:5d} tokens: textbook {textbook:7.2f} ms, fused {fused:7.2f} ms ({row['speedup']:.2f}x); rel. L2 to "
              f"fp64: textbook {row['textbook_rel_l2']:.2e}, fused {row['fused_rel_l2']:.2e}", flush=True)
    print(f"qwen2.attention runs the fused kernel on a CPU from {CPU_FUSED_ATTENTION_MIN_TOKENS} tokens")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": cfg.name, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                       "torch": torch.__version__, "min_tokens": CPU_FUSED_ATTENTION_MIN_TOKENS, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
