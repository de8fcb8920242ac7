"""Whole-model prefill on the GPU: te FP8 (each recipe given) vs the bf16 control, same model, same run.

Linear layers only differ; norms, RoPE and attention run in fp32 on the GPU for both. Weights are moved and
(for te) wrapped in te.Linear once during a warm-up forward; the median of the timed forwards is reported.

    python benchmarks/prefill_bench.py --model 7b.gguf --tokens 128 --recipes current,block
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fp8parity.backends import make_backend
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import Qwen2Model


def timed(model: Qwen2Model, ids: list[int], repeats: int) -> float:
    model.prefill(ids, logits_for="last")  # warm-up: weights to the GPU, te modules built
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.prefill(ids, logits_for="last")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--recipes", default="current")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    g = GGUFModel(args.model)
    ids = torch.randint(0, g.config.vocab, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for name, recipe in [("bf16", "current")] + [("te", r) for r in args.recipes.split(",")]:
        torch.cuda.reset_peak_memory_stats()
        model = Qwen2Model(g, backend=make_backend(name, recipe))
        sec = timed(model, ids, args.repeats)
        rows.append({"backend": name, "recipe": recipe if name == "te" else "-", "tokens": args.tokens,
                     "seconds": sec, "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9})
        del model
        torch.cuda.empty_cache()
    base = rows[0]["seconds"]
    print(f"card: {torch.cuda.get_device_name()}  model: {g.config.name}  prefill of {args.tokens} tokens")
    for r in rows:
        r["speed_vs_bf16"] = base / r["seconds"]
        print(f"{r['backend']:5} {r['recipe']:8} {r['seconds'] * 1e3:9.1f} ms   x{r['speed_vs_bf16']:.2f} vs bf16   "
              f"GPU peak {r['gpu_peak_gb']:.1f} GB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
