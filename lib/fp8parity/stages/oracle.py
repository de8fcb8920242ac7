"""Both sides against the fp64 oracle: which one is further from the truth? A wrong reference is named, not trusted."""

from __future__ import annotations

import math

from fp8parity import parity
from fp8parity.taps import LOGITS, Recorder
from fp8parity.workbench import Workbench

REFERENCE_BAR = 0.99999  # an fp32 reference agrees with fp64 to ~1e-10; anything under this is a broken reference


def _side_against_oracle(oracle: dict, trace: dict, bar: float) -> tuple[dict, object]:
    table = parity.per_op(parity.compare_traces(oracle, trace, bar))
    fd = parity.first_divergence(table, bar)
    logits = table[table.op == LOGITS].min_cosine
    return {"first_divergence": None if fd is None else fd.__dict__,
            "first_divergence_text": None if fd is None else str(fd), "min_cosine": float(table.min_cosine.min()),
            "logits_cosine": float(logits.iloc[0]) if len(logits) else math.nan}, table


def measure_oracle(wb: Workbench, ids: list[int], traces: dict | None = None) -> dict:
    """Reference and candidate each compared to the fp64 oracle (prefill, all taps).

    The reference is held to REFERENCE_BAR (it must be beyond doubt), the candidate to the run's threshold.
    The reference is the outlier when it fails its bar at a tap where the candidate is closer to fp64.
    `traces` are both sides' prefill traces of `ids` where the caller has them already."""
    rec = Recorder()
    wb.oracle.run(ids, "prefill", rec)
    traces, out, tables = traces or {}, {"reference_bar": REFERENCE_BAR}, {}
    for side, model in (("reference", wb.reference), ("candidate", wb.candidate)):
        trace = traces.get(side)
        if trace is None:
            trace_rec = Recorder()
            model.run(ids, "prefill", trace_rec)
            trace = trace_rec.tensors
        numbers, tables[side] = _side_against_oracle(rec.tensors, trace,
                                                     REFERENCE_BAR if side == "reference" else wb.cfg.threshold)
        out |= {f"{side}_{k}": v for k, v in numbers.items()}
    fd, cand = out["reference_first_divergence"], tables["candidate"]
    out["reference_is_outlier"] = False
    if fd is not None:
        at = (cand.layer == fd["layer"]) & (cand.op == fd["op"])
        out["candidate_cosine_at_reference_divergence"] = float(cand[at].min_cosine.iloc[0]) if at.any() else math.nan
        out["reference_is_outlier"] = bool(out["candidate_cosine_at_reference_divergence"] > fd["min_cosine"])
    return out
