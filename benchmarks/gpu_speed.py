"""GPU speed of every candidate, side by side in one run: prefill (36, 128, 2048 tokens), decode per token, CUDA time
from the profiler, and the ratio of wall time to CUDA time (how much of a forward is host overhead).

Speed needs only the shapes: pass the real model, or synthetic ones generated on the GPU host with the same shapes
(`--synthetic 0.5b,7b`). Ratios are against bf16, the alternative a user would pick, measured in the same process.

    python benchmarks/gpu_speed.py --synthetic 0.5b,7b --out benchmarks/results/gpu_speed_h200.json
    python benchmarks/gpu_speed.py --model data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fp8parity.backends import make_backend
from fp8parity.errors import WorkbookError
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import Qwen2Model
from fp8parity.trace import machine, versions
from fp8parity.workbench import calibrate

CANDIDATES = ("bf16", "bf16::eager", "te:current", "te:current:eager", "te:current:per-call", "te:block",
              "te:delayed-calibrated", "torch-fp8:current", "torch-fp8:rowwise")
PREFILL_TOKENS = (36, 128, 2048)
DECODE_TOKENS = 16  # decode steps timed after a 36-token prompt
SHAPES = {"0.5b": dict(n_layers=24, hidden=896, n_heads=14, n_kv_heads=2, ffn=4864),
          "7b": dict(n_layers=28, hidden=3584, n_heads=28, n_kv_heads=4, ffn=18944)}


def synthetic(name: str, folder: Path) -> Path:
    """A GGUF with the named model's shapes (random Q4_K weights, the tiny tokenizer padded to Qwen2.5's vocabulary)."""
    from fp8parity.models import SynthSpec, tiny_tokenizer, write_7b_shaped, write_f16_shaped

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"speed-{name}.gguf"
    if not path.is_file():
        spec = SynthSpec(**SHAPES[name], vocab=151936 if name == "0.5b" else 152064, context=32768, outlier_dim=408,
                         name=f"qwen2-{name}-shaped-synthetic")
        # the 7B's widths are multiples of Q4_K's 256-element blocks; the 0.5B's 896 is not: F16 matrices there
        (write_7b_shaped if name == "7b" else write_f16_shaped)(path, tiny_tokenizer(), spec)
    return path


def wall_ms(fn, repeats: int) -> float:
    fn()  # warm-up: weights to the GPU, modules built, FP8 weights quantized
    fn()  # the shape seen again: captured as a CUDA graph (where the candidate runs graphs), replayed from here on
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_ms(fn, top: int = 0) -> float:
    """Device time of one call, summed over every kernel the profiler saw; `top`: print the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    if top:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top), flush=True)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3


def decode_ms(model: Qwen2Model, prompt: list[int], steps: int, profile: bool = False) -> float:
    """Median wall time of one decode step (one token through the KV cache after the prompt's prefill); with
    `profile`, the device time of one step instead."""
    cache = model.new_cache(len(prompt) + steps)  # static on the GPU: the decode step replays as a CUDA graph
    model.forward(prompt, cache=cache, logits_for="last")
    times = []
    for i in range(steps):
        step = lambda i=i: model.forward([prompt[i % len(prompt)]], cache=cache, path="decode")  # noqa: E731
        if profile and i == steps - 1:
            return cuda_ms(step)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(model: Qwen2Model, vocab: int, repeats: int, prefill_tokens=PREFILL_TOKENS, top: int = 0) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for n in prefill_tokens:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        run = lambda ids=ids: model.prefill(ids, logits_for="last")  # noqa: E731
        out[f"prefill_{n}_ms"] = wall_ms(run, repeats)
        out[f"prefill_{n}_cuda_ms"] = cuda_ms(run, top if n == max(prefill_tokens) else 0)
        out[f"prefill_{n}_wall_over_cuda"] = out[f"prefill_{n}_ms"] / out[f"prefill_{n}_cuda_ms"]
    prompt = torch.randint(0, vocab, (36,), generator=gen).tolist()
    decode_ms(model, prompt, 2)  # warm-up
    out["decode_ms_per_token"] = decode_ms(model, prompt, DECODE_TOKENS)
    out["decode_cuda_ms_per_token"] = decode_ms(model, prompt, 2, profile=True)
    out["decode_wall_over_cuda"] = out["decode_ms_per_token"] / out["decode_cuda_ms_per_token"]
    return out


def build(g: GGUFModel, candidate: str, weights) -> Qwen2Model:
    """backend[:recipe][:per-call|eager]. per-call: the te path as it was (weights re-quantized and autocast entered
    on every linear call); eager: no CUDA graphs (every forward launched op by op). Both kept for the side-by-side."""
    name, recipe, mode = (candidate.split(":") + ["", ""])[:3]
    if name == "te":
        from fp8parity.backends.gpu import TEBackend

        per_call = mode == "per-call"
        backend = TEBackend(recipe or "current", cache_weights=not per_call, one_autocast=not per_call)
    else:
        backend = make_backend(name, recipe or "current")
    return Qwen2Model(g, backend=backend, weights=weights, cuda_graphs=mode != "eager")  # weights dequantized once


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="a qwen2 GGUF (repeatable)")
    ap.add_argument("--synthetic", default="", help="comma-separated shapes to generate: 0.5b,7b")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default="data/cache", help="where synthetic models are written")
    ap.add_argument("--out", default="")
    ap.add_argument("--top-kernels", type=int, default=0, help="print the N costliest kernels of the longest prefill")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: gpu_speed needs a CUDA GPU; run it on the GPU host.", file=sys.stderr)
        return 2
    models = [Path(m) for m in a.model] + [synthetic(s, Path(a.cache)) for s in a.synthetic.split(",") if s]
    rows = []
    for path in models:
        g, weights = GGUFModel(path), None
        for cand in a.candidates.split(","):
            try:
                model = build(g, cand, weights)
                weights = model.weights
                model.backend.collect_stats = False
                calibrate(model, list(range(100, 136)))  # delayed-calibrated: scales from one prompt; others: nothing
                row = {"model": path.name, "shapes": f"{g.config.n_layers}x{g.config.hidden}", "candidate": cand}
                rows.append(row | measure(model, g.config.vocab, a.repeats, top=a.top_kernels))
            except WorkbookError as exc:
                rows.append({"model": path.name, "candidate": cand, "error": str(exc)})
            print(json.dumps(rows[-1]), flush=True)
            del model
            torch.cuda.empty_cache()
    report(rows)
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": machine(), "versions": versions(), "rows": rows}, indent=2))
    return 0


def report(rows: list[dict]) -> None:
    print(f"\ncard: {torch.cuda.get_device_name()}; versions: {versions()}")
    base = {r["model"]: r for r in rows if r["candidate"] == "bf16" and "error" not in r}
    cols = ["prefill_36_ms", "prefill_128_ms", "prefill_2048_ms", "prefill_2048_wall_over_cuda", "decode_ms_per_token"]
    print(f"{'model':28} {'candidate':22} " + " ".join(f"{c:>16}" for c in cols) + f" {'2048 vs bf16':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:28} {r['candidate']:22} {r['error']}")
            continue
        b = base.get(r["model"])
        ratio = b["prefill_2048_ms"] / r["prefill_2048_ms"] if b else float("nan")
        print(f"{r['model']:28} {r['candidate']:22} " + " ".join(f"{r[c]:16.2f}" for c in cols) + f" {ratio:12.2f}x")


if __name__ == "__main__":
    sys.exit(main())
