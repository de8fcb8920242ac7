"""Stage B: every op of the candidate replayed on its own traced inputs by a twin of its recipe (the local check),
next to the global view: per-(layer, op) cosine and relative error against the reference, and both sides vs fp64."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm import tqdm

from fp8parity import fp8_weight_cache, metrics, parity, replay, twin
from fp8parity.config import DEFAULT_PATHS, DEFAULT_THRESHOLD
from fp8parity.qwen2 import Qwen2Model
from fp8parity.stages.oracle import measure_oracle
from fp8parity.stages.verdict import FAIL, PASS, Verdict
from fp8parity.taps import LOGITS, Recorder, forward_order
from fp8parity.trace import save_trace
from fp8parity.workbench import Workbench


def record(model, ids: list[int], path: str, positions=None, layers=None) -> dict:
    rec = Recorder(positions=positions, layers=layers)
    model.run(ids, path, rec)
    return rec.tensors


def candidate_twin(wb: Workbench) -> twin.TwinSpec:
    """The twin of the candidate's declared recipe (what the user asked for, not what a fault made it do)."""
    return twin.declared_spec(wb.backend.describe(), wb.fault.recipe or wb.cfg.recipe)


@dataclass
class ParityResult:
    twin: twin.TwinSpec
    floors: dict[str, replay.Floor]
    paths: list[str]
    prompts: list[int]
    table: pd.DataFrame  # global view: per (prompt, path, layer, op) against the reference
    local: pd.DataFrame  # local check: per (prompt, path, layer, op) against the twin, times its floor
    fingerprint: pd.DataFrame  # which twin explains the candidate's GEMMs best
    drift: list[dict]  # per prompt: prefill logits' rel. L2 to the reference, candidate and twin end to end
    oracle: dict  # both sides against fp64 (prefill of the first prompt)
    reports: dict[str, dict] = field(default_factory=dict)  # the spec's parity JSON per prompt and path
    seconds: dict[str, float] = field(default_factory=dict)  # where the measurement's time went, per phase


class _Phases:
    """Wall seconds per phase, summed over prompts and paths (what a slow stage B spends its time on)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 2)


def _save_evidence(wb: Workbench, name: str, ref: dict, cand: dict, rows: pd.DataFrame, report: dict,
                   local: pd.DataFrame) -> None:
    wb.save_json(f"stage_b/{name}/parity.json", report)
    for rec in parity.layer_jsons(rows, ref, cand):
        wb.save_json(f"stage_b/{name}/layer_{rec['layer_idx']:02d}_{rec['op']}.json", rec)
    wb.save_json(f"stage_b/{name}/local.json", local.to_dict(orient="records"))


def _save_traces(wb: Workbench, i: int, path: str, ids: list[int], ref: dict, cand: dict, spec, scales,
                 reference_traces: bool) -> None:
    base = wb.run_dir / "traces" / f"prompt{i}-{path}"
    meta = {"path": path, "prompt_ids": ids, "prompt": wb.prompts[i]} | wb.provenance()
    if reference_traces:
        save_trace(base / "reference", ref, meta | {"side": "reference", "backend": "reference"})
    save_trace(base / "candidate", cand, meta | {"side": "candidate", "twin": spec.to_dict(), "input_scales": scales})


def _logits_drift(i: int, ids: list[int], ref: dict, cand: dict, twin_model: Qwen2Model) -> dict:
    """The twin run end to end: how far a correct implementation of the recipe drifts from the reference."""
    ref_l = torch.stack([ref[(p, -1, LOGITS)] for p in range(len(ids))])
    cand_l = torch.stack([cand[(p, -1, LOGITS)] for p in range(len(ids))])
    return {"prompt": i, "candidate": metrics.rel_l2(cand_l, ref_l), "twin": metrics.rel_l2(twin_model.prefill(ids), ref_l)}


def _tag(t: pd.DataFrame, prompt: int, path: str) -> pd.DataFrame:
    t.insert(0, "path", path)
    t.insert(0, "prompt", prompt)
    return t


def measure_b(wb: Workbench, paths=DEFAULT_PATHS, prompts: list[int] | None = None, save_traces: bool = True,
              reference_traces: bool = False) -> ParityResult:
    """Both sides traced at every tap, every prompt and path; the candidate replayed op by op by its twin.

    `save_traces` keeps the candidate's traces in the run folder (the evidence); the reference's are recomputable
    from the model file (its sha256 is recorded) and are kept too only with `reference_traces`."""
    prompts = list(range(len(wb.prompts))) if prompts is None else prompts
    spec = candidate_twin(wb)
    tables, locals_, reports, drift, rp, fp, first_prefill = [], [], {}, [], None, None, {}
    phase = _Phases()
    for i in tqdm(prompts, desc="stage B prompts"):
        ids = wb.prompt_ids(i)
        wb.prepare_candidate(ids)
        scales = wb.backend.used_input_scales()  # after calibration on this prompt: the scales the candidate uses now
        if rp is None:
            twin_backend = twin.make_twin(spec, scales)
            fp8_weight_cache.attach(twin_backend, wb.reference)  # the candidate's recipe: its quantized weights
            rp = replay.Replayer(wb.reference, twin_backend, spec.gemm_class)
            twin_model = Qwen2Model(wb.gguf, backend=twin_backend, weights=wb.reference.weights)
        elif scales:  # a delayed-calibrated twin replays the scales the candidate settled on for this prompt
            twin_backend.input_scales = dict(scales)
        for path in paths:
            with phase("reference forward"):
                ref = record(wb.reference, ids, path)
            with phase("candidate forward"):
                cand = record(wb.candidate, ids, path)
            with phase("saving evidence"):
                if save_traces:
                    _save_traces(wb, i, path, ids, ref, cand, spec, scales, reference_traces)
            with phase("comparing to the reference"):
                rows = parity.compare_traces(ref, cand, wb.cfg.threshold)
                table = parity.per_op(rows)
            name = f"prompt{i}-{path}"
            reports[name] = parity.parity_report(table, wb.gguf.config.name, list(range(len(ids))), wb.cfg.threshold)
            with phase("replay by the twin"):
                local = replay.local_table(rp.replay(cand, path, ids))
            with phase("saving evidence"):
                _save_evidence(wb, name, ref, cand, rows, reports[name], local)
            with phase("fingerprint"):
                fp = replay.fingerprint(wb.reference, cand, path, ids, scales) if fp is None else fp
            if path == "prefill":
                first_prefill = first_prefill or {"reference": ref, "candidate": cand}
                with phase("twin end to end"):
                    drift.append(_logits_drift(i, ids, ref, cand, twin_model))
            tables.append(_tag(table, i, path))
            locals_.append(_tag(local, i, path))
    with phase("fp64 oracle"):
        oracle = measure_oracle(wb, wb.prompt_ids(prompts[0]), first_prefill)
    return ParityResult(spec, rp.floors, list(paths), prompts, pd.concat(tables, ignore_index=True),
                        pd.concat(locals_, ignore_index=True), fp, drift, oracle, reports, phase.seconds)


@dataclass(frozen=True)
class ParityRule:
    """Fail at the first op, in forward order over prompts and paths, whose local error is more than `factor` times
    the noise floor of its op class, or when the reference itself is the outlier against fp64.
    `threshold` is the spec's cosine rule (reported on its own line); `drift_factor` flags compounding drift."""

    factor: float = replay.ALARM_FACTOR
    threshold: float = DEFAULT_THRESHOLD
    drift_factor: float = 2.0


def beyond_floor(local: pd.DataFrame, factor: float) -> pd.DataFrame:
    """The local table with `beyond` judged at `factor` (NaN is beyond)."""
    return local.assign(beyond=~(local.times_floor <= factor) & (local.status == "measured"))


def _first_in_order(found: list[tuple[int, str, dict]], paths) -> tuple[int, str, dict] | None:
    """The earliest op in forward order over prompts and paths (ties: path order, then prompt)."""
    if not found:
        return None
    return min(found, key=lambda f: (forward_order(f[2]["op"], f[2]["layer"]), list(paths).index(f[1]), f[0]))


def _spec_first(table: pd.DataFrame, threshold: float) -> tuple[int, str, parity.Divergence] | None:
    """The spec's rule: the first (prompt, path) whose cosine to the reference drops below threshold, and where."""
    for (prompt, path), t in table.groupby(["prompt", "path"], sort=False):
        fd = parity.first_divergence(t, threshold)
        if fd is not None:
            return int(prompt), path, fd
    return None


@dataclass
class ParityVerdict(Verdict):
    rule: str
    alarm_factor: float
    twin: dict
    paths: list[str]
    prompts: list[int]
    first_beyond_floor: dict | None  # prompt, path, layer, op, position, rel_l2, times_floor, ...
    first_by_path: dict[str, dict | None]
    ops_beyond_floor: int
    worst: dict
    drift: dict
    spec_rule: dict
    reference_is_outlier: bool
    oracle: dict
    fingerprint: list[dict]
    fingerprint_text: str
    floors: dict
    min_cosine: float
    max_rel_l2: float
    unmeasured_rows: int


def judge_b(result: ParityResult, rule: ParityRule) -> ParityVerdict:
    local = beyond_floor(result.local, rule.factor)
    found = [(int(p), path, fd) for (p, path), t in local.groupby(["prompt", "path"], sort=False)
             if (fd := replay.first_beyond(t)) is not None]
    first = _first_in_order(found, result.paths)
    first_by_path = {p: _first_in_order([f for f in found if f[1] == p], result.paths) for p in result.paths}
    spec_first = _spec_first(result.table, rule.threshold)
    status = FAIL if result.oracle["reference_is_outlier"] or first is not None else PASS
    worst = replay.worst_row(local)
    drift = _drift_numbers(result.drift)
    summary = _summary(result, rule, local, first, worst, drift, spec_first)
    unmeasured = int((result.table.status == parity.UNMEASURED).sum()) + int((local.status == "UNMEASURED").sum())
    return ParityVerdict(
        "B", status, summary, f"local error > {rule.factor:g}× the noise floor of its op class", rule.factor,
        result.twin.to_dict() | {"label": result.twin.label()}, result.paths, result.prompts,
        None if first is None else {"prompt": first[0], "path": first[1]} | first[2],
        {p: None if f is None else {"prompt": f[0]} | f[2] for p, f in first_by_path.items()},
        int(local.beyond.sum()),
        {"layer": int(worst.layer), "op": worst.op, "path": worst.path, "prompt": int(worst.prompt),
         "position": int(worst.position), "rel_l2": float(worst.rel_l2), "times_floor": float(worst.times_floor)},
        drift, {"threshold": rule.threshold, "holds": spec_first is None, "first_divergence": None if spec_first is None
                else {"prompt": spec_first[0], "path": spec_first[1]} | spec_first[2].__dict__},
        result.oracle["reference_is_outlier"], result.oracle,
        result.fingerprint.drop(columns="spec").to_dict(orient="records"), replay.describe_fingerprint(result.fingerprint),
        {k: {"rel_l2": f.rel_l2, "source": f.source} for k, f in result.floors.items()},
        float(result.table.min_cosine.min()), float(result.table.max_rel_l2.max()), unmeasured)


def _drift_numbers(drift: list[dict]) -> dict:
    cand = max(d["candidate"] for d in drift) if drift else math.nan
    tw = max(d["twin"] for d in drift) if drift else math.nan
    ratio = cand / tw if tw > 0 else (1.0 if cand == 0 else math.inf)
    return {"per_prompt_prefill_logits_rel_l2": drift, "candidate": cand, "twin": tw, "ratio": ratio}


def _summary(result: ParityResult, rule: ParityRule, local: pd.DataFrame, first, worst, drift: dict,
             spec_first) -> str:
    """The verdict's sentence: what failed first and why, or how close the worst op came, then the other views."""
    oracle, label = result.oracle, result.twin.label()
    if oracle["reference_is_outlier"]:
        text = (f"the REFERENCE is the outlier: against fp64 it first falls below {oracle['reference_bar']} at "
                f"{oracle['reference_first_divergence_text']}, where the candidate is closer to fp64 "
                f"({oracle['candidate_cosine_at_reference_divergence']:.6f}); fix the reference before blaming the "
                f"candidate.")
    elif first is not None:
        text = (f"first op beyond its noise floor: {replay.describe_where(first[2], first[1])}, prompt {first[0]} — the "
                f"op itself computes differently from a correct {label} implementation on the candidate's own inputs. "
                f"{int(local.beyond.sum())} (layer, op) entries over all prompts and paths are beyond their floor.")
    else:
        where = f"L{int(worst.layer)} {worst.op}" if worst.layer >= 0 else worst.op
        worst_text = ("every op is bit-identical to its twin" if worst.times_floor == 0 else
                      f"worst {where} at {worst.times_floor:.2f}× its floor ({worst.path}, position {int(worst.position)})")
        text = (f"no op beyond its noise floor ({rule.factor:g}× the floor of its class) on {len(result.prompts)} "
                f"prompt(s) × {len(result.paths)} path(s) against the twin ({label}); {worst_text}.")
        if drift["ratio"] > rule.drift_factor:
            text += (f" But the candidate drifts {drift['ratio']:.1f}× further than its twin end to end although no op "
                     f"is locally beyond its floor: errors under the floor compound — look at the ops nearest it.")
    text += (f" End to end (prefill logits), the candidate is {drift['candidate']:.3g} (rel. L2) from the reference, its "
             f"twin {drift['twin']:.3g}.")
    text += (f" The spec's rule (cosine ≥ {rule.threshold} to the reference at every tap) "
             + ("holds." if spec_first is None else
                f"fails first at {spec_first[2]}, {spec_first[1]} path, prompt {spec_first[0]}."))
    if result.twin.granularity == "delayed":
        text += (" The declared recipe itself (DelayedScaling without calibration: scale 1.0) clips every GEMM input "
                 "above 448: a defect of the recipe, measured in stage E.")
    unmeasured = int((result.table.status == parity.UNMEASURED).sum()) + int((local.status == "UNMEASURED").sum())
    if unmeasured:
        text += f" {unmeasured} taps were present on one side only, or lacked an input: UNMEASURED, not scored."
    return text
