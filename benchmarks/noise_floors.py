"""Measure stage B's noise floors: the local error between two correct implementations of each op class.

Three measurements, each per row (stage B judges every position) and reported as the largest over the model:
  * fp32 ops and the fp32 GEMM: the reference's own trace replayed in fp64 (error of a correct fp32 op against the
    exact result on the same inputs; two correct fp32 implementations differ by at most twice that);
  * bf16 GEMM: bf16 operands with fp32 sums vs fp64 sums, both rounded to bf16 (twice the largest difference);
  * FP8 GEMM: fast vs fp32 accumulation of the same E4M3 operands (the emulated model of Hopper's fast
    accumulation here; on a GPU host, every clean GPU candidate against its twin is the direct measurement).
Then each candidate given with --candidates runs clean, 2 prompts x both paths, and its largest local error per
op class is printed next to the floor: a clean candidate must stay within ALARM_FACTOR x floor.

    python benchmarks/noise_floors.py --model data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out floors.json
    python benchmarks/noise_floors.py --model M --candidates bf16,te:current,te:delayed-calibrated,te:block,\
torch-fp8:current,torch-fp8:current:fast,torch-fp8:rowwise --skip-cpu --out floors_h200.json          # on the GPU host
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd
import torch

from fp8parity import replay, twin
from fp8parity.backends import ReferenceBackend, make_backend
from fp8parity.backends.emulated import EmulatedFP8Backend
from fp8parity.config import DEFAULT_PROMPTS
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import Qwen2Model
from fp8parity.taps import Recorder
from fp8parity.tokenizer import GGUFTokenizer
from fp8parity.trace import machine, versions
from fp8parity.workbench import calibrate

PATHS = ("prefill", "decode")


def trace(model: Qwen2Model, ids: list[int], path: str) -> dict:
    rec = Recorder()
    model.run(ids, path, rec)
    return rec.tensors


def class_max(rows: pd.DataFrame) -> dict[str, float]:
    m = rows[rows.status == "measured"]
    return {k: float(v) for k, v in m.groupby("op_class").rel_l2.max().items()}


def merge_max(acc: dict, new: dict) -> dict:
    return {k: max(acc.get(k, 0.0), new.get(k, 0.0)) for k in set(acc) | set(new)}


class Exact(ReferenceBackend):
    """fp64 GEMMs with each weight converted once."""

    def __init__(self):
        super().__init__()
        self._w: dict[str, torch.Tensor] = {}

    def linear(self, x, w, b, key):
        if key not in self._w:
            self._w[key] = w.double()
        y = x.double() @ self._w[key].t()
        return y if b is None else y + b.double()


class FP64SumsBF16(twin.BF16Twin):
    """bf16 operands, fp64 sums, output rounded to bf16: a second correct bf16 GEMM."""

    def linear(self, x, w, b, key):
        if key not in self._w:
            self._w[key] = w.to(torch.bfloat16).double()
        y = x.to(torch.bfloat16).double() @ self._w[key].t()
        if b is not None:
            y = y + b.to(torch.bfloat16).double()
        return y.to(torch.bfloat16).to(x.dtype)


def cpu_floors(ref: Qwen2Model, prompts: list[list[int]]) -> dict:
    out: dict[str, dict] = {"fp32_vs_fp64": {}, "bf16_sums": {}, "fp8_fast_vs_fp32": {}}
    exact = replay.Replayer(ref, Exact(), "gemm-fp32", dtype=torch.float64)
    gemms = (*replay.GEMM_OPS, replay.LOGITS)
    for ids in prompts:
        for path in PATHS:
            t0 = time.perf_counter()
            tr = trace(ref, ids, path)
            out["fp32_vs_fp64"] = merge_max(out["fp32_vs_fp64"], class_max(exact.replay(tr, path, ids)))
            print(f"  fp32 vs fp64, {path}, {len(ids)} tokens: {time.perf_counter() - t0:.0f} s", flush=True)
    # bf16: a bf16 trace (the twin's own arithmetic) replayed with fp64 sums
    bf = Qwen2Model(ref.gguf, backend=twin.BF16Twin(), weights=ref.weights)
    other = replay.Replayer(ref, FP64SumsBF16(), "gemm-bf16")
    for ids in prompts:
        for path in PATHS:
            rows = other.replay(trace(bf, ids, path), path, ids, ops=gemms)
            out["bf16_sums"] = merge_max(out["bf16_sums"], class_max(rows))
    # FP8: a trace with fp32 accumulation replayed with the fast-accumulation model (prefill of the first prompt:
    # the model loops over K in chunks of 32, too slow for every decode step on a CPU)
    for g in ("tensor", "rowwise", "block"):
        cand = Qwen2Model(ref.gguf, backend=EmulatedFP8Backend(g, collect_stats=False), weights=ref.weights)
        fast = replay.Replayer(ref, EmulatedFP8Backend(g, accumulate="fast", collect_stats=False), "gemm-fp8")
        rows = fast.replay(trace(cand, prompts[0], "prefill"), "prefill", prompts[0], ops=gemms)
        out["fp8_fast_vs_fp32"][g] = class_max(rows).get("gemm-fp8", 0.0)
        print(f"  fp8 fast vs fp32 accumulation, {g}: {out['fp8_fast_vs_fp32'][g]:.3g}", flush=True)
    return out


def candidate_errors(ref: Qwen2Model, name: str, recipe: str, prompts: list[list[int]], fast: bool = False) -> dict:
    backend = make_backend(name, recipe=recipe, fast_accum=fast)
    backend.collect_stats = False
    cand = Qwen2Model(ref.gguf, backend=backend, weights=ref.weights)
    for ids in prompts:  # delayed-calibrated: scales from the prompts' amax, as stage B does
        calibrate(cand, ids)
    spec = twin.declared_spec(backend.describe(), recipe)
    rp = replay.Replayer(ref, twin.make_twin(spec, backend.used_input_scales()), spec.gemm_class)
    worst, beyond = {}, []
    for i, ids in enumerate(prompts):
        for path in PATHS:
            rows = rp.replay(trace(cand, ids, path), path, ids)
            worst = merge_max(worst, class_max(rows))
            tab = replay.local_table(rows)
            fd = replay.first_beyond(tab)
            if fd is not None:
                beyond.append(f"prompt {i} {path}: {replay.describe_where(fd)}")
    return {"candidate": f"{name}:{recipe}" + (":fast" if fast else ""), "twin": spec.label(),
            "max_local_error": worst, "beyond_floor": beyond}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--candidates", default="reference:current,emulated-fp8:current,emulated-fp8:rowwise,"
                    "emulated-fp8:block,emulated-fp8:delayed-calibrated")
    ap.add_argument("--skip-cpu", action="store_true", help="only the candidates (the CPU floors are known)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    gguf = GGUFModel(a.model)
    tok = GGUFTokenizer(gguf)
    prompts = [tok.chat_ids(p) for p in DEFAULT_PROMPTS]  # the run's default prompts
    ref = Qwen2Model(gguf)
    result = {"model": gguf.config.name, "model_sha256": gguf.sha256, "machine": machine(), "versions": versions(),
              "prompts": DEFAULT_PROMPTS, "alarm_factor": replay.ALARM_FACTOR,
              "floors_in_code": {k: f.rel_l2 for k, f in replay.FLOORS.items()}}
    if not a.skip_cpu:
        print("measuring floors on this machine ...", flush=True)
        result["measured"] = cpu_floors(ref, prompts)
        print(json.dumps(result["measured"], indent=2))
    result["candidates"] = []
    for c in filter(None, a.candidates.split(",")):
        name, recipe, *more = c.split(":") + ["current"] * (":" not in c)
        t0 = time.perf_counter()
        r = candidate_errors(ref, name, recipe, prompts, fast=more == ["fast"])
        r["seconds"] = round(time.perf_counter() - t0, 1)
        result["candidates"].append(r)
        ratios = {k: f"{v / replay.FLOORS[k].rel_l2:.2f}x" for k, v in r["max_local_error"].items()}
        print(f"{r['candidate']:<32} twin {r['twin']:<44} worst/floor {ratios} beyond: {r['beyond_floor'] or 'none'}",
              flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
