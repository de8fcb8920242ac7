"""A model's dequantized fp32 weights on disk, once per GGUF file hash: every later notebook (and every process of a
concurrent run-all) memory-maps them instead of dequantizing the file again.

One safetensors file per model under the cache folder (FP8PARITY_CACHE, default ~/.cache/fp8parity), named by the
file's sha256 and the dequantizer's version, written whole to a temporary name and renamed, so a reader never sees
half a cache and two writers do not collide; every tensor starts on a 64-byte boundary (`aligned_safetensors`).
Small models (tests' tiny ones) are not cached: they dequantize in milliseconds. FP8PARITY_WEIGHT_CACHE=0 turns the
cache off.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from fp8parity import aligned_safetensors
from fp8parity.names import TOKEN_EMBD

# raise when the dequantizer's output or the file's layout changes: older caches are then ignored (2: aligned)
DEQUANT_VERSION = 2
MIN_BYTES = 64 << 20  # files smaller than this dequantize faster than a cache would pay back


def cache_folder() -> Path:
    return Path(os.environ.get("FP8PARITY_CACHE", Path.home() / ".cache" / "fp8parity"))


def enabled(gguf) -> bool:
    return os.environ.get("FP8PARITY_WEIGHT_CACHE", "1") != "0" and gguf.path.stat().st_size >= MIN_BYTES


def cache_path(gguf) -> Path:
    return cache_folder() / f"weights-{gguf.sha256[:32]}-v{DEQUANT_VERSION}.safetensors"


def _write(gguf, path: Path) -> None:
    """Every matrix the forward multiplies by, dequantized to fp32 (norms and biases stay with the GGUF reader: they are
    small; an untied embedding table is read a row at a time, or dequantized once by a GPU model's CUDA graphs)."""
    names = [t.name for t in gguf.reader.tensors if len(t.shape) == 2
             and (t.name != TOKEN_EMBD or gguf.config.tied_embeddings)]
    tensors = {n: gguf.tensor(n).contiguous() for n in tqdm(names, desc="dequantizing weights for the cache", leave=False)}
    path.parent.mkdir(parents=True, exist_ok=True)
    aligned_safetensors.save(tensors, path)  # 64-byte aligned: a decode step then sums as with fresh weights


def open_cache(gguf):
    """A safetensors handle on the model's cached weights (written first if missing or unreadable), or None."""
    if not enabled(gguf):
        return None
    path = cache_path(gguf)
    for _ in range(2):
        if path.is_file():
            try:
                return safe_open(str(path), framework="pt")
            except (SafetensorError, OSError):
                path.unlink(missing_ok=True)  # a damaged cache is rebuilt, not trusted
        try:
            _write(gguf, path)
        except OSError:
            return None  # no room or no permission: dequantize as before
    return None


def get(handle, name: str) -> torch.Tensor | None:
    """The cached tensor (memory-mapped), or None where the cache does not hold it."""
    try:
        return handle.get_tensor(name)
    except SafetensorError:
        return None
