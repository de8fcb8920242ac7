"""A faithful twin of a candidate's declared recipe: how a correct implementation of that recipe computes a GEMM.

Stage B replays every GEMM of the candidate's trace through its twin, on the candidate's own inputs. The twin
runs on the CPU and always sums in fp32; what the candidate's accumulator (Hopper's fast accumulation, cuBLAS's
reduction order) adds beyond that is what the noise floors of `fp8parity.replay` measure.

A recipe is what the user asked for (backend, RECIPE, ACCUMULATE) plus what the backend documents it does
(Transformer Engine rounds an fp32 bias to bf16 and uses fast accumulation in forward GEMMs). A backend doing
something else (a per-batch scale with flush-to-zero, an fp16 output) is not its recipe: the twin shows it up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fp8parity.backends.base import LinearBackend, ReferenceBackend
from fp8parity.backends.emulated import EmulatedFP8Backend
from fp8parity.errors import WorkbookError

# ggml-q8: llama.cpp's CPU kernels (activations to Q8_K / Q8_0); ggml-cuda: its CUDA kernels (activations to Q8_1)
ARITHMETICS = ("fp32", "bf16", "fp8", "ggml-q8", "ggml-cuda")
FP8_GRANULARITIES = ("tensor", "rowwise", "block", "delayed", "delayed-calibrated")
# RECIPE (as make_backend takes it) -> the FP8 scaling granularity a correct implementation applies
RECIPE_GRANULARITY = {"current": "tensor", "rowwise": "rowwise", "block": "block", "delayed": "delayed",
                      "delayed-calibrated": "delayed-calibrated"}


@dataclass(frozen=True)
class TwinSpec:
    """What a correct implementation of the candidate's recipe computes in every linear layer."""

    arithmetic: str  # fp32 | bf16 | fp8
    granularity: str = ""  # fp8 only: tensor | rowwise | block | delayed (scale 1.0) | delayed-calibrated
    bias: str = "fp32"  # the bias as the GEMM adds it: fp32 | bf16
    accumulation: str = "fp32"  # the candidate's declared accumulation: fp32 | fast (the twin itself sums in fp32)

    def __post_init__(self):
        if self.arithmetic not in ARITHMETICS:
            raise WorkbookError(f"unknown twin arithmetic {self.arithmetic!r}; use one of {', '.join(ARITHMETICS)}.")
        if self.arithmetic == "fp8" and self.granularity not in FP8_GRANULARITIES:
            raise WorkbookError(f"unknown FP8 granularity {self.granularity!r}; use one of {', '.join(FP8_GRANULARITIES)}.")

    @property
    def gemm_class(self) -> str:
        """The noise-floor class of this twin's GEMMs: FP8 with fast (~14-bit) accumulation is a class of its own."""
        if self.arithmetic == "ggml-cuda":  # activations as ggml-cuda rounds them; left: fp32 sums of cancelling terms
            return "gemm-ggml-cuda"
        if self.arithmetic == "ggml-q8":  # the twin rounds the activations as ggml does; what is left is fp32 summation
            return "gemm-fp32"
        return f"gemm-{self.arithmetic}" + ("-fast" if self.arithmetic == "fp8" and self.accumulation == "fast" else "")

    def label(self, accumulation: bool = True) -> str:
        if self.arithmetic != "fp8":
            return self.arithmetic + (", bias bf16" if self.bias == "bf16" and self.arithmetic == "fp32" else "")
        return f"fp8 {self.granularity}, bias {self.bias}" + (f", {self.accumulation} accumulation" if accumulation else "")

    def to_dict(self) -> dict:
        return asdict(self)


def declared_spec(backend: dict, recipe: str) -> TwinSpec:
    """The twin of a backend as `describe()` reports it, running RECIPE."""
    name = backend.get("name")
    if name == "reference":
        return TwinSpec("fp32")
    if name == "bf16":
        return TwinSpec("bf16", bias="bf16")
    granularity = RECIPE_GRANULARITY.get(recipe)
    if granularity is None:
        raise WorkbookError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPE_GRANULARITY)}.")
    if name == "emulated-fp8":
        return TwinSpec("fp8", granularity, bias=backend.get("bias_dtype", "fp32"),
                        accumulation="fast" if backend.get("accumulate") == "fast" else "fp32")
    if name == "te":  # TE documents an fp32 bias cast to bf16 and fast accumulation in forward GEMMs; its block-scaled
        # GEMM promotes partial sums per block (measured on the H200: as close to fp32 sums as torch-fp8 without fast)
        return TwinSpec("fp8", granularity, bias="bf16", accumulation="fp32" if granularity == "block" else "fast")
    if name == "torch-fp8":
        return TwinSpec("fp8", backend.get("granularity", granularity), bias="fp32",
                        accumulation="fast" if backend.get("fast_accum") else "fp32")
    raise WorkbookError(f"no twin is known for backend {name!r}; pass the recipe of the engine that made the trace.")


class BF16Twin(LinearBackend):
    """bf16 operands and bias, fp32 sums, the output rounded to bf16: what a bf16 GEMM with an fp32 accumulator does."""

    name = "bf16-twin"

    def __init__(self):
        super().__init__()
        self._w: dict[str, torch.Tensor] = {}

    def linear(self, x, w, b, key):
        wb = self._w.get(key)
        if wb is None:
            wb = self._w[key] = w.to(torch.bfloat16).float()
        y = x.to(torch.bfloat16).float() @ wb.t()
        if b is not None:
            y = y + b.to(torch.bfloat16).float()
        return y.to(torch.bfloat16).to(x.dtype)

    def rows_as_forwards(self, on: bool) -> bool:
        return True  # nothing here depends on the batch


def make_twin(spec: TwinSpec, input_scales: dict[str, float] | None = None, gguf=None) -> LinearBackend:
    """The twin backend of `spec`; `input_scales` are the delayed-calibrated scales the candidate recorded; `gguf` the
    model file (llama.cpp's twin needs each weight's type)."""
    if spec.arithmetic.startswith("ggml"):
        from fp8parity.engines.ggml_twin import GGMLCPUTwin, GGMLCUDATwin, weight_types

        if gguf is None:
            raise WorkbookError("llama.cpp's twin needs the model file to know each weight's type.")
        return GGMLCUDATwin(gguf) if spec.arithmetic == "ggml-cuda" else GGMLCPUTwin(weight_types(gguf))
    if spec.arithmetic == "fp32":
        return ReferenceBackend()
    if spec.arithmetic == "bf16":
        return BF16Twin()
    if spec.granularity == "delayed-calibrated" and not input_scales:
        raise WorkbookError("a delayed-calibrated twin needs the input scales the candidate used; its trace "
                            "records none (meta.json 'input_scales').")
    return EmulatedFP8Backend(spec.granularity, accumulate="fp32", bias_dtype=spec.bias, collect_stats=False,
                              input_scales=input_scales)


def fingerprint_specs(input_scales: dict[str, float] | None = None) -> list[TwinSpec]:
    """Every recipe stage B's fingerprint tries against a trace."""
    grans = [g for g in FP8_GRANULARITIES if g != "delayed-calibrated" or input_scales]
    return [TwinSpec("fp32"), TwinSpec("bf16", bias="bf16"), TwinSpec("ggml-q8"), TwinSpec("ggml-cuda")] + [
        TwinSpec("fp8", g, bias=b) for g in grans for b in ("fp32", "bf16")]
