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
_CHUNK_BLOCKS = 16384

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


def _bits_lut(offset: int) -> torch.Tensor:
    """For each byte value: its 8 bits, each as (bit << 4) + offset, packed as one int64 of 8 int8 lanes."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # (256, 8), bit i at lane i
    return ((bits << 4) + offset).to(torch.int8).contiguous().view(torch.int64).reshape(256)


_HIGH_BITS = {0: _bits_lut(0), -16: _bits_lut(-16)}


def _q5_ints(qs: torch.Tensor, qh_bytes: torch.Tensor, offset: int) -> torch.Tensor:
    """(n, 16) nibble bytes + (n, 4) high-bit bytes -> (n, 32) int8 of q + offset, in ggml's value order.

    One table lookup per high-bit byte yields 8 ready lanes (bit << 4, offset folded in); the nibbles are
    written straight into the two halves: about half the passes of unpacking bit by bit.
    """
    n = qs.shape[0]
    q = torch.empty(n, 32, dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[:, :16])
    torch.bitwise_right_shift(qs, 4, out=q[:, 16:])
    high = torch.take(_HIGH_BITS[offset], qh_bytes.long()).view(torch.int8).view(n, 32)  # (n, 4) int64 -> int8
    return q.view(torch.int8).add_(high)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, :2])
    out.copy_(_q5_ints(b[:, 6:], b[:, 2:6], -16))  # int8 -> fp32, exact
    out.mul_(d)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    out.copy_(_q5_ints(b[:, 8:], b[:, 4:8], 0))
    out.mul_(d)
    out.add_(m)


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, :2])
    out.copy_(b[:, 2:].view(torch.int8))  # int8 -> fp32 without a temporary
    out.mul_(d)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte 6-bit scales/mins of Q4_K and Q5_K -> two (n, 8) uint8."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    """out = (d*sc) * q - (dmin*m) per 32-value sub-block, as gguf-py orders it (q: uint8, 8 sub-blocks of 32)."""
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    o = out.view(n, 8, 32)
    o.copy_(q.reshape(n, 8, 32))  # uint8 -> fp32, exact
    o.mul_(dl)
    o.sub_(ml)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    qs = b[:, 16:].reshape(n, 4, 32)
    q = torch.empty(n, 4, 2, 32, dtype=torch.uint8)  # sub-blocks 2j (low nibbles), 2j+1 (high nibbles)
    torch.bitwise_and(qs, 0x0F, out=q[:, :, 0])
    torch.bitwise_right_shift(qs, 4, out=q[:, :, 1])
    _k_affine(b, q, out)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    qh = b[:, 16:48]
    qs = b[:, 48:].reshape(n, 4, 32)
    ql = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32)
    hi = ((qh.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1) << 4  # (n, 8, 32)
    _k_affine(b, ql | hi, out)


def _crumbs_lut() -> torch.Tensor:
    """For each byte: its four 2-bit fields f0..f3 as (f << 4) - 32, packed as one int32 of 4 int8 lanes."""
    fields = (torch.arange(256).unsqueeze(1) >> torch.tensor([0, 2, 4, 6])) & 3  # (256, 4)
    return ((fields << 4) - 32).to(torch.int8).contiguous().view(torch.int32).reshape(256)


_Q6_HIGH = _crumbs_lut()


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """value = d*sc * (q - 32); q = low 4 bits from ql, high 2 bits from qh (ggml's interleaved layout)."""
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 64)
    sc = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16(b[:, 208:210])
    q = torch.empty(n, 2, 2, 64, dtype=torch.uint8)  # (half, nibble, 64) == (half, group, 32)
    torch.bitwise_and(ql, 0x0F, out=q[:, :, 0])
    torch.bitwise_right_shift(ql, 4, out=q[:, :, 1])
    # one lookup per qh byte gives the high bits of lane l in all four groups: (n, 2, 32, 4) -> (n, 2, 4, 32)
    high = torch.take(_Q6_HIGH, b[:, 128:192].long()).view(torch.int8).view(n, 2, 32, 4).permute(0, 1, 3, 2)
    qi = q.view(torch.int8).view(n, 2, 4, 32).add_(high)
    dl = (d * sc).reshape(n, 16, 1)
    o = out.view(n, 16, 16)
    o.copy_(qi.view(n, 16, 16))
    o.mul_(dl)


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
