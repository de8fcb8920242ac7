"""Build a backend by name; `auto` picks the best that runs here and says what it chose."""

from __future__ import annotations

from fp8parity.backends.base import LinearBackend, ReferenceBackend
from fp8parity.backends.emulated import EmulatedFP8Backend
from fp8parity.config import RunConfig
from fp8parity.errors import WorkbookError

BACKEND_NAMES = ("reference", "bf16", "te", "torch-fp8", "emulated-fp8", "auto")
# A recipe names the same FP8 scheme on every backend that can run it.
RECIPES = ("current", "delayed", "delayed-calibrated", "rowwise", "block")
_EMULATED_GRANULARITY = {"current": "tensor", "delayed": "delayed", "delayed-calibrated": "delayed-calibrated",
                         "rowwise": "rowwise", "block": "block"}


def auto_choice() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        try:
            import transformer_engine.pytorch  # noqa: F401

            return "te"
        except ImportError:
            return "torch-fp8"
    return "emulated-fp8"


def make_backend(name: str, recipe: str = RunConfig.recipe, accumulate: str = RunConfig.accumulate, fast_accum: bool = False,
                 quiet: bool = False, **emulated_options) -> LinearBackend:
    """name in BACKEND_NAMES; recipe in RECIPES (ignored by reference and bf16)."""
    if name not in BACKEND_NAMES:
        raise WorkbookError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}.")
    if recipe not in RECIPES:
        raise WorkbookError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}.")
    chosen = auto_choice() if name == "auto" else name
    if chosen == "reference":
        backend = ReferenceBackend()
    elif chosen == "emulated-fp8":
        backend = EmulatedFP8Backend(_EMULATED_GRANULARITY[recipe], accumulate=accumulate, **emulated_options)
    elif chosen == "bf16":
        from fp8parity.backends.gpu import BF16Backend

        backend = BF16Backend()
    elif chosen == "torch-fp8":
        from fp8parity.backends.gpu import TorchFP8Backend

        if recipe not in ("current", "rowwise"):
            raise WorkbookError(f"torch-fp8 runs recipes 'current' and 'rowwise', not {recipe!r}; use te or emulated-fp8.")
        backend = TorchFP8Backend("tensor" if recipe == "current" else "rowwise", fast_accum=fast_accum)
    else:
        from fp8parity.backends.gpu import TEBackend

        backend = TEBackend(recipe)  # a recipe TE has not (rowwise) is refused there
    if name == "auto" and not quiet:
        print(f"backend auto chose {chosen}")
    return backend
