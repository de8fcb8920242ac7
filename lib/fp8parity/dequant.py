"""Vectorized GGML dequantizers, bit-identical to `gguf.quants.dequantize`.

One function per quant type, named as in ggml, laid out as in gguf-py's `quants.py` (itself a port of
ggml-quants.c). Each works on a (n_blocks, type_size) uint8 view and writes float32 into `out`.
Bit-exactness rests on doing the same float32 operations in the same order as gguf-py: no fused
multiply-adds (torch's eager CPU ops do not fuse), fp16 -> fp32 conversions exact.

Speed comes from torch's multi-threaded kernels on chunks small enough to stay in cache, and from
reusing the caller's output buffer (fresh memory is slow to touch).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from fp8parity.errors import WorkbookError

QK_K = 256
# Blocks per chunk: keeps intermediates of a chunk within a few MB of cache.
_CHUNK_BLOCKS = 8192

SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32 via fp16 (exact)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) uint8 -> (n, 2k): low nibbles of all bytes first, then high nibbles (ggml order)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    torch.mul(d, q.to(torch.float32), out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:]).to(torch.float32)
    torch.mul(d, q, out=out)
    out.add_(m)


def _q5_high_bits(qh_bytes: torch.Tensor) -> torch.Tensor:
    """(n, 4) uint8 little-endian uint32 -> (n, 32) uint8 of bit i at column i, shifted to bit 4."""
    bits = (qh_bytes.unsqueeze(2) >> torch.arange(8, dtype=torch.uint8)) & 1  # (n, 4, 8)
    return bits.reshape(-1, 32) << 4


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | _q5_high_bits(b[:, 2:6])).to(torch.int8) - 16
    torch.mul(d, q.to(torch.float32), out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = (_nibbles(b[:, 8:]) | _q5_high_bits(b[:, 4:8])).to(torch.float32)
    torch.mul(d, q, out=out)
    out.add_(m)


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, :2])
    torch.mul(b[:, 2:].view(torch.int8).to(torch.float32), d, out=out)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte 6-bit scales/mins of Q4_K and Q5_K -> two (n, 8) uint8."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    """out = (d*sc) * q - (dmin*m) per 32-value sub-block, as gguf-py orders it."""
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    o = out.view(n, 8, 32)
    torch.mul(dl, q.reshape(n, 8, 32).to(torch.float32), out=o)
    o.sub_(ml)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    qs = b[:, 16:].reshape(n, 4, 32)
    q = torch.stack((qs & 0x0F, qs >> 4), dim=2)  # (n, 4, 2, 32): sub-blocks 2j, 2j+1
    _k_affine(b, q, out)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    qh = b[:, 16:48]
    qs = b[:, 48:].reshape(n, 4, 32)
    ql = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32)
    hi = ((qh.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1) << 4  # (n, 8, 32)
    _k_affine(b, ql | hi, out)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    sc = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16(b[:, 208:210])
    lo = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(n, 2, 4, 32)
    hi = ((qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3) << 4
    q = (lo | hi).to(torch.int8) - 32
    dl = (d * sc).reshape(n, 16, 1)
    torch.mul(dl, q.reshape(n, 16, 16).to(torch.float32), out=out.view(n, 16, 16))


_BLOCK_DEQUANTIZERS = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def _as_bytes(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        return raw.reshape(-1).view(torch.uint8)
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # read-only memmap: we never write through this view
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat)


def qtype_name(qtype: GGMLQuantizationType | int | str) -> str:
    if isinstance(qtype, str):
        return qtype
    return GGMLQuantizationType(int(qtype)).name


def n_bytes(qtype: str, n_elements: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return n_elements // block * size


def dequantize(
    raw: np.ndarray | torch.Tensor,
    qtype: GGMLQuantizationType | int | str,
    n_elements: int,
    out: torch.Tensor | None = None,
    tensor_name: str = "",
) -> torch.Tensor:
    """Dequantize one tensor's raw bytes to a flat float32 tensor of n_elements.

    `raw` is the tensor's bytes (any shape, uint8, or the float array for F32/F16/BF16 as gguf
    exposes it). `out`, if given, is a float32 buffer of at least n_elements that is reused.
    """
    name = qtype_name(qtype)
    if name not in SUPPORTED_TYPES:
        where = f" (tensor {tensor_name})" if tensor_name else ""
        raise WorkbookError(
            f"quant type {name}{where} is not supported; supported: {', '.join(SUPPORTED_TYPES)}."
        )
    if out is None:
        out = torch.empty(n_elements, dtype=torch.float32)
    else:
        out = out.view(-1)[:n_elements]
    src = _as_bytes(raw)
    if name == "F32":
        out.copy_(src.view(torch.float32))
        return out
    if name == "F16":
        out.copy_(src.view(torch.float16))
        return out
    if name == "BF16":
        out.copy_(src.view(torch.bfloat16))
        return out
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    n_blocks = n_elements // block
    blocks = src[: n_blocks * size].view(n_blocks, size)
    dst = out.view(n_blocks, block)
    fn = _BLOCK_DEQUANTIZERS[name]
    for start in range(0, n_blocks, _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, n_blocks)
        fn(blocks[start:stop], dst[start:stop])
    return out


def dequantize_rows(
    raw2d: np.ndarray, qtype: GGMLQuantizationType | int | str, row_elements: int, rows: list[int] | np.ndarray
) -> torch.Tensor:
    """Dequantize selected rows of a 2-D quantized tensor (each row is whole blocks) -> (len(rows), row_elements)."""
    picked = np.ascontiguousarray(raw2d[np.asarray(rows, dtype=np.int64)])
    return dequantize(picked, qtype, len(rows) * row_elements).view(len(rows), row_elements)
