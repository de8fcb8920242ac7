"""One typed configuration of a run: every default defined once, every value checked before anything is written.

The Makefile passes only what the user set (empty means "the default here"); the CLI, the runner, the notebooks'
parameters cells and the Workbench read their defaults from this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path

from fp8parity.errors import WorkbookError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "data" / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_PROMPTS = ("What is 2+2?", "Write a Python function that reverses a string.")
DEFAULT_PATHS = ("prefill", "decode")
DEFAULT_THRESHOLD = 0.99  # the spec's cosine rule (stage A's agreement, stage E, and B's spec line)
INTERACTIVE_RUN_DIR = str(REPO_ROOT / "runs" / "interactive")  # where a notebook run in JupyterLab writes
PATHS = ("prefill", "decode")
ACCUMULATIONS = ("fp32", "fp64", "fast")
ARCHIVES = ("reviewer", "full")
REFERENCE_DEVICES = ("auto", "cpu", "cuda")  # where the reference and the fp64 oracle run (auto: the GPU if there is one)
LLAMA_DEVICES = ("cpu", "cuda")  # where llama.cpp runs: all on the CPU, or every layer offloaded to CUDA
ENGINES = ("llama.cpp",)  # candidates that are whole engines, judged by notebook 10 instead of 01-06, 08, 09
RUN_ID_RE = re.compile(r"[A-Za-z0-9._-]+")


def _param(default, help: str, flag: str = ""):
    """A configuration field with its default and the help the CLI shows (the flag defaults to the field's name)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class RunConfig:
    """What `make run-all` (and the notebooks' parameters cell) take."""

    model: str = _param(str(DEFAULT_MODEL), "a qwen2 GGUF")
    backend: str = _param("auto", "reference | bf16 | te | torch-fp8 | emulated-fp8 | auto | llama.cpp")
    recipe: str = _param("current", "current | delayed | delayed-calibrated | rowwise | block")
    accumulate: str = _param("fp32", "emulated-fp8 only: fp32 | fp64 | fast")
    prompts: tuple[str, ...] = _param(DEFAULT_PROMPTS, "chat prompts (the first max_prompts are judged)", flag="prompt")
    threshold: float = _param(DEFAULT_THRESHOLD, "the spec's cosine rule, in (0, 1]")
    paths: tuple[str, ...] = _param(DEFAULT_PATHS, "what stage B judges: prefill and/or decode")
    max_prompts: int = _param(2, "how many prompts stages B and F judge")
    max_new_tokens: int = _param(48, "stage F generation length")
    fault: str = _param("none", "a catalogued fault (fp8parity.faults)")
    run_id: str = _param("", "the run folder's name (default: time, backend, fault)")
    capsule: str = _param("", "notebook 08: a capsule file (default: build one from the model)")
    candidate_trace: str = _param("", "notebook 02: judge this trace folder instead of running a candidate")
    archive: str = _param("reviewer", "reviewer: reports, figures, verdicts; full: also a second archive with the traces")
    corpus: str = _param("", "notebook 09: a UTF-8 text file (default: Python standard library sources)")
    corpus_tokens: int = _param(4096, "notebook 09: how many corpus tokens (whole windows of 512)")
    jobs: int = _param(0, "notebooks run at once (0: one per core as memory allows without a GPU, up to five with one)")
    reference_device: str = _param("auto", "where the reference (fp32, no TF32) and the fp64 oracle run: auto (the "
                                           "GPU on a GPU host, else the CPU) | cpu | cuda")
    llama_device: str = _param("cpu", "llama.cpp only: cpu | cuda (every layer on the GPU; needs a CUDA build, "
                                      "make engines CUDA=1)")

    @classmethod
    def from_strings(cls, **given: str | None) -> RunConfig:
        """From command-line strings; None means the default, anything given (an empty string too) is checked."""
        kw: dict = {}
        for f in fields(cls):
            raw = given.get(f.name)
            if raw is None:
                continue
            kw[f.name] = _parse(f.name, raw)
        return cls(**kw)

    @staticmethod
    def flag(f: Field) -> str:
        """The command-line flag of a field: --max-new-tokens for max_new_tokens, --prompt for prompts."""
        return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")

    def judged_prompts(self) -> list[str]:
        return list(self.prompts[: self.max_prompts])

    def to_dict(self) -> dict:
        return asdict(self)


def _parse(name: str, raw):
    if not isinstance(raw, str):
        return tuple(raw) if isinstance(raw, list) else raw
    if name == "threshold":
        try:
            return float(raw)
        except ValueError:
            raise WorkbookError(f"THRESHOLD={raw!r} is not a number; give a cosine in (0, 1], e.g. 0.99.") from None
    if name in ("max_prompts", "max_new_tokens", "corpus_tokens", "jobs"):
        try:
            return int(raw)
        except ValueError:
            raise WorkbookError(f"{name.upper()}={raw!r} is not a whole number.") from None
    if name == "paths":
        return tuple(p.strip() for p in raw.split(","))
    if name == "prompts":
        return (raw,) + tuple(p for p in DEFAULT_PROMPTS if p != raw)  # the user's prompt first, then the others
    return raw


def _check_engine(cfg: RunConfig) -> None:
    """The parameters that only another engine as the candidate takes, and the ones it refuses."""
    if cfg.backend in ENGINES and cfg.fault != "none":
        raise WorkbookError(f"FAULT={cfg.fault!r} is injected into the workbook's own forward; BACKEND={cfg.backend} "
                            f"runs another engine: leave FAULT unset.")
    if cfg.llama_device not in LLAMA_DEVICES:
        raise WorkbookError(f"LLAMA_DEVICE={cfg.llama_device!r} is unknown; choose one of {', '.join(LLAMA_DEVICES)}.")
    if cfg.llama_device != "cpu" and cfg.backend not in ENGINES:
        raise WorkbookError(f"LLAMA_DEVICE={cfg.llama_device} places llama.cpp; BACKEND={cfg.backend} is the "
                            f"workbook's own forward: leave LLAMA_DEVICE unset, or use BACKEND=llama.cpp.")


def validate(cfg: RunConfig, need_model: bool = True) -> None:
    """Every value of `cfg` checked, cheapest first; the first bad one raises a WorkbookError naming it.

    Nothing is written and no model is loaded, except to check the GGUF header and whether the backend runs here."""
    from fp8parity.backends.factory import BACKEND_NAMES, RECIPES
    from fp8parity.faults import get_fault

    if cfg.backend not in BACKEND_NAMES + ENGINES:
        raise WorkbookError(f"BACKEND={cfg.backend!r} is unknown; choose one of {', '.join(BACKEND_NAMES + ENGINES)}.")
    _check_engine(cfg)
    if cfg.recipe not in RECIPES:
        raise WorkbookError(f"RECIPE={cfg.recipe!r} is unknown; choose one of {', '.join(RECIPES)}.")
    reference_device(cfg.reference_device)  # an unknown device, or cuda without a GPU, is refused here
    if cfg.accumulate not in ACCUMULATIONS:
        raise WorkbookError(f"ACCUMULATE={cfg.accumulate!r} is unknown; choose one of {', '.join(ACCUMULATIONS)}.")
    if not (isinstance(cfg.threshold, float) and math.isfinite(cfg.threshold) and 0 < cfg.threshold <= 1):
        raise WorkbookError(f"THRESHOLD={cfg.threshold!r} is outside (0, 1]; give a cosine such as 0.99.")
    bad = [p for p in cfg.paths if p not in PATHS]
    if not cfg.paths or bad:
        raise WorkbookError(f"PATHS={','.join(cfg.paths)!r} is not a non-empty subset of prefill,decode.")
    if cfg.max_prompts < 1:
        raise WorkbookError(f"MAX_PROMPTS={cfg.max_prompts} must be at least 1.")
    if cfg.max_new_tokens < 1:
        raise WorkbookError(f"MAX_NEW_TOKENS={cfg.max_new_tokens} must be at least 1.")
    if not cfg.prompts or any(not p.strip() for p in cfg.prompts):
        raise WorkbookError("PROMPT is empty; give a non-empty chat prompt (or leave PROMPT unset for the defaults).")
    get_fault(cfg.fault)
    if cfg.run_id and not RUN_ID_RE.fullmatch(cfg.run_id):
        raise WorkbookError(f"RUN_ID={cfg.run_id!r} may hold only letters, digits, '.', '_' and '-'.")
    if cfg.archive not in ARCHIVES:
        raise WorkbookError(f"ARCHIVE={cfg.archive!r} is unknown; choose reviewer or full.")
    if cfg.jobs < 0:
        raise WorkbookError(f"JOBS={cfg.jobs} must be 0 (automatic) or a number of notebooks to run at once.")
    if cfg.corpus_tokens < 512:
        raise WorkbookError(f"CORPUS_TOKENS={cfg.corpus_tokens} must be at least 512 (one window).")
    if cfg.corpus and not Path(cfg.corpus).is_file():
        raise WorkbookError(f"CORPUS={cfg.corpus!r} is not a file; give a UTF-8 text file, or leave CORPUS empty.")
    if cfg.capsule and not Path(cfg.capsule).is_file():
        raise WorkbookError(f"CAPSULE={cfg.capsule!r} is not a file; build one with benchmarks/capsule_replay.py "
                            f"build, or leave CAPSULE empty.")
    if cfg.candidate_trace:
        from fp8parity.trace import load_trace

        load_trace(Path(cfg.candidate_trace))
    if need_model:
        from fp8parity.gguf_file import GGUFModel

        GGUFModel(cfg.model)
    check_backend_runs_here(cfg.backend, cfg.recipe, cfg.llama_device)


def check_backend_runs_here(backend: str, recipe: str, llama_device: str = "cpu") -> None:
    """Build the backend once (no model): a missing GPU, an FP8-less card, a missing Transformer Engine or a recipe
    the backend does not run is refused here, in one sentence, before a run folder exists."""
    from fp8parity.backends import make_backend

    if backend == "llama.cpp":
        from fp8parity.engines.llamacpp import check_device

        check_device(llama_device)
        return

    if backend == "te":  # the refusals building it makes first, without importing Transformer Engine (8 s)
        from fp8parity.backends.gpu import te_preflight

        te_preflight(recipe)
        return
    make_backend(backend, recipe=recipe, quiet=True)


def reference_device(name: str = RunConfig.reference_device) -> str:
    """The device the reference and the fp64 oracle run on: `auto` is the GPU where torch sees one."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise WorkbookError("REFERENCE_DEVICE=cuda needs a CUDA GPU and torch sees none here; use REFERENCE_DEVICE=cpu "
                            "(or auto).")
    if name not in REFERENCE_DEVICES:
        raise WorkbookError(f"REFERENCE_DEVICE={name!r} is unknown; choose one of {', '.join(REFERENCE_DEVICES)}.")
    return name
