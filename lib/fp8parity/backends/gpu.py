"""GPU backends: bf16 control, torch._scaled_mm (cuBLASLt FP8), and Transformer Engine te.Linear.

Nothing here imports CUDA state or Transformer Engine until a backend is built, so the module
imports on any machine; building one where it cannot run raises a WorkbookError with one sentence.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fp8parity import fp8
from fp8parity.backends.base import LinearBackend
from fp8parity.config import RunConfig
from fp8parity.errors import WorkbookError

TE_RECIPES = ("delayed", "delayed-calibrated", "current", "block")
ROW_MULTIPLE = 16  # TE and cuBLASLt FP8 need prod(leading dims) % 8 and last dim % 16: pad rows to 16


def require_cuda(what: str) -> torch.device:
    if not torch.cuda.is_available():
        raise WorkbookError(f"backend {what} needs a CUDA GPU and none is visible; use BACKEND=emulated-fp8 on this machine.")
    return torch.device("cuda")


def require_fp8_gpu(what: str) -> torch.device:
    dev = require_cuda(what)
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise WorkbookError(
            f"backend {what} needs an FP8 GPU (compute capability 8.9+, Ada/Hopper); this "
            f"{torch.cuda.get_device_name()} is {major}.{minor}; use BACKEND=bf16 or emulated-fp8."
        )
    return dev


NO_TE = ("backend te needs Transformer Engine, which is not installed; `pip install 'transformer-engine[pytorch]'` "
         "(or use BACKEND=torch-fp8).")
NO_BLOCK = "Float8BlockScaling is not available here (needs Hopper and CUDA >= 12.9)."


def te_preflight(recipe: str) -> None:
    """What building a te backend refuses, checked without importing Transformer Engine (8 s on the GPU host): an
    unknown recipe, no FP8 GPU, no Transformer Engine, block scaling without Hopper and CUDA 12.9. Building the
    backend asks Transformer Engine itself (`is_fp8_available`) and refuses in the same words."""
    import importlib.util

    if recipe not in TE_RECIPES:
        raise WorkbookError(f"unknown TE recipe {recipe!r}; choose one of {', '.join(TE_RECIPES)}.")
    require_fp8_gpu("te")
    if importlib.util.find_spec("transformer_engine") is None:
        raise WorkbookError(NO_TE)
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    if recipe == "block" and (torch.cuda.get_device_capability() < (9, 0) or cuda < (12, 9)):
        raise WorkbookError(NO_BLOCK)


def card_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _pad_out_features(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero rows so the GEMM's N is a multiple of 16 (a vocabulary like 445 is not); outputs are sliced back."""
    pad = (-w.shape[0]) % ROW_MULTIPLE
    if not pad:
        return w, b
    return F.pad(w, (0, 0, 0, pad)), (None if b is None else F.pad(b, (0, pad)))


def _pad_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    t = x.shape[0]
    pad = (-t) % ROW_MULTIPLE
    return (F.pad(x, (0, 0, 0, pad)) if pad else x), t


class BF16Backend(LinearBackend):
    """bf16 GEMM on the GPU: separates "it is on the GPU" from "it is FP8".

    The GEMMs of one input (q, k, v; gate, up) run as one GEMM over their weights concatenated (`fuse`): fewer kernels
    a decode step. Each output is the same dot product over the same bf16 operands, but cuBLAS picks its kernel by
    shape, so the summation order may change: on the H200 the bits are the same for gate|up on both model shapes and
    for q|k|v on the 0.5B's, and differ for q|k|v on the 7B's below 512 rows (bf16 rounding noise;
    tests/test_gpu_speed_paths.py)."""

    name = "bf16"
    graph_safe = True
    input_dtype = torch.bfloat16

    def __init__(self, fuse: bool = True):
        super().__init__()
        self.device = require_cuda("bf16")
        self.fuse = fuse
        self._w: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor | None] = {}
        self._fused: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor | None, list[int]]] = {}

    def holds(self, key):
        return key in self._w

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x in bf16, rounded once for the GEMMs that read it."""
        return self.shared_input(x, lambda t: t.to(self.device, torch.bfloat16))

    def _bf16(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device, torch.bfloat16)

    def linear(self, x, w, b, key):
        return self.linear_native(x, w, b, key).to(x.dtype)

    def linear_native(self, x, w, b, key):
        wb = self._w.get(key)
        if wb is None:  # weights and biases are constant: moved and rounded once
            wb = self._w[key] = self._bf16(w)
            self._b[key] = self._bf16(b)
        return F.linear(self._input(x), wb, self._b[key])

    def linear_group(self, x, gemms):
        if not self.fuse:
            return super().linear_group(x, gemms)
        keys = tuple(key for _, _, key in gemms)
        fused = self._fused.get(keys)
        if fused is None:  # moved, rounded and concatenated once; biases all or none (q, k, v: all; gate, up: none)
            parts = [(self._w[k], self._b[k]) if w is None else (self._bf16(w), self._bf16(b)) for w, b, k in gemms]
            sizes = [w.shape[0] for w, _ in parts]
            w = torch.cat([w for w, _ in parts])
            b = None if parts[0][1] is None else torch.cat([b for _, b in parts])
            fused = self._fused[keys] = (w, b, sizes)
            biases = [None] * len(keys) if b is None else b.split(sizes)
            for key, wk, bk in zip(keys, w.split(sizes), biases, strict=True):
                self._w[key], self._b[key] = wk, bk  # each GEMM's rows (views), for a single call of the same key
        w, b, sizes = fused
        return list(F.linear(self._input(x), w, b).split(sizes, dim=-1))

    def describe(self):
        return super().describe() | {"fuse": self.fuse, "card": card_name()}


class TorchFP8Backend(LinearBackend):
    """torch._scaled_mm with per-tensor or rowwise current scales; fp32 output, bias added in fp32 after."""

    name = "torch-fp8"

    def __init__(self, granularity: str = "tensor", fast_accum: bool = False):
        super().__init__()
        if granularity not in ("tensor", "rowwise"):
            raise WorkbookError(f"torch-fp8 supports granularity 'tensor' or 'rowwise', not {granularity!r}.")
        self.device = require_fp8_gpu("torch-fp8")
        self.granularity, self.fast_accum = granularity, fast_accum
        self._w: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def describe(self):
        return super().describe() | {"granularity": self.granularity, "fast_accum": self.fast_accum, "card": card_name()}

    def _scale(self, t: torch.Tensor) -> torch.Tensor:
        amax = fp8.amax_tensor(t) if self.granularity == "tensor" else fp8.amax_rows(t)
        return fp8.scale_from_amax(amax)

    def quantize_weight(self, w: torch.Tensor, key: str):
        w32, _ = _pad_out_features(w.to(self.device, torch.float32), None)
        sw = self._scale(w32)
        wq = fp8.quantize(w32, sw)
        return wq, sw, w32

    def holds(self, key):
        return key in self._w

    @property
    def graph_safe(self):
        return not self.collect_stats  # statistics read operands back to the host

    def linear(self, x, w, b, key):
        cached = self._w.get(key)
        if cached is None:  # weights are constant: quantize them once per GEMM
            cached = self._w[key] = (*self.quantize_weight(w, key), w.shape[0])
        wq, sw, w32, n = cached
        x32 = x.to(self.device, torch.float32)
        xp, t = _pad_rows(x32)
        sx = self._scale(xp)
        xq = fp8.quantize(xp, sx)
        if self.collect_stats:
            self.record_stats(key, xp[:t], sx[:t] if sx.numel() > 1 else sx, w32, sw)
        sa = (1.0 / sx).float()
        sb = (1.0 / sw).float().reshape(1, -1) if self.granularity == "rowwise" else (1.0 / sw).float().reshape(())
        if self.granularity == "tensor":
            sa = sa.reshape(())
        y = torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32,
                             use_fast_accum=self.fast_accum)[:t, :n]
        if b is not None:
            y = y + b.to(self.device, torch.float32)
        return y.to(x.dtype)


class TEBackend(LinearBackend):
    """Transformer Engine te.Linear under te.autocast with a chosen recipe (fp32 params and activations).

    Recipes: `delayed` (DelayedScaling as used naively under no_grad: scales stay 1.0),
    `delayed-calibrated` (calibration passes, then one forward with grad enabled updates the scales),
    `current` (Float8CurrentScaling), `block` (Float8BlockScaling, Hopper, CUDA >= 12.9).
    TE casts an fp32 bias to bf16 for the FP8 GEMM; that is recorded in describe().
    """

    name = "te"

    def __init__(self, recipe: str = RunConfig.recipe, cache_weights: bool = True, one_autocast: bool = True):
        super().__init__()
        # cache_weights: each weight quantized to FP8 once (TE's is_first_microbatch=True, then False), not per call;
        # one_autocast: one te.autocast around the whole forward, not one per linear call. Both leave the numbers
        # unchanged (tests/test_gpu_speed_paths.py shows it bit for bit); off, they give the path as it was, for that comparison.
        self.cache_weights, self.one_autocast = cache_weights, one_autocast
        self._quantized: set[str] = set()  # weights whose FP8 copy TE holds for the current scales
        self._in_autocast = False
        te_preflight(recipe)  # the refusals that need no Transformer Engine, in the words run-all's check uses
        self.device = torch.device("cuda")
        try:
            import warnings

            # TE warns about JAX whenever JAX is installed beside it; irrelevant here and noisy in every report
            warnings.filterwarnings("ignore", message="Detected a Jax installation")
            import transformer_engine.pytorch as te
            from transformer_engine.common import recipe as te_recipe
        except ImportError:
            raise WorkbookError(NO_TE) from None
        self.te = te
        if not te.is_fp8_available():
            raise WorkbookError("Transformer Engine reports FP8 is not available on this GPU; use BACKEND=bf16.")
        if recipe == "block":
            if not te.is_fp8_block_scaling_available():
                raise WorkbookError(NO_BLOCK)
            self.recipe = te_recipe.Float8BlockScaling()
        elif recipe == "current":
            self.recipe = te_recipe.Float8CurrentScaling()
        else:
            self.recipe = te_recipe.DelayedScaling(margin=0, fp8_format=te_recipe.Format.HYBRID,
                                                   amax_history_len=1024, amax_compute_algo="max")
        self.recipe_name = recipe
        self.phase = "run"  # "calibrate" and "update" during delayed-calibrated preparation
        self.modules: dict[str, torch.nn.Module] = {}
        # a GPU reference whose fp32 device weights the modules take as their parameters (the same values, one copy)
        self.weights_from: LinearBackend | None = None

    def describe(self):
        import transformer_engine

        return super().describe() | {
            "recipe": self.recipe_name, "recipe_repr": repr(self.recipe), "card": card_name(),
            "te_version": transformer_engine.__version__, "bias": "fp32 bias cast to bf16 by TE for the FP8 GEMM",
            "params_dtype": "float32", "row_padding": ROW_MULTIPLE,
        }

    def holds(self, key):
        return key in self.modules

    @property
    def graph_safe(self):
        # calibration phases and the per-call path change TE state from the host between calls; statistics read back
        return self.phase == "run" and self.cache_weights and self.one_autocast and not self.collect_stats

    def module(self, w: torch.Tensor | None, b: torch.Tensor | None, key: str) -> torch.nn.Module:
        mod = self.modules.get(key)
        if mod is None:
            mod = self.modules[key] = self._build(w, b, key)
            mod.n_out = w.shape[0]  # before padding: outputs are sliced back to it
        return mod

    def _build(self, w: torch.Tensor, b: torch.Tensor | None, key: str) -> torch.nn.Module:
        padded, b = _pad_out_features(w, b)
        out_f, in_f = padded.shape
        mod = self.te.Linear(in_f, out_f, bias=b is not None, params_dtype=torch.float32, device=self.device)
        with torch.no_grad():
            if self.weights_from is not None and padded.shape == w.shape:
                mod.weight.data = self.weights_from.device_weight(key, w)  # no second fp32 copy; TE only reads it
            else:
                mod.weight.copy_(padded.to(self.device, torch.float32))
            if b is not None:
                mod.bias.copy_(b.to(self.device, torch.float32))
        return mod.eval()

    def forward_context(self):
        if not (self.one_autocast and self.phase == "run"):
            return super().forward_context()
        return self._autocast_once()

    @contextlib.contextmanager
    def _autocast_once(self):
        """TE's autocast around a whole forward; linear calls inside it skip their own."""
        with self.te.autocast(enabled=True, recipe=self.recipe):
            self._in_autocast = True
            try:
                yield
            finally:
                self._in_autocast = False

    def _first_microbatch(self, key: str) -> bool | None:
        """TE quantizes the weight when True and reuses that FP8 copy when False; None: every call (calibration)."""
        if not self.cache_weights or self.phase != "run":
            self._quantized.discard(key)  # the scales move while calibrating: quantize again afterwards
            return None
        first = key not in self._quantized
        self._quantized.add(key)
        return first

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x on the device in fp32 with its rows padded (and its row count), once for the GEMMs that read it."""
        return self.shared_input(x, lambda t: _pad_rows(t.to(self.device, torch.float32)))

    def linear(self, x, w, b, key):
        mod = self.module(w, b, key)
        xp, t = self._input(x)
        first = self._first_microbatch(key)
        if self.phase == "calibrate":
            with torch.enable_grad(), self.te.autocast(enabled=False, calibrating=True, recipe=self.recipe):
                y = mod(xp)
        elif self.phase == "update":
            with torch.enable_grad(), self.te.autocast(enabled=True, recipe=self.recipe):
                y = mod(xp)
        elif self._in_autocast:
            y = mod(xp, is_first_microbatch=first)
        else:
            with self.te.autocast(enabled=True, recipe=self.recipe):
                y = mod(xp, is_first_microbatch=first)
        if self.collect_stats:
            self._record_stats(mod, xp[:t], key)
        return y[:t, : mod.n_out].detach().to(x.dtype)

    def used_input_scales(self) -> dict[str, float]:
        """delayed-calibrated: the input scale TE holds for each GEMM (what a trace records for its twin)."""
        if self.recipe_name != "delayed-calibrated":
            return {}
        return {k: float(m.fp8_meta["scaling_fwd"].scale[0]) for k, m in self.modules.items()}

    def _record_stats(self, mod, x: torch.Tensor, key: str) -> None:
        """Input/weight scales as TE holds them (delayed: fp8_meta; current: recomputed from amax)."""
        w = mod.weight.detach()  # a parameter: keep autograd out of the statistics
        if self.recipe_name.startswith("delayed"):
            meta = mod.fp8_meta["scaling_fwd"]
            sx, sw = meta.scale[0].reshape(1, 1).float(), meta.scale[1].reshape(1, 1).float()
        elif self.recipe_name == "current":
            sx, sw = fp8.scale_from_amax(fp8.amax_tensor(x)), fp8.scale_from_amax(fp8.amax_tensor(w))
        else:
            return
        self.record_stats(key, x, sx, w, sw)

