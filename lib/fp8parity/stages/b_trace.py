"""Stage B on a trace another engine dumped (or one of ours): the local check, no candidate run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fp8parity import replay, twin
from fp8parity.config import DEFAULT_PATHS
from fp8parity.errors import WorkbookError
from fp8parity.stages.b_parity import ParityRule, beyond_floor
from fp8parity.stages.verdict import FAIL, PASS, Verdict
from fp8parity.trace import load_trace
from fp8parity.workbench import Workbench


@dataclass
class TraceParityResult:
    trace: str  # the folder judged
    path: str
    twin: twin.TwinSpec
    twin_from: str  # "meta.json" or "fingerprint"
    local: pd.DataFrame
    fingerprint: pd.DataFrame


def measure_b_trace(wb: Workbench, folder: str | Path) -> TraceParityResult:
    """The twin is the one the trace's meta.json names ('twin'), else the recipe the fingerprint finds best."""
    tensors, meta = load_trace(Path(folder))
    path = meta.get("path", "prefill")
    if path not in DEFAULT_PATHS:
        raise WorkbookError(f"trace {folder} names path {path!r}; meta.json 'path' must be prefill or decode.")
    ids, scales = meta.get("prompt_ids"), meta.get("input_scales") or None
    replay.check_widths(tensors, wb.gguf.config)
    fp = replay.fingerprint(wb.reference, tensors, path, ids, scales)
    if not meta.get("twin") and fp.empty:
        raise WorkbookError(f"trace {folder} holds no GEMM of layers {replay.FINGERPRINT_LAYERS} with its input, so "
                            f"no recipe can be fingerprinted; name the twin in its meta.json ('twin').")
    spec = twin.TwinSpec(**meta["twin"]) if meta.get("twin") else twin.TwinSpec(**fp.iloc[0].spec)
    local, _ = replay.local_check(wb.reference, tensors, path, ids, spec, scales)
    local.insert(0, "path", path)
    local.insert(0, "prompt", 0)
    return TraceParityResult(str(folder), path, spec, "meta.json" if meta.get("twin") else "fingerprint", local, fp)


@dataclass
class TraceParityVerdict(Verdict):
    trace: str
    path: str
    twin: dict
    twin_from: str
    alarm_factor: float
    first_beyond_floor: dict | None
    unmeasured_ops: int
    fingerprint: list[dict]
    fingerprint_text: str


def judge_b_trace(result: TraceParityResult, rule: ParityRule) -> TraceParityVerdict:
    local = beyond_floor(result.local, rule.factor)
    first, worst = replay.first_beyond(local), replay.worst_row(local)
    unmeasured = int((local.status == "UNMEASURED").sum())
    folder = Path(result.trace)
    name = folder.parent.name if folder.name == "candidate" else folder.name  # traces/prompt0-decode/candidate
    label = result.twin.label()
    source = "named in its meta.json" if result.twin_from == "meta.json" else "found by the fingerprint"
    if first is not None:
        summary = (f"trace {name} ({result.path}): first op beyond its noise floor against the twin {label} ({source}): "
                   f"{replay.describe_where(first)}.")
    else:
        summary = (f"trace {name} ({result.path}): no op beyond its noise floor against the twin {label} ({source}); "
                   f"worst {worst.op} (layer {int(worst.layer)}) at {worst.times_floor:.2f}× its floor."
                   + (f" {unmeasured} ops UNMEASURED (an input or output not in the trace)." if unmeasured else ""))
    return TraceParityVerdict("B", FAIL if first is not None else PASS, summary, result.trace, result.path,
                              result.twin.to_dict() | {"label": label}, result.twin_from, rule.factor, first, unmeasured,
                              result.fingerprint.drop(columns="spec").to_dict(orient="records"),
                              replay.describe_fingerprint(result.fingerprint))
