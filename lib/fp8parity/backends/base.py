"""The backend interface and the CPU reference."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class LinearBackend:
    """Base class: subclasses implement `linear`; `stats` collects per-GEMM FP8 statistics if any."""

    name = "base"
    device = "cpu"
    # whether a forward through it may be captured as a CUDA graph: only device work, no host reads, no per-forward
    # state (fault wrappers and anything unknown: no)
    graph_safe = False

    def __init__(self) -> None:
        self.stats: dict[str, dict] = {}
        self.collect_stats = False  # per-GEMM FP8 statistics: only on request (stage E), never in a timed forward
        self._weight_stats: dict[str, tuple[torch.Tensor, dict]] = {}

    def linear(self, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, key: str) -> torch.Tensor:
        """x @ w.T + b as this backend computes it; `w` may be None when `holds(key)`: the backend kept its own copy."""
        raise NotImplementedError

    def holds(self, key: str) -> bool:
        """Whether the backend already holds its own copy of this GEMM's weight (so the forward need not fetch it)."""
        return False

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Entered once around a whole forward (Transformer Engine's autocast); nothing by default."""
        return contextlib.nullcontext()

    def record_stats(self, key: str, x: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor) -> None:
        """FP8 statistics of one GEMM's operands; a weight's are computed once per (weight, scale)."""
        from fp8parity import fp8

        cached = self._weight_stats.get(key)
        if cached is None or not torch.equal(cached[0], sw):
            cached = self._weight_stats[key] = (sw.clone(), fp8.quant_stats(w, sw, fp8.quantize(w, sw)).to_dict())
        self.stats[key] = {"input": fp8.quant_stats(x, sx, fp8.quantize(x, sx)).to_dict(), "weight": cached[1]}

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device)}

    def used_input_scales(self) -> dict[str, float]:
        """Input scales fixed by calibration, per GEMM key (delayed-calibrated recipes); none elsewhere."""
        return {}


class ReferenceBackend(LinearBackend):
    """x @ w.T + b in the activations' dtype (fp32 or fp64) on the CPU: the trusted side."""

    name = "reference"

    def linear(self, x, w, b, key):
        return F.linear(x, w.to(x.device, x.dtype), None if b is None else b.to(x.device, x.dtype))


@contextlib.contextmanager
def collecting_stats(backend: LinearBackend):
    """Per-GEMM FP8 statistics on for the duration (the stage that shows them asks; every other forward runs without)."""
    old, backend.collect_stats = backend.collect_stats, True
    try:
        yield backend
    finally:
        backend.collect_stats = old
