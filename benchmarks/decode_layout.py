"""A CPU decode step's GEMMs in three forms, side by side: the weight W (out, in) row-major (`F.linear(x, W)`, the
reference's), the same values stored transposed, (in, out) row-major (`x @ Wt`, which MKL streams instead of taking one
dot product per output: emulated-fp8's since 5e78c95), and fbgemm's fp16-weight GEMM of the same values (emulated-fp8's
one-row GEMMs since it was added: E4M3 values are exact in fp16, products and sums stay fp32). Same shapes as a model's
decode step (every layer's seven GEMMs and the lm_head, one row each), random weights rounded to E4M3, one thread by
default (a run-all's notebook gets one core). It also prints what making the fp16 copies costs, in decode steps: the
break-even behind emulated.COPY_AFTER_ONE_ROW_GEMMS.

It also reports, per row count, whether the layouts give the same bits as the transposed one: the stored one does for
the rows of a prefill (16 or more on the CPU VM, with one thread or two) and not for one row, so storing weights
transposed moved every CPU decode number by summation-order noise (stage F's default candidate then leaves the golden
output at a near-tie on the second prompt, at token 36, where the reference's margin is 0.27 logits: excused; see the
README's CPU section); fbgemm's does for one row, so emulated-fp8 uses it only there.

    python benchmarks/decode_layout.py                     # the default model's shapes
    python benchmarks/decode_layout.py --model some.gguf   # another qwen2 GGUF's shapes (no weights read)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from fp8parity import fp8
from fp8parity.backends.emulated import fp16_copy, one_row_gemm
from fp8parity.config import RunConfig
from fp8parity.gguf_file import GGUFModel

ROWS = (1, 2, 3, 4, 8, 16, 36, 512)


def decode_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of every GEMM of one decode step: q, k, v, o, gate, up, down per layer, then the lm_head."""
    h, kv, ffn = cfg.hidden, cfg.n_kv_heads * cfg.head_dim, cfg.ffn
    return [(h, h), (kv, h), (kv, h), (h, h), (ffn, h), (ffn, h), (h, ffn)] * cfg.n_layers + [(cfg.vocab, h)]


def e4m3_values(w: torch.Tensor) -> torch.Tensor:
    """w rounded to E4M3 with its per-tensor scale and scaled back onto the grid's values (kept as fp32)."""
    return fp8.quantize(w, fp8.scale_from_amax(fp8.amax_tensor(w))).to(torch.float32)


def step_seconds(weights: list, inputs: dict[int, torch.Tensor], form: str) -> float:
    t0 = time.perf_counter()
    for w in weights:
        if form == "transposed":
            inputs[w.shape[0]] @ w
        elif form == "fp16":
            one_row_gemm(inputs[w[1]], w[0])
        else:
            F.linear(inputs[w.shape[1]], w)
    return time.perf_counter() - t0


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
    weights = [e4m3_values(torch.randn(o, i, generator=gen)) for o, i in decode_shapes(cfg)]
    transposed = [w.t().contiguous() for w in weights]
    t0 = time.perf_counter()
    fp16 = [(fp16_copy(wt.t()), wt.shape[0]) for wt in transposed]  # made as emulated-fp8 makes them
    copy_s = time.perf_counter() - t0
    inputs = {n: e4m3_values(torch.randn(1, n, generator=gen)) for n in {i for _, i in decode_shapes(cfg)}}
    gbytes = sum(w.numel() * 4 for w in weights) / 1e9
    rounds = []
    for _ in range(3):  # interleaved, so that a slow spell of the machine hits all three
        a = min(step_seconds(weights, inputs, "stored") for _ in range(args.repeats))
        b = min(step_seconds(transposed, inputs, "transposed") for _ in range(args.repeats))
        c = min(step_seconds(fp16, inputs, "fp16") for _ in range(args.repeats))
        rounds.append({"stored_ms": a * 1e3, "transposed_ms": b * 1e3, "fp16_ms": c * 1e3, "ratio": a / b,
                       "transposed_over_fp16": b / c, "copy_in_steps": copy_s / (b - c)})
        print(f"decode step ({gbytes:.2f} GB of fp32 weights): stored (out, in) {a * 1e3:.1f} ms = {gbytes / a:.1f} GB/s, "
              f"transposed (in, out) {b * 1e3:.1f} ms = {gbytes / b:.1f} GB/s: {a / b:.2f}x; fbgemm fp16 "
              f"{c * 1e3:.1f} ms: {b / c:.2f}x the transposed; making the fp16 copies took {copy_s:.2f} s = "
              f"{copy_s / (b - c):.0f} steps' gain", flush=True)
    same = {}
    for w, wt, w16 in zip(weights[:7] + weights[-1:], transposed[:7] + transposed[-1:], fp16[:7] + fp16[-1:],
                          strict=True):
        for rows in ROWS:
            x = e4m3_values(torch.randn(rows, w.shape[1], generator=gen))
            y = x @ wt
            same.setdefault(rows, [True, True])
            same[rows][0] &= torch.equal(F.linear(x, w), y)
            same[rows][1] &= torch.equal(one_row_gemm(x, w16[0]), y)
    yes = {True: "yes", False: "no"}
    print("same bits as the transposed layout, by rows (stored, fbgemm fp16):",
          ", ".join(f"{r}: {yes[s]}, {yes[h]}" for r, (s, h) in same.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": cfg.name, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                       "torch": torch.__version__, "weights_gb": gbytes, "fp16_copy_s": copy_s,
                       "rounds": rounds, "same_bits_by_rows": same}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
