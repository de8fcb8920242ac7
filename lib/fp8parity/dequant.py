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

# Blocks per chunk: keeps intermediates of a chunk within a few MB of cache.
_CHUNK_BLOCKS = 16384

SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
)


def _f16(b: torch.Tensor, word: int) -> torch.Tensor:
    """The fp16 at 2-byte word `word` of each (n, size) block row -> (n, 1) float32 (exact)."""
    return b.view(torch.float16)[:, word].to(torch.float32).unsqueeze(1)


def _words(b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The bytes of contiguous block rows as the widest integer words they divide into, with a per-byte 0x0F mask.

    Byte-wise masks and shifts on wide words act on every byte lane at once (no carries cross a lane once
    masked): torch runs uint8 ops on the 16-byte strided slices of a block several times slower.
    """
    flat = b.reshape(-1)
    for dtype, mask in ((torch.int64, 0x0F0F0F0F0F0F0F0F), (torch.int32, 0x0F0F0F0F), (torch.int16, 0x0F0F)):
        if flat.numel() % dtype.itemsize == 0 and flat.data_ptr() % dtype.itemsize == 0:
            return flat.view(dtype), mask
    return flat, 0x0F


def _nibble_planes(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, size) uint8 rows -> (low, high): every byte's low and high nibble, each (n, size) int8."""
    w, mask = _words(b)
    low = (w & mask).view(torch.int8).view(b.shape)
    high = (w >> 4).bitwise_and_(mask).view(torch.int8).view(b.shape)
    return low, high


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    low, high = _nibble_planes(b)
    q = torch.cat((low[:, 2:], high[:, 2:]), dim=1).sub_(8)
    out.copy_(q)  # int8 -> fp32, exact
    out.mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    low, high = _nibble_planes(b)
    out.copy_(torch.cat((low[:, 4:], high[:, 4:]), dim=1))
    out.mul_(_f16(b, 0))
    out.add_(_f16(b, 1))


def _bits_lut(offset: int) -> torch.Tensor:
    """For each byte value: its 8 bits, each as (bit << 4) + offset, packed as one int64 of 8 int8 lanes."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # (256, 8), bit i at lane i
    return ((bits << 4) + offset).to(torch.int8).contiguous().view(torch.int64).reshape(256)


_HIGH_BITS = {0: _bits_lut(0), -16: _bits_lut(-16)}


def _q5_ints(b: torch.Tensor, qh_word: int, qs_byte: int, offset: int) -> torch.Tensor:
    """Q5_0/Q5_1 rows -> (n, 32) int8 of q + offset, in ggml's value order.

    The 4 high-bit bytes (at 2-byte word `qh_word`) each become 8 ready lanes (bit << 4, offset folded in)
    by one table lookup; the nibbles (16 bytes from `qs_byte`) come from whole-row word operations.
    """
    n = b.shape[0]
    qh = b.view(torch.int16)[:, qh_word:qh_word + 2].contiguous().view(torch.uint8).reshape(-1).long()
    high = _HIGH_BITS[offset].index_select(0, qh).view(torch.int8).view(n, 32)
    low_nib, high_nib = _nibble_planes(b)
    q = torch.empty(n, 32, dtype=torch.int8)
    torch.add(low_nib[:, qs_byte:], high[:, :16], out=q[:, :16])
    torch.add(high_nib[:, qs_byte:], high[:, 16:], out=q[:, 16:])
    return q


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_q5_ints(b, 1, 6, -16))  # int8 -> fp32, exact
    out.mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_q5_ints(b, 2, 8, 0))
    out.mul_(_f16(b, 0))
    out.add_(_f16(b, 1))


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:].view(torch.int8))  # int8 -> fp32 without a temporary
    out.mul_(_f16(b, 0))


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte 6-bit scales/mins of Q4_K and Q5_K -> two (n, 8) uint8."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    """out = (d*sc) * q - (dmin*m) per 32-value sub-block, as gguf-py orders it (q: 8 sub-blocks of 32 bytes)."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (_f16(b, 0) * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (_f16(b, 1) * mn.to(torch.float32)).reshape(n, 8, 1)
    o = out.view(n, 8, 32)
    o.copy_(q.view(torch.uint8).view(n, 8, 32))  # uint8 -> fp32, exact
    o.mul_(dl)
    o.sub_(ml)


_LANES = 0x0F0F0F0F0F0F0F0F  # per-byte masks on int64 words (K-quant rows are whole words)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """Sub-block 2j holds the low nibbles of qs[32j:32j+32], sub-block 2j+1 their high nibbles."""
    n = b.shape[0]
    qs = b.view(torch.int64)[:, 2:].view(n, 4, 1, 4)
    q = torch.empty(n, 4, 2, 4, dtype=torch.int64)
    torch.bitwise_and(qs, _LANES, out=q[:, :, :1])
    torch.bitwise_right_shift(qs, 4, out=q[:, :, 1:])
    q[:, :, 1:].bitwise_and_(_LANES)
    _k_affine(b, q, out)


_SHIFTS_8 = torch.arange(8, dtype=torch.int64).view(1, 8, 1)
_SHIFTS_CRUMBS = torch.tensor([0, 2, 4, 6], dtype=torch.int16).view(1, 1, 4, 1)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """As Q4_K, plus bit i of each qh byte as bit 4 of sub-block i."""
    n = b.shape[0]
    w = b.view(torch.int64)
    qh, qs = w[:, 2:6], w[:, 6:].view(n, 4, 1, 4)
    q = ((qh.unsqueeze(1) >> _SHIFTS_8) & 0x0101010101010101).bitwise_left_shift_(4)  # (n, 8, 4) words
    qv = q.view(n, 4, 2, 4)
    qv[:, :, :1].bitwise_or_(qs & _LANES)
    qv[:, :, 1:].bitwise_or_((qs >> 4).bitwise_and_(_LANES))
    _k_affine(b, q, out)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """value = d*sc * (q - 32); q = low 4 bits from ql, high 2 bits from qh (ggml's interleaved layout).

    Rows are 210 bytes, so the lane-wise work runs on int16 words: group s (of 32 values) in each half takes
    crumb s of qh's 32 bytes and the low (s < 2) or high nibbles of ql bytes 32*(s % 2) ... +32.
    """
    n = b.shape[0]
    w = b.view(torch.int16)
    ql = w[:, :64].view(n, 2, 2, 16)
    qh = w[:, 64:96].view(n, 2, 1, 16)
    q = (qh >> _SHIFTS_CRUMBS).bitwise_and_(0x0303).bitwise_left_shift_(4)  # (n, half, s, 16 words)
    q[:, :, :2].bitwise_or_(ql & 0x0F0F)
    q[:, :, 2:].bitwise_or_((ql >> 4).bitwise_and_(0x0F0F))
    dl = (_f16(b, 104) * b[:, 192:208].view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    o = out.view(n, 16, 16)
    o.copy_(q.view(torch.uint8).view(n, 16, 16))  # uint8 -> fp32, exact
    o.sub_(32.0)  # exact: same values as gguf-py's int8 (q - 32)
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
    if src.data_ptr() % 8:  # word-wise unpacking needs aligned rows; GGUF data is aligned, a caller's slice may not be
        src = src.clone()
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
