"""Quantizers for writing synthetic GGUFs: Q4_K and Q6_K (gguf-py cannot quantize K-quants).

Simple min/max quantizers (not llama.cpp's error-minimizing search), laid out byte for byte as
ggml's block_q4_K and block_q6_K; checked by round trip through `gguf.quants.dequantize` in tests.
Q5_0 / Q8_0 / F32 use gguf-py's own `quantize`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float -> (rows, cols/256*144) uint8; value = d*sc*q - dmin*m per 32-value sub-block."""
    blocks = x.astype(np.float32).reshape(-1, 8, 32)
    n = blocks.shape[0]
    lo = np.minimum(blocks.min(axis=-1), 0.0)  # (n, 8)
    hi = blocks.max(axis=-1)
    scale = (hi - lo) / 15.0
    mins = -lo
    d = (scale.max(axis=-1) / 63.0).astype(np.float16).astype(np.float32)  # (n,)
    dmin = (mins.max(axis=-1) / 63.0).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin[:, None] > 0, np.rint(mins / dmin[:, None]), 0).clip(0, 63).astype(np.uint8)
        step = (d[:, None] * sc)[..., None]
        off = (dmin[:, None] * m)[..., None]
        q = np.where(step > 0, np.rint((blocks + off) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=1)
    return out.reshape(x.shape[0], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float -> (rows, cols/256*210) uint8; value = d*sc*(q-32) per 16-value sub-block."""
    blocks = x.astype(np.float32).reshape(-1, 16, 16)
    n = blocks.shape[0]
    scale = np.abs(blocks).max(axis=-1) / 31.0  # (n, 16)
    d = (scale.max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0).clip(-128, 127).astype(np.int8)
        step = (d[:, None] * sc.astype(np.float32))[..., None]
        q = (np.where(step != 0, np.rint(blocks / step), 0) + 32).clip(0, 63).astype(np.uint8)
    q = q.reshape(n, 2, 4, 32)  # half h, group g, lane l
    lo, hi = q & 0x0F, q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # (n,2,64)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (n,2,32)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)
    return out.reshape(x.shape[0], -1)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """Any type the synthetic models use; returns what GGUFWriter.add_tensor expects."""
    if qtype == "F32":
        return x.astype(np.float32)
    if qtype == "Q4_K":
        return quantize_q4_k(x)
    if qtype == "Q6_K":
        return quantize_q6_k(x)
    return gq.quantize(x.astype(np.float32), GGMLQuantizationType[qtype])
