"""What every notebook opens first: the model, its tokenizer, the reference, the candidate and the fp64 oracle.

The reference is the fp32 forward (on the GPU of a GPU host, without TF32; else on the CPU); the candidate is the
same forward with the chosen linear backend (and a fault, if one is injected); the oracle is the fp64 forward that
judges both, on the reference's device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fp8parity import fp8_weight_cache
from fp8parity.backends import ReferenceBackend, make_backend
from fp8parity.config import RunConfig, reference_device
from fp8parity.errors import WorkbookError
from fp8parity.faults import Fault, get_fault
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import ForwardOptions, Qwen2Model
from fp8parity.tokenizer import GGUFTokenizer
from fp8parity.trace import machine, versions

PROBE_TOKEN = 791  # the investigation's stage-A probe token


class Workbench:
    """Opened from a RunConfig (every default lives there) and the folder its results go to."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path):
        self.cfg = cfg
        self.prompts = cfg.judged_prompts()
        self.fault: Fault = get_fault(cfg.fault)
        self.gguf = GGUFModel(cfg.model)
        self.tok = GGUFTokenizer(self.gguf)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ref_opts = self.fault.forward_options() if self.fault.side == "reference" else ForwardOptions()
        cand_opts = self.fault.forward_options() if self.fault.side == "candidate" else ForwardOptions()
        self.reference_device = reference_device(cfg.reference_device)
        self.reference = Qwen2Model(self.gguf, backend=ReferenceBackend(self.reference_device), options=ref_opts)
        recipe = self.fault.recipe or cfg.recipe
        backend_opts = dict(self.fault.backend_options)
        granularity = backend_opts.pop("granularity", None)
        self.backend = make_backend(cfg.backend, recipe=recipe, accumulate=cfg.accumulate, **backend_opts)
        if granularity is not None:
            if self.backend.name != "emulated-fp8":
                raise WorkbookError(f"fault {self.fault.name} needs BACKEND=emulated-fp8, not {self.backend.name}.")
            self.backend.granularity = granularity
        if backend_opts and self.backend.name != "emulated-fp8":
            raise WorkbookError(f"fault {self.fault.name} is injected through emulated-fp8; run it with BACKEND=emulated-fp8.")
        self.candidate = Qwen2Model(self.gguf, backend=self.backend, options=cand_opts,
                                    weights=self.reference.weights)
        fp8_weight_cache.attach(self.backend, self.candidate)  # emulated-fp8: quantized weights read, not recomputed
        if (self.reference_device == "cuda" and hasattr(self.backend, "weights_from")
                and not (ref_opts.transposed_weights or cand_opts.transposed_weights)):
            self.backend.weights_from = self.reference.backend  # both read the same weights by the same keys
        self._oracle: Qwen2Model | None = None
        self.engine: dict | None = None  # another engine judged as the candidate (llama.cpp): what reports name

    @property
    def oracle(self) -> Qwen2Model:
        """fp64 forward on the reference's device, weights streamed (a second fp64 copy would double memory): on the
        CPU dequantized again each forward, on a GPU widened from the reference's fp32 weights (the same values)."""
        if self._oracle is None:
            backend = ReferenceBackend(self.reference_device, keep=False)
            weights = self.reference.weights if self.reference_device == "cuda" else None
            self._oracle = Qwen2Model(self.gguf, backend=backend, dtype=torch.float64, keep_weights=False, weights=weights)
        return self._oracle

    def use_engine(self, engine) -> None:
        """Another engine (llama.cpp) as the candidate: the stages call it as they call the candidate model, and
        every report names it."""
        self.candidate, self.engine = engine, engine.describe()

    def prompt_ids(self, i: int = 0) -> list[int]:
        return self.tok.chat_ids(self.prompts[i])

    def prepare_candidate(self, ids: list[int]) -> None:
        """Recipes that need calibration (delayed-calibrated) see the prompt once before they are judged."""
        calibrate(self.candidate, ids)

    def provenance(self) -> dict:
        """What every report states: model, file hash, backend, recipe, fault, card, versions."""
        return {
            "model": self.gguf.config.name, "model_file": str(self.gguf.path), "model_sha256": self.gguf.sha256,
            "backend": self.engine or self.backend.describe(), "recipe": self.fault.recipe or self.cfg.recipe,
            "reference": self.reference.backend.describe(),
            "fault": self.fault.name, "threshold": self.cfg.threshold, "prompts": self.prompts,
            "machine": machine(), "versions": versions(), "resources": resources(),
        }

    def provenance_markdown(self) -> str:
        p = self.provenance()
        b = p["backend"]
        lines = [f"**model** {p['model']} (`{Path(p['model_file']).name}`, sha256 `{p['model_sha256'][:16]}…`)",
                 f"**candidate backend** {b.get('name')} — recipe `{p['recipe']}`"
                 + (f", granularity `{b['granularity']}`" if "granularity" in b else "")
                 + (f", accumulate `{b['accumulate']}`" if "accumulate" in b else ""),
                 f"**reference** fp32 on `{p['reference']['device']}`"
                 + (" (no TF32)" if p["reference"]["device"] != "cpu" else "") + ", fp64 oracle on the same device",
                 f"**fault injected** `{p['fault']}`   **threshold** {p['threshold']}",
                 f"**card** {p['machine']['card'] or 'none (CPU only)'}   **host** {p['machine']['host']}"
                 f" ({p['machine']['threads']} threads)",
                 "**versions** " + ", ".join(f"{k} {v}" for k, v in p["versions"].items())]
        return "\n\n".join(lines)

    def save_json(self, name: str, obj) -> Path:
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
        tmp.replace(path)
        return path


def calibrate(model: Qwen2Model, ids: list[int]) -> None:
    """A delayed-calibrated candidate sees `ids` once, so that its scales come from their amax; others: nothing."""
    b = model.backend
    if getattr(b, "recipe_name", getattr(b, "granularity", "")) != "delayed-calibrated":
        return
    if hasattr(b, "phase"):  # te: calibrate, then one forward with grad enabled updates the scales
        for phase in ("calibrate", "update"):
            b.phase = phase
            model.prefill(ids, logits_for="last")
        b.phase = "run"
    else:
        b.calibrating = True
        model.prefill(ids, logits_for="last")
        b.calibrating = False
    if model.graphs is not None:
        model.graphs.clear()  # the scales and FP8 weights a graph would replay have changed


def resources() -> dict:
    """Peaks so far in this process: host RSS and, where there is a GPU, device memory."""
    import resource

    out = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)

