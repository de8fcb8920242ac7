"""Linear backends: one interface, `linear(x, w, b, key) -> y` with x (T, in), w (out, in), y (T, out).

`key` names the GEMM ("3.q_proj", "lm_head") so a backend can cache prepared weights and collect
per-GEMM FP8 statistics. GPU backends import torch.cuda / Transformer Engine only when built.
"""

from fp8parity.backends.base import LinearBackend, ReferenceBackend
from fp8parity.backends.factory import BACKEND_NAMES, RECIPES, make_backend

__all__ = ["BACKEND_NAMES", "RECIPES", "LinearBackend", "ReferenceBackend", "make_backend"]
