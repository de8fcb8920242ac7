"""A real-weight capsule: the quantized GGUF blocks of a few layers plus the GEMM inputs the CPU reference
computed there, small enough to travel to a GPU host (about 11 MB a layer for the 0.5B), replayed through
any backend GEMM by GEMM.

The weights travel as their raw GGUF bytes (Q5_0 / Q8_0 / Q4_K / Q6_K blocks) and are dequantized on
arrival with the same bit-exact dequantizer, so the GPU sees exactly the reference's weights. The
reference's GEMM outputs are not stored: they are recomputed on arrival by the same fp32 CPU op the
reference uses (F.linear), which saves a seventh of the size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from fp8parity import metrics
from fp8parity.dequant import dequantize
from fp8parity.errors import WorkbookError
from fp8parity.gguf_file import GGUFModel
from fp8parity.names import tensor_name
from fp8parity.qwen2 import Qwen2Model
from fp8parity.taps import LINEAR_OPS, Recorder


def build_capsule(model: GGUFModel, ids: list[int], layers: list[int], path: Path) -> Path:
    n = model.config.n_layers
    layers = sorted({L if L >= 0 else n + L for L in layers})
    if any(not 0 <= L < n for L in layers):
        raise WorkbookError(f"capsule layers must lie in [0, {n}).")
    taps = sorted({tap_in for _, tap_in, _, _ in LINEAR_OPS})  # the GEMM inputs
    rec = Recorder(layers=layers, ops=taps)
    Qwen2Model(model).prefill(ids, rec)
    tensors, meta = {}, {"model": model.config.name, "model_sha256": model.sha256, "layers": layers, "ids": ids,
                         "weights": {}}
    for L in layers:
        for op in taps:
            tensors[f"act.L{L}.{op}"] = torch.stack([rec.tensors[(p, L, op)] for p in range(len(ids))])
        for _, _, kind, has_bias in LINEAR_OPS:
            name = tensor_name(kind, L)
            t = model.tensors[name]
            tensors[f"raw.{name}"] = torch.from_numpy(np.ascontiguousarray(t.data).reshape(-1).view(np.uint8).copy())
            meta["weights"][name] = {"qtype": t.tensor_type.name, "shape": list(model.shape(name)),
                                     "n_elements": int(t.n_elements)}
            if has_bias:
                tensors[f"bias.{tensor_name(kind, L, 'bias')}"] = model.tensor(tensor_name(kind, L, "bias")).clone()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"capsule": json.dumps(meta)})
    return path


def load_capsule(path: Path) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise WorkbookError(f"no capsule at {path}; build one with fp8parity.capsule.build_capsule on the CPU machine.")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["capsule"])
    return load_file(str(path)), meta


def replay(path: Path, backends: dict) -> pd.DataFrame:
    """Every GEMM of every capsule layer through each backend: cosine and rel. error vs the CPU reference's
    fp32 output and vs fp64 of the same operands."""
    tensors, meta = load_capsule(path)
    rows = []
    for L in meta["layers"]:
        for tap_out, tap_in, kind, has_bias in LINEAR_OPS:
            name = tensor_name(kind, L)
            info = meta["weights"][name]
            w = dequantize(tensors[f"raw.{name}"], info["qtype"], info["n_elements"]).view(info["shape"])
            b = tensors[f"bias.{tensor_name(kind, L, 'bias')}"] if has_bias else None
            x = tensors[f"act.L{L}.{tap_in}"]
            ref32 = torch.nn.functional.linear(x, w, b)  # the reference's own fp32 CPU op
            exact = x.double() @ w.double().t() + (0 if b is None else b.double())
            for label, backend in backends.items():
                y = backend.linear(x.to(getattr(backend, "device", "cpu")), w, b, f"capsule.{L}.{tap_out}").cpu()
                rows.append({"layer": L, "gemm": tap_out, "quant": info["qtype"], "backend": label,
                             "cosine_vs_reference": metrics.cosine(y, ref32), "cosine_vs_fp64": metrics.cosine(y, exact),
                             "rel_l2_vs_fp64": metrics.rel_l2(y, exact), "max_abs_vs_reference": metrics.max_abs_diff(y, ref32),
                             "input_amax": float(x.abs().max())})
    return pd.DataFrame(rows)
