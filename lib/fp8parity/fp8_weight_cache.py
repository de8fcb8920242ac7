"""emulated-fp8's quantized weights on disk, once per model file and weight granularity: a notebook's candidate (and
stage B's and F's twin of the same recipe) memory-maps them instead of quantizing 2 GB of weights again, which took
3.4-5 s of the real 0.5B's first candidate forward on the CPU VM, in every notebook.

The first process that has quantized every weight of the model writes them (E4M3 values as fp32, and their scales) to a
temporary name and renames it, as `weight_cache` does; processes that start together may each write it once. The file
is named by the GGUF's sha256, the granularity and a hash of the code that quantizes weights, so a change to that code
starts a new file instead of reading stale values. Off with FP8PARITY_WEIGHT_CACHE=0, for small models (as
`weight_cache`) and for large ones (`MAX_BYTES`), and where the disk would be left with less than `FREE_MARGIN`; used
only where the weights handed to the backend are the file's own (no fault reads one transposed).
"""

from __future__ import annotations

import hashlib
import inspect
import shutil

import torch
from safetensors import SafetensorError, safe_open

from fp8parity import aligned_safetensors, fp8, weight_cache
from fp8parity.taps import LINEAR_OPS

# granularities whose weight scales are small (one per tensor or per row); block's come expanded to the weight's shape
CACHED_GRANULARITIES = ("tensor", "delayed", "delayed-calibrated", "batch-ftz", "rowwise")
# models whose fp32 weights take more are not cached: a 7B's file would take 30 GB of disk per recipe, beside its 30 GB
# dequantized cache (a GPU host's stage-B twin is emulated-fp8 too)
MAX_BYTES = 8 << 30
FREE_MARGIN = 4 << 30  # disk left free after writing a file


def code_version() -> str:
    """A hash of the code a quantized weight comes from: any edit to it names a new cache file."""
    from fp8parity.backends.emulated import EmulatedFP8Backend, column_major

    parts = (fp8.scale_from_amax, fp8.cast_e4m3, fp8.quantize, fp8.amax_tensor, fp8.amax_rows, column_major,
             EmulatedFP8Backend._weight_scale, EmulatedFP8Backend.quantize_operands)
    return hashlib.sha256("".join(inspect.getsource(f) for f in parts).encode()).hexdigest()[:12]


def weight_keys(cfg) -> set[str]:
    """The backend's key of every GEMM the forward runs."""
    return {f"{layer}.{op}" for layer in range(cfg.n_layers) for op, *_ in LINEAR_OPS} | {"lm_head"}


class FP8WeightFile:
    """One model's quantized weights for one granularity: read per key (memory-mapped), written once when complete."""

    def __init__(self, gguf, granularity: str):
        self.path = weight_cache.cache_folder() / (
            f"fp8-weights-{gguf.sha256[:32]}-{granularity}-{code_version()}.safetensors")
        self.keys = weight_keys(gguf.config)
        self._handle = None
        self.written = False

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(E4M3 values as fp32, seen (out, in) over (in, out) storage; their scale) of a GEMM's weight, or None where
        there is no file (yet)."""
        if self._handle is None:
            if not self.path.is_file():
                return None
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except (SafetensorError, OSError):
                self.path.unlink(missing_ok=True)  # a damaged file is rewritten, not trusted
                return None
        try:
            return self._handle.get_tensor(f"{key}.qt").t(), self._handle.get_tensor(f"{key}.scale")
        except SafetensorError:
            return None

    def offer(self, quantized: dict[str, tuple]) -> None:
        """The backend's quantized weights so far (key -> (values, scale, ...)): written once every key is there."""
        if self.written or not self.keys <= quantized.keys() or self.path.is_file():
            return
        self.written = True  # tried once, written or not
        tensors = {}
        for key in sorted(self.keys):
            q, scale = quantized[key][:2]
            # stored as the backend holds it, transposed (emulated.column_major): memory-mapped, no copy
            tensors[f"{key}.qt"], tensors[f"{key}.scale"] = q.t().contiguous(), scale.contiguous()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.path.parent).free < sum(t.nbytes for t in tensors.values()) + FREE_MARGIN:
                return  # a full disk would fail the run's own writes
            aligned_safetensors.save(tensors, self.path)  # aligned: the GEMMs sum as with the values computed here
        except OSError:
            pass  # no room or no permission: every notebook quantizes, as before


def attach(backend, model) -> None:
    """Give an emulated-fp8 `backend` the file of its granularity when the weights `model` hands it are the GGUF's own."""
    from fp8parity.backends.emulated import EmulatedFP8Backend

    if (isinstance(backend, EmulatedFP8Backend) and backend.granularity in CACHED_GRANULARITIES
            and not model.options.transposed_weights and weight_cache.enabled(model.gguf)
            and model.gguf.fp32_bytes() <= MAX_BYTES):
        backend.weight_file = FP8WeightFile(model.gguf, backend.granularity)
