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
    # the dtype its GEMMs round their inputs to (bf16), where the forward may write such an input in it at once: the op
    # that makes it computes in the activations' dtype and rounds once on the way out, the same bits as the GEMM's own
    # cast, without the cast kernel. None: the activations' dtype (FP8 quantizes from it).
    input_dtype: torch.dtype | None = None

    def __init__(self) -> None:
        self.stats: dict[str, dict] = {}
        self.collect_stats = False  # per-GEMM FP8 statistics: only on request (stage E), never in a timed forward
        self._weight_stats: dict[str, tuple[torch.Tensor, dict]] = {}
        self._shared: tuple[torch.Tensor, object] | None = None  # (an input, what `shared_input` made of it)

    def linear(self, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, key: str) -> torch.Tensor:
        """x @ w.T + b as this backend computes it; `w` may be None when `holds(key)`: the backend kept its own copy."""
        raise NotImplementedError

    def linear_native(self, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, key: str) -> torch.Tensor:
        """`linear` as the GEMM leaves it: in a narrower dtype where converting it to x's dtype is exact (bf16 for fp32
        activations). The forward converts where an op needs x's dtype and lets the others promote: adding it to the
        residual or multiplying it by RoPE's tables in fp32 gives the same bits, without a conversion kernel."""
        return self.linear(x, w, b, key)

    def linear_group(self, x: torch.Tensor, gemms: list[tuple[torch.Tensor | None, torch.Tensor | None, str]]
                     ) -> list[torch.Tensor]:
        """Several GEMMs of one input, (w, b, key) each, in this order (q, k, v; gate, up): `linear_native` each."""
        return [self.linear_native(x, w, b, key) for w, b, key in gemms]

    def shared_input(self, x: torch.Tensor, prepare):
        """prepare(x), made once for the GEMMs that read the same tensor (q, k, v; gate, up): one cast or pad kernel, not
        three. Keyed by the same object, not equal values: the tensor is held, so its identity cannot pass to another."""
        if self._shared is None or self._shared[0] is not x:
            self._shared = (x, prepare(x))
        return self._shared[1]

    def holds(self, key: str) -> bool:
        """Whether the backend already holds its own copy of this GEMM's weight (so the forward need not fetch it)."""
        return False

    def expect_one_row_gemms(self, n: int) -> None:
        """A caller about to run about n decode steps says so: a backend that prepares for them may do it at once
        (emulated-fp8 makes its weights' fp16 copies). Nothing by default."""

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

    def rows_as_forwards(self, on: bool) -> bool:
        """Compute each row of a batch as a forward of that row alone would (`on`), up to the order of fp32 sums: what
        lets stage B replay a decode trace's positions in one batch. Returns whether this backend can; one whose scales
        or kernels follow the batch says no."""
        return False


class ReferenceBackend(LinearBackend):
    """x @ w.T + b in the activations' dtype (fp32 or fp64): the trusted side, on the CPU or a GPU.

    On a GPU, fp32 GEMMs run without TF32 (full fp32 products and sums, as on the CPU; only the summation order differs)
    and, with `keep`, each weight is moved to the device once; an fp64 oracle streams its weights instead (`keep=False`:
    a 7B's fp64 copy would take 60 GB of the card)."""

    name = "reference"

    def __init__(self, device: str | torch.device = "cpu", keep: bool = True):
        super().__init__()
        self.device = torch.device(device)
        self.keep = keep and self.device.type == "cuda"
        self._w: dict[str, torch.Tensor] = {}
        if self.device.type == "cuda":
            no_tf32()
            self.graph_safe = self.keep  # device work only (a streamed weight's host copy could not be captured)

    def holds(self, key):
        return key in self._w

    def forward_context(self):
        if self.device.type == "cuda":
            check_no_tf32()
        return contextlib.nullcontext()

    def device_weight(self, key: str, w: torch.Tensor) -> torch.Tensor:
        """This GEMM's fp32 weight on the device, moved there once: the reference's own, and lent to a te candidate,
        whose modules would otherwise hold a second fp32 copy (30 GB of a 7B)."""
        if key not in self._w:
            self._w[key] = w.to(self.device, torch.float32)
        return self._w[key]

    def linear(self, x, w, b, key):
        if self.keep and x.dtype == torch.float32:
            w = self.device_weight(key, w)
        else:
            w = w.to(x.device, x.dtype)
        return F.linear(x, w, None if b is None else b.to(x.device, x.dtype))

    def rows_as_forwards(self, on: bool) -> bool:
        return True  # nothing here depends on the batch

    def describe(self):
        out = super().describe()
        return out | ({"tf32": torch.backends.cuda.matmul.allow_tf32} if self.device.type == "cuda" else {})


def no_tf32() -> None:
    """fp32 matmuls in full fp32 on a GPU (torch's default; set explicitly, since the setting is process-wide)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def check_no_tf32() -> None:
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        from fp8parity.errors import WorkbookError

        raise WorkbookError("something in this process turned TF32 on for fp32 matmuls, which the GPU reference may not "
                            "use; turn it off (torch.backends.cuda.matmul.allow_tf32 = False) or use REFERENCE_DEVICE=cpu.")


@contextlib.contextmanager
def collecting_stats(backend: LinearBackend):
    """Per-GEMM FP8 statistics on for the duration (the stage that shows them asks; every other forward runs without)."""
    old, backend.collect_stats = backend.collect_stats, True
    try:
        yield backend
    finally:
        backend.collect_stats = old
