"""The investigation's own question asked of llama.cpp: its CPU path, its CUDA path and the fp32 reference side by
side on the same GGUF and prompts. Per device: the last position's logits against the reference (cosine, argmax, top-5
overlap), CUDA against CPU as the investigation fitted them (an affine fit), stage B's local check of every op against
the device's own twin, and prefill / decode wall times.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from fp8parity import metrics, replay, twin
from fp8parity.engines.llamacpp import LlamaCppEngine
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import Qwen2Model
from fp8parity.tokenizer import GGUFTokenizer

DECODE_STEPS = 16  # decode steps timed after the prompt


@dataclass
class DeviceRun:
    """One prompt on one device: logits of the last prefill position, the taps of each path, and timings."""

    device: str
    logits: torch.Tensor
    taps: dict  # path -> {TapKey: tensor}
    prefill_ms: float
    decode_ms: float
    engine: dict


def run_device(model: str, device: str, ids: list[int], paths) -> DeviceRun:
    engine = LlamaCppEngine(model, device=device, n_ctx=max(512, len(ids) + DECODE_STEPS + 1))
    try:
        taps = {}
        for path in paths:
            engine.run(ids, path)
            taps[path] = dict(engine.taps)
        engine.prefill(ids)  # warm-up; then timed with the callback declining every node
        t0 = time.perf_counter()
        logits = engine.prefill(ids, logits_for="last")[-1]
        prefill_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        for k in range(DECODE_STEPS):
            engine._decode([int(logits.argmax())], len(ids) + k)
        decode_ms = (time.perf_counter() - t0) * 1e3 / DECODE_STEPS
        return DeviceRun(device, logits, taps, prefill_ms, decode_ms, engine.describe())
    finally:
        engine.close()


def stage_b(reference: Qwen2Model, taps: dict, path: str, ids: list[int], arithmetic: str) -> dict:
    """Every op of one trace replayed through the device's twin: the worst op and the first beyond its floor."""
    table, tw = replay.local_check(reference, taps, path, ids, twin.TwinSpec(arithmetic))
    worst, first = replay.worst_row(table), replay.first_beyond(table)
    return {"twin": arithmetic, "worst_op": f"L{int(worst.layer)} {worst.op}", "worst_times_floor": float(worst.times_floor),
            "beyond": int(table[table.status == "measured"].beyond.sum()),
            "first_beyond": replay.describe_where(first) if first else "",
            "admitted_tie_roundings": int(getattr(tw, "admitted", 0))}


def top5_overlap(a: torch.Tensor, b: torch.Tensor) -> int:
    return len(set(a.topk(5).indices.tolist()) & set(b.topk(5).indices.tolist()))


def compare(model: str, prompts: list[str], devices=("cpu", "cuda"), paths=("prefill", "decode"),
            progress=print) -> pd.DataFrame:
    """One row per (prompt, device): the side-by-side table."""
    g = GGUFModel(model)
    reference, tok = Qwen2Model(g), GGUFTokenizer(g)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tok.chat_ids(prompt)
        t0 = time.perf_counter()
        ref = reference.prefill(ids, logits_for="last")[-1]
        ref_ms = (time.perf_counter() - t0) * 1e3
        rows.append({"prompt": i, "tokens": len(ids), "engine": "reference (fp32, CPU)", "cos_vs_reference": 1.0,
                     "argmax_same": True, "top5_overlap": 5, "prefill_ms": round(ref_ms, 1)})
        runs = {}
        for device in devices:
            progress(f"prompt {i}: llama.cpp {device} ...")
            run = runs[device] = run_device(model, device, ids, paths)
            row = {"prompt": i, "tokens": len(ids), "engine": f"llama.cpp {device}",
                   "cos_vs_reference": metrics.cosine(run.logits, ref),
                   "argmax_same": int(run.logits.argmax()) == int(ref.argmax()),
                   "top5_overlap": top5_overlap(run.logits, ref), "prefill_ms": round(run.prefill_ms, 1),
                   "decode_ms_per_token": round(run.decode_ms, 2)}
            for path in paths:
                progress(f"prompt {i}: stage B of llama.cpp {device} ({path}) ...")
                b = stage_b(reference, run.taps[path], path, ids, run.engine["twin"])
                row |= {f"B_{path}_{k}": v for k, v in b.items()}
            rows.append(row)
        if {"cpu", "cuda"} <= runs.keys():  # the investigation's fit: GPU logits against CPU logits
            fit = metrics.affine_fit(runs["cuda"].logits, runs["cpu"].logits)
            rows[-1] |= {"cuda_vs_cpu_cos": metrics.cosine(runs["cuda"].logits, runs["cpu"].logits),
                         "cuda_vs_cpu_fit": f"{fit.slope:.4f}·CPU {fit.intercept:+.4f}"}
    return pd.DataFrame(rows)


COLUMNS_NOTE = ("Logits are the last prompt position's. B_prefill_* and B_decode_*: stage B's local check of that "
                "path's trace against the device's own twin (ggml-q8 on the CPU, ggml-cuda on CUDA): the worst op and "
                "its multiple of the noise floor, how many ops are beyond 4x their floor, the first of them, and the "
                "values the CUDA twin rounded the other way at a fast-math or summation-order tie. cuda_vs_cpu_*: the "
                "CUDA path's logits against the CPU path's.")
STYLE = ("body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse;font-size:13px} "
         "td,th{border:1px solid #bbb;padding:3px 6px;vertical-align:top} th{background:#eee}")


def write_report(table: pd.DataFrame, out: Path, provenance: dict) -> None:
    """compare.json (rows and provenance), compare.md (the table README carries) and compare.html."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"provenance": provenance, "rows": table.to_dict(orient="records")},
                                                 indent=1, default=str))
    head = "\n".join(f"- **{k}**: {v}" for k, v in provenance.items())
    shown = table.astype(object).where(table.notna(), "")
    (out / "compare.md").write_text(f"{head}\n\n{COLUMNS_NOTE}\n\n{shown.to_markdown(index=False, floatfmt='.6g')}\n")
    (out / "compare.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>llama.cpp CPU, CUDA and the reference</title>"
        f"<style>{STYLE}</style></head><body><h1>llama.cpp CPU, CUDA and the reference</h1><ul>"
        + "".join(f"<li><b>{k}</b>: {v}</li>" for k, v in provenance.items())
        + f"</ul><p>{COLUMNS_NOTE}</p>{table.to_html(index=False, na_rep='', float_format=lambda v: f'{v:.6g}')}"
        + "</body></html>")
