"""The noise floor of attention whose matrix products run in TF32, as llama.cpp's CUDA build computes it (GPU host).

ggml-cuda sets its cuBLAS handles to CUBLAS_TF32_TENSOR_OP_MATH (common.cuh), so with an F32 KV cache the prefill's
q·kᵀ and p·v are TF32 GEMMs on Ampere and later (a single decode row takes ggml's own fp32 kernel instead). This runs
the same attention through cuBLAS with TF32 allowed, and in fp64, on the q/k/v rows of a prefill trace (any engine's:
the ops are the same), causal from position 0; the largest relative L2 error per row is reported and the floor is
twice that. A run with TF32 off checks the instrument (it must land near the fp32 attention floor).

Standalone (torch and safetensors only), so it runs on a GPU host without the workbook's other dependencies:
    python benchmarks/tf32_attention_floor.py --trace TRACE_DIR --heads 14 --kv-heads 2 --out floors.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

KEY = re.compile(r"^p(\d+)\.L(-?\d+)\.(\w+)$")


def rows(tensors: dict, layer: int, op: str) -> torch.Tensor:
    found = sorted((int(m[1]), t) for k, t in tensors.items() if (m := KEY.match(k)) and int(m[2]) == layer
                   and m[3] == op)
    return torch.stack([t for _, t in found])


def attention(q, k, v, heads: int, kv_heads: int) -> torch.Tensor:
    T, hd = q.shape[0], q.shape[1] // heads
    q = q.view(T, heads, hd).transpose(0, 1)
    k = k.view(T, kv_heads, hd).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = v.view(T, kv_heads, hd).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    s = (q @ k.transpose(1, 2)) / math.sqrt(hd)
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), 1), float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(T, -1)


def worst(tensors: dict, heads: int, kv_heads: int, tf32: bool) -> dict[int, float]:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    layers = sorted({int(m[2]) for k in tensors if (m := KEY.match(k)) and m[3] == "q_post_rope"})
    out = {}
    for L in layers:
        q, k, v = rows(tensors, L, "q_post_rope"), rows(tensors, L, "k_post_rope"), rows(tensors, L, "v_proj")
        got = attention(q.cuda(), k.cuda(), v.cuda(), heads, kv_heads).double().cpu()
        exact = attention(q.double(), k.double(), v.double(), heads, kv_heads)
        out[L] = float(((got - exact).norm(dim=1) / exact.norm(dim=1)).max())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", required=True, help="a prefill trace folder (tensors.safetensors)")
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    tensors = load_file(str(Path(a.trace) / "tensors.safetensors"))
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "trace": str(a.trace)}
    for tf32 in (True, False):
        per_layer = worst(tensors, a.heads, a.kv_heads, tf32)
        key = "tf32" if tf32 else "fp32"
        result[key] = {"per_layer": per_layer, "max_rel_l2": max(per_layer.values()),
                       "floor": 2 * max(per_layer.values())}
        print(key, {L: f"{e:.3g}" for L, e in per_layer.items()}, flush=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
