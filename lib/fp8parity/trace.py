"""Traces on disk: tapped tensors (safetensors) plus a JSON of what produced them.

Layout of a trace folder:
    tensors.safetensors   keys "p{position}.L{layer}.{op}" (layer -1 for embedding/final_norm/logits), float32
    meta.json             model, file sha256, backend, recipe, path (prefill|decode), prompt ids, versions, card

Bringing your own engine's dump: a folder with one `p{position}.L{layer}.{op}.npy` per tap (same key,
float32 or anything numpy can load as a vector) and an optional meta.json; `load_trace` reads either.
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from fp8parity.errors import WorkbookError
from fp8parity.taps import TapKey

KEY_RE = re.compile(r"^p(\d+)\.L(-?\d+)\.([a-z_]+)$")


def key_str(key: TapKey) -> str:
    pos, layer, op = key
    return f"p{pos}.L{layer}.{op}"


def parse_key(s: str) -> TapKey:
    m = KEY_RE.match(s)
    if not m:
        raise WorkbookError(f"trace key {s!r} is not of the form p<position>.L<layer>.<op>.")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "?"
    out = {"python": platform.python_version(), "torch": torch.__version__, "gguf": gguf_version,
           "fp8parity": __import__("fp8parity").__version__}
    te_version = _te_version()
    if te_version:
        out["transformer_engine"] = te_version
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def _te_version() -> str | None:
    """Transformer Engine's version without importing it (8 s on the GPU host): from its metadata, or from the module
    where a te backend already imported it."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    if "transformer_engine" in sys.modules:
        return getattr(sys.modules["transformer_engine"], "__version__", None)
    for dist in ("transformer_engine", "transformer-engine"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def commit() -> str:
    """The workbook's git commit (short), '-dirty' with uncommitted changes; '' outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("-dirty" if dirty else "")


def machine() -> dict:
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "card": card}


def save_trace(folder: Path, tensors: dict[TapKey, torch.Tensor], meta: dict) -> Path:
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise WorkbookError(f"trace folder {folder} already exists and is not empty; traces are never overwritten.")
    folder.mkdir(parents=True, exist_ok=True)
    # the same file as safetensors.torch writes, 4x faster for a trace's 14,000 rows (no shared-storage analysis: each
    # row is written from a numpy view of itself, even where rows share a batch)
    save_file({key_str(k): v.detach().to("cpu", torch.float32).contiguous().numpy() for k, v in tensors.items()},
              str(folder / "tensors.safetensors"))
    full = {"versions": versions(), "machine": machine()} | meta
    (folder / "meta.json").write_text(json.dumps(full, indent=2, default=str))
    return folder


def load_trace(folder: Path) -> tuple[dict[TapKey, torch.Tensor], dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise WorkbookError(f"trace folder {folder} does not exist; give a folder of tensors.safetensors or "
                            f"p<pos>.L<layer>.<op>.npy files.")
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    st = folder / "tensors.safetensors"
    if st.is_file():
        return {parse_key(k): v for k, v in load_file(str(st)).items()}, meta
    npys = sorted(folder.glob("p*.L*.*.npy"))
    if not npys:
        raise WorkbookError(f"{folder} holds no tensors.safetensors and no p<pos>.L<layer>.<op>.npy files.")
    return {parse_key(p.stem): torch.from_numpy(np.load(p).astype(np.float32).reshape(-1)) for p in npys}, meta
