"""A safetensors file whose tensors each start on a 64-byte boundary, for the weight caches that are memory-mapped.

safetensors' own writer aligns tensor data to 8 bytes only. A weight memory-mapped from such a file then starts at an
address that is not 64-byte aligned, and MKL's single-row GEMM (a decode step) sums such a row in another order than
an aligned one: the real 0.5B's reference decode logits moved by up to 3.5e-5 with the cache present against without
it, while prefills stayed bit-identical. Written here to the same format (read back with safetensors' `safe_open`):
the header padded with spaces so the data starts at a multiple of 64, the tensors whose sizes are multiples of 64
bytes first, the others after them.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

ALIGN = 64
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (CPU) to `path` atomically: a temporary name in the same folder, then renamed."""
    order = sorted(tensors, key=lambda k: (tensors[k].nbytes % ALIGN != 0, k))  # aligned sizes first
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # the data section starts at a multiple of ALIGN
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name in order:
                f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
