"""Noise floors of fp32 ops compiled with -use_fast_math, as llama.cpp's CUDA build compiles them (GPU host, CuPy).

llama.cpp's CUDA kernels for RMSNorm, RoPE, SwiGLU and softmax are compiled with -use_fast_math: expf, sinf/cosf, powf,
rsqrtf and divisions become approximate hardware instructions. Stage B judges such an op by how far a correct
fast-math implementation of the same formula lies from the exact (fp64) result: here each formula (as ggml-cuda writes
it) is compiled twice through NVRTC, with and without --use_fast_math, and run on the reference forward's own inputs
(the default model, 2 chat prompts, every layer); the largest relative L2 error per row against fp64 is reported, and
the floor is twice that (two correct implementations each lie within it of the exact result). The build without fast
math checks the instrument: it must land near the CPU's fp32-vs-fp64 errors that set the fp32 floors.

    python benchmarks/cuda_fast_math_floors.py --model data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
        --out benchmarks/results/cuda_fast_math_floors_h200.json
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from fp8parity.config import DEFAULT_PROMPTS
from fp8parity.gguf_file import GGUFModel
from fp8parity.names import MODEL_TENSOR, tensor_name
from fp8parity.qwen2 import Qwen2Model
from fp8parity.taps import EMBEDDING, GLOBAL_LAYER, Recorder
from fp8parity.tokenizer import GGUFTokenizer
from fp8parity.trace import machine, versions

KERNELS = r"""
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int n, float eps) {
    __shared__ float part[256];
    const float* xr = x + (long long)blockIdx.x * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i] * xr[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    const float mean = part[0] / n;
    const float scale = rsqrtf(mean + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[(long long)blockIdx.x * n + i] = scale * xr[i] * w[i];
}

extern "C" __global__ void rope_neox(const float* x, float* y, const int* pos, int T, int H, int hd, float theta_scale) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int half = hd / 2;
    if (idx >= (long long)T * H * half) return;
    const int i = idx % half;
    const long long th = idx / half;
    const int t = th / H;
    const float theta = pos[t] * powf(theta_scale, (2 * i) / 2.0f);
    const float c = cosf(theta), s = sinf(theta);
    const float x0 = x[th * hd + i], x1 = x[th * hd + i + half];
    y[th * hd + i] = x0 * c - x1 * s;
    y[th * hd + i + half] = x0 * s + x1 * c;
}

extern "C" __global__ void swiglu(const float* g, const float* u, float* y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}

extern "C" __global__ void softmax_causal(const float* x, float* y, int S, int T, int start, float scale) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= gridDim.x * blockDim.x) return;
    const int t = row % T;
    const int valid = start + t + 1;
    const float* xr = x + (long long)row * S;
    float* yr = y + (long long)row * S;
    float mx = -3.402823466e38f;
    for (int j = 0; j < valid; j++) mx = fmaxf(mx, xr[j] * scale);
    float sum = 0.0f;
    for (int j = 0; j < valid; j++) { const float e = expf(xr[j] * scale - mx); yr[j] = e; sum += e; }
    const float inv = 1.0f / sum;
    for (int j = 0; j < valid; j++) yr[j] *= inv;
    for (int j = valid; j < S; j++) yr[j] = 0.0f;
}
"""


def row_rel(got: np.ndarray, exact: np.ndarray) -> float:
    g, e = got.reshape(got.shape[0], -1).astype(np.float64), exact.reshape(exact.shape[0], -1)
    return float((np.linalg.norm(g - e, axis=1) / np.linalg.norm(e, axis=1)).max())


class Ops:
    """The four formulas through NVRTC, with or without --use_fast_math."""

    def __init__(self, fast: bool):
        import cupy as cp

        self.cp = cp
        mod = cp.RawModule(code=KERNELS, options=("--use_fast_math",) if fast else ())
        self.k = {n: mod.get_function(n) for n in ("rms_norm", "rope_neox", "swiglu", "softmax_causal")}

    def rms_norm(self, x, w, eps):
        cp = self.cp
        xd, wd = cp.asarray(x, dtype=cp.float32), cp.asarray(w, dtype=cp.float32)
        y = cp.empty_like(xd)
        self.k["rms_norm"]((x.shape[0],), (256,), (xd, wd, y, np.int32(x.shape[1]), np.float32(eps)))
        return cp.asnumpy(y)

    def rope(self, x, pos, hd, base):
        cp = self.cp
        T, H = x.shape[0], x.shape[1] // hd
        xd, y = cp.asarray(x, dtype=cp.float32), cp.empty((T, H * hd), dtype=cp.float32)
        n = T * H * hd // 2
        theta_scale = np.float32(base) ** np.float32(-2.0 / hd)  # computed on the host in ggml (precise powf)
        self.k["rope_neox"](((n + 255) // 256,), (256,), (xd, y, cp.asarray(pos, dtype=cp.int32), np.int32(T),
                                                         np.int32(H), np.int32(hd), np.float32(theta_scale)))
        return cp.asnumpy(y)

    def swiglu(self, g, u):
        cp = self.cp
        gd, ud = cp.asarray(g, dtype=cp.float32), cp.asarray(u, dtype=cp.float32)
        y = cp.empty_like(gd)
        self.k["swiglu"](((g.size + 255) // 256,), (256,), (gd, ud, y, np.int64(g.size)))
        return cp.asnumpy(y)

    def attention(self, q, k, v, n_heads, n_kv, hd):
        """softmax(q kᵀ · scale) v per head, causal from position 0: fp32 matrix products (cuBLAS), the softmax kernel."""
        cp = self.cp
        T = q.shape[0]
        qd = cp.asarray(q, dtype=cp.float32).reshape(T, n_heads, hd).transpose(1, 0, 2)
        kd = cp.repeat(cp.asarray(k, dtype=cp.float32).reshape(T, n_kv, hd).transpose(1, 0, 2), n_heads // n_kv, 0)
        vd = cp.repeat(cp.asarray(v, dtype=cp.float32).reshape(T, n_kv, hd).transpose(1, 0, 2), n_heads // n_kv, 0)
        scores = cp.ascontiguousarray(qd @ kd.transpose(0, 2, 1))  # (H, T, T)
        probs = cp.empty_like(scores)
        self.k["softmax_causal"]((n_heads * T,), (1,), (scores, probs, np.int32(T), np.int32(T), np.int32(0),
                                                        np.float32(1.0 / math.sqrt(hd))))
        return cp.asnumpy((probs @ vd).transpose(1, 0, 2).reshape(T, n_heads * hd))


def exact_attention(q, k, v, n_heads, n_kv, hd):
    T = q.shape[0]
    q = q.astype(np.float64).reshape(T, n_heads, hd).transpose(1, 0, 2)
    k = np.repeat(k.astype(np.float64).reshape(T, n_kv, hd).transpose(1, 0, 2), n_heads // n_kv, 0)
    v = np.repeat(v.astype(np.float64).reshape(T, n_kv, hd).transpose(1, 0, 2), n_heads // n_kv, 0)
    s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    s = np.where(np.triu(np.ones((T, T), dtype=bool), 1)[None], -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, n_heads * hd)


def exact_rope(x, pos, hd, base):
    T, H = x.shape[0], x.shape[1] // hd
    theta = np.asarray(pos, np.float64)[:, None] * base ** (-2.0 * np.arange(hd // 2) / hd)[None, :]
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x = x.astype(np.float64).reshape(T, H, hd)
    x0, x1 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate((x0 * c - x1 * s, x0 * s + x1 * c), -1).reshape(T, H * hd)


def measure(model: Qwen2Model, ids: list[int], ops: Ops) -> dict[str, float]:
    cfg, g = model.cfg, model.gguf
    rec = Recorder()
    model.prefill(ids, rec)
    tap = {k: v.numpy() for k, v in rec.tensors.items()}
    T, pos = len(ids), np.arange(len(ids))

    def rows(op, layer):
        return np.stack([tap[(p, layer, op)] for p in range(T)])

    worst: dict[str, float] = {}
    for L in range(cfg.n_layers):
        x = rows(EMBEDDING, GLOBAL_LAYER) if L == 0 else rows("post_ffn_residual", L - 1)
        w = g.tensor(tensor_name(MODEL_TENSOR.ATTN_NORM, L)).numpy()
        x64 = x.astype(np.float64)
        exact = w * x64 / np.sqrt((x64 * x64).mean(1, keepdims=True) + cfg.rms_eps)
        errs = {"rmsnorm": row_rel(ops.rms_norm(x, w, cfg.rms_eps), exact)}
        errs["rope"] = max(row_rel(ops.rope(rows(f"{s}_proj", L), pos, cfg.head_dim, cfg.rope_theta),
                                   exact_rope(rows(f"{s}_proj", L), pos, cfg.head_dim, cfg.rope_theta)) for s in "qk")
        gt, ut = rows("ffn_gate", L), rows("ffn_up", L)
        g64 = gt.astype(np.float64)
        errs["swiglu"] = row_rel(ops.swiglu(gt, ut), g64 / (1 + np.exp(-g64)) * ut)
        q, k, v = rows("q_post_rope", L), rows("k_post_rope", L), rows("v_proj", L)
        errs["attention"] = row_rel(ops.attention(q, k, v, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim),
                                    exact_attention(q, k, v, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim))
        worst = {c: max(worst.get(c, 0.0), e) for c, e in errs.items()}
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    g = GGUFModel(a.model)
    model, tok = Qwen2Model(g), GGUFTokenizer(g)
    result = {"model": g.path.name, "card": torch.cuda.get_device_name(), "machine": machine(), "versions": versions()}
    for fast in (True, False):
        ops, worst = Ops(fast), {}
        for prompt in DEFAULT_PROMPTS:
            worst = {c: max(worst.get(c, 0.0), e) for c, e in measure(model, tok.chat_ids(prompt), ops).items()}
        key = "fast_math" if fast else "precise"
        result[key] = {c: {"max_rel_l2": e, "floor": 2 * e} for c, e in worst.items()}
        print(key, {c: f"{e:.3g}" for c, e in worst.items()}, flush=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
