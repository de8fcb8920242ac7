"""The noise floor of llama.cpp's CUDA GEMMs as stage B's ggml-cuda twin replays them (CPU).

The twin rounds the activations exactly as ggml-cuda does and then multiplies exactly (fp64). What a correct CUDA kernel
adds is fp32 summation, and its sums cancel: MMQ subtracts a Q4_K weight's minimum through the fp16 block sums, MMVQ a
Q5_0 weight's offset of 16 the same way, so two large terms meet in fp32. The floor is twice the largest relative error
of the same formula evaluated in fp32 against fp64, on the reference forward's own inputs (the default model, 2 chat
prompts, prefill as MMQ and decode as MMVQ, every GEMM of every layer).

    python benchmarks/ggml_cuda_gemm_floor.py --model data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
        --out benchmarks/results/ggml_cuda_gemm_floor_cpu_vm.json
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from fp8parity.config import DEFAULT_PROMPTS
from fp8parity.engines.ggml_twin import GGMLCUDATwin
from fp8parity.gguf_file import GGUFModel
from fp8parity.names import OUTPUT, TOKEN_EMBD, tensor_name
from fp8parity.qwen2 import Qwen2Model
from fp8parity.taps import FINAL_NORM, GLOBAL_LAYER, LINEAR_OPS, Recorder
from fp8parity.tokenizer import GGUFTokenizer
from fp8parity.trace import machine, versions


def gemms(cfg, layers=None):
    """(key, weight tensor, input op, input layer) of every GEMM of the forward (of `layers` and the head)."""
    for L in (range(cfg.n_layers) if layers is None else layers):
        for op, tap_in, kind, _ in LINEAR_OPS:
            yield f"{L}.{op}", tensor_name(kind, L), tap_in, L
    yield "lm_head", TOKEN_EMBD if cfg.tied_embeddings else OUTPUT, FINAL_NORM, GLOBAL_LAYER


def worst_rel(model: Qwen2Model, ids: list[int], exact: GGMLCUDATwin, fp32: GGMLCUDATwin, layers=None,
              decode_rows: int | None = None) -> dict[str, float]:
    rec = Recorder()
    model.prefill(ids, rec)
    T, out = len(ids), {}
    for key, name, tap_in, layer in tqdm(list(gemms(model.cfg, layers)), desc="GEMMs", leave=False):
        x, w = torch.stack([rec.tensors[(p, layer, tap_in)] for p in range(T)]), model._w(name)
        rows = range(T) if decode_rows is None else range(T - decode_rows, T)
        for kernel, batches in (("mmq", [x]), ("mmvq", [x[p:p + 1] for p in rows])):
            for xb in batches:
                exact.batch_rows = fp32.batch_rows = xb.shape[0]
                y64, y32 = exact._parts(xb, w, key)[0], fp32._parts(xb, w, key)[0].double()
                rel = float(((y32 - y64).norm(dim=1) / y64.norm(dim=1)).max())
                out[kernel] = max(out.get(kernel, 0.0), rel)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", default="", help="comma-separated layers (default: all; a 7B on the CPU: a few)")
    ap.add_argument("--prompts", type=int, default=len(DEFAULT_PROMPTS))
    ap.add_argument("--decode-rows", type=int, default=None, help="MMVQ on the last N positions only (default: all)")
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    g = GGUFModel(a.model)
    model, tok = Qwen2Model(g), GGUFTokenizer(g)
    exact, fp32 = GGMLCUDATwin(g, torch.float64), GGMLCUDATwin(g, torch.float32)
    worst: dict[str, float] = {}
    for prompt in DEFAULT_PROMPTS[: a.prompts]:
        for kernel, e in worst_rel(model, tok.chat_ids(prompt), exact, fp32, layers, a.decode_rows).items():
            worst[kernel] = max(worst.get(kernel, 0.0), e)
    result = {"model": g.path.name, "layers": layers or "all", "prompts": a.prompts, "machine": machine(),
              "versions": versions(),
              "max_rel_l2": worst, "floor": 2 * max(worst.values())}
    print(json.dumps(result["max_rel_l2"]), "floor", result["floor"])
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
