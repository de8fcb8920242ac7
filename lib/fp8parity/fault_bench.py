"""`make faults`: the cascade once clean and once per catalogued fault; a localization table and figure.

For each fault: expected stage (and layer/op), the first divergence stage B found, the verdict of every
stage, and the logits affine fit of stage A (slope, intercept, r). Runs the same stage functions the
notebooks call, on a shortened schedule (one prompt; prefill for B; 2 runs for A and F).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd

from fp8parity import stages
from fp8parity.config import DEFAULT_PROMPTS, DEFAULT_THRESHOLD, RunConfig
from fp8parity.errors import WorkbookError
from fp8parity.faults import CATALOGUE, Fault
from fp8parity.workbench import Workbench

STAGE_ORDER = "ABCDEF"


def _alarm(v: stages.Verdict) -> bool:
    return v.exit_code == 1 if isinstance(v, stages.ReproducerVerdict) else v.status == stages.FAIL


def _earlier(fd: dict | None, base_fd: dict | None) -> bool:
    from fp8parity.taps import forward_order

    if fd is None:
        return False
    return base_fd is None or forward_order(fd["op"], fd["layer"]) < forward_order(base_fd["op"], base_fd["layer"])


def new_alarms(verdicts: dict[str, stages.Verdict], baseline: dict[str, stages.Verdict] | None) -> list[str]:
    """Stages (B..F) that raise an alarm the clean run of the same candidate did not.

    Stage A only reproduces (every FP8 candidate disagrees a little), so it localizes nothing. For stage B an
    alarm also counts when the first divergence moves earlier in forward order than the clean run's.
    """
    out = []
    for s in STAGE_ORDER[1:]:
        v, b = verdicts[s], (baseline or {}).get(s)
        if _alarm(v) and (b is None or not _alarm(b)):
            out.append(s)
        elif s == "B" and _alarm(v) and _earlier(v.first_beyond_floor, b.first_beyond_floor):
            out.append(s)
    return out


def on_expected_paths(fault: Fault, vb: stages.ParityVerdict) -> bool:
    """Stage B's first op beyond its floor is the fault's (layer, op) on each expected path, and no other path alarms."""
    firsts = vb.first_by_path
    want = (fault.expected_layer, fault.expected_op)
    expected = set(firsts) if fault.expected_path == "both" else {fault.expected_path}
    return all((firsts.get(p) or {}).get("layer") == want[0] and (firsts.get(p) or {}).get("op") == want[1]
               for p in expected) and all(firsts[p] is None for p in set(firsts) - expected)


def run_stages(model: str, backend: str, recipe: str, fault: Fault, run_dir: Path, prompt: str,
               threshold: float) -> dict[str, stages.Verdict]:
    cfg = RunConfig(model=model, backend=backend, recipe=recipe, prompts=(prompt,), max_prompts=1, threshold=threshold,
                    fault=fault.name)
    wb = Workbench(cfg, run_dir / f"{fault.name}-{backend}")
    verdicts = {"A": stages.judge_a(stages.measure_a(wb, runs=2), stages.ReproducerRule(threshold)),
                "B": stages.judge_b(stages.measure_b(wb, save_traces=False), stages.ParityRule(threshold=threshold)),
                "C": stages.judge_c(stages.measure_c(wb), stages.EmbeddingRule()),
                "D": stages.judge_d(stages.measure_d(wb), stages.RMSNormRule()),
                "E": stages.judge_e(stages.measure_e(wb, synthetic_batches=()), stages.MatmulRule(threshold)),
                "F": stages.judge_f(stages.measure_f(wb, runs=2, max_new_tokens=32), stages.GoldenRule())}
    for v in verdicts.values():
        stages.save_verdict(wb, v)
    return verdicts


def summarize(fault: Fault, backend: str, verdicts: dict[str, stages.Verdict],
              baseline: dict[str, stages.Verdict] | None, seconds: float) -> dict:
    va, vb = verdicts["A"], verdicts["B"]
    fd = vb.first_beyond_floor
    alarms = new_alarms(verdicts, None if fault.name == "none" else baseline)
    found_where = "" if fd is None else f"L{fd['layer']} {fd['op']} {fd['path']} ({fd['times_floor']:.3g}× floor)"
    if vb.reference_is_outlier:
        found_where = "reference is the outlier vs fp64: " + (vb.oracle["reference_first_divergence_text"] or "")
    # localized: the expected stage alarms (or, for an honest drift, nothing new does) and stage B points at the
    # expected (layer, op) on exactly the expected path(s) when the fault has one; a corrupted reference must be
    # named as the outlier
    if fault.expected_stage == "none":
        localized = not alarms
    else:
        localized = fault.expected_stage in alarms
        if fault.side == "reference":
            localized = localized and vb.reference_is_outlier
        elif fault.expected_op is not None and "B" in alarms:  # where B fires, it must point at the op and path
            localized = localized and on_expected_paths(fault, vb)
    fit = va.affine
    return {
        "fault": fault.name, "candidate": backend, "bug_class": fault.bug_class, "reference": fault.reference,
        "expected_stage": fault.expected_stage,
        "expected_where": "" if fault.expected_op is None else
        f"L{fault.expected_layer} {fault.expected_op} {fault.expected_path}",
        "new_alarms": ",".join(alarms) or "none", "stage_b_first_divergence": found_where,
        "localized": bool(localized),
        **{f"verdict_{s}": verdicts[s].status for s in STAGE_ORDER},
        "A_exit": va.exit_code, "slope": fit["slope"], "intercept": fit["intercept"],
        "pearson_r": fit["pearson_r"], "logits_cosine": va.cosine, "seconds": round(seconds, 1),
    }


def _plan(faults: list[Fault], chosen: str) -> list[tuple[str, Fault]]:
    """Model-path faults ride on a bit-exact candidate (the reference backend); FP8 faults on the FP8 candidate, each
    group after the clean run of its own candidate (its baseline)."""
    clean = next(f for f in CATALOGUE if f.name == "none")
    plan = []
    for base in dict.fromkeys(("reference", chosen)):
        group = [f for f in faults if f.name != "none" and (
            (not f.fp8 and base == "reference") or (f.fp8 and base == chosen and chosen in f.backends))]
        if group:
            plan += [(base, clean)] + [(base, f) for f in group]
    return plan


def _write_localization(rows: list[dict], run_dir: Path, meta: dict) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df.to_csv(run_dir / "localization.csv", index=False)
    (run_dir / "localization.json").write_text(json.dumps(meta | {"rows": rows}, indent=2, default=str))
    cols = ["fault", "candidate", "expected_stage", "expected_where", "new_alarms", "stage_b_first_divergence", "localized",
            *[f"verdict_{s}" for s in STAGE_ORDER], "slope", "intercept", "pearson_r"]
    table = df[[c for c in cols if c in df]].to_markdown(index=False, floatfmt=".4f")
    (run_dir / "localization.md").write_text(table + "\n")
    measured = df[df.slope.notna()] if "slope" in df else df.iloc[0:0]
    if len(measured):
        from fp8parity.plots import DPI, affine_signatures

        affine_signatures(measured).savefig(run_dir / "affine_signatures.png", dpi=DPI)
    print(table)
    print(f"localization table: {run_dir / 'localization.md'}")
    ran = df[df.localized.notna()]
    missed = ran[~ran.localized.astype(bool)]
    if len(missed):
        print(f"not localized: {', '.join(missed.fault + ' on ' + missed.candidate)}", file=sys.stderr)
    return df


def run_fault_bench(model: str, backend: str = "emulated-fp8", runs_dir: str = "runs", only: str = "",
                    recipe: str = RunConfig.recipe, prompt: str = DEFAULT_PROMPTS[0],
                    threshold: float = DEFAULT_THRESHOLD,
                    sweep_candidates: list[str] | None = None) -> int:
    """`make faults`: every catalogued fault localized (or not) by the cascade, then the detection sweep."""
    from fp8parity.backends.factory import auto_choice
    from fp8parity.config import check_backend_runs_here
    from fp8parity.gguf_file import GGUFModel

    GGUFModel(model)
    for name in [backend] + [c.partition(":")[0] for c in sweep_candidates or []]:
        check_backend_runs_here(name, recipe)
    chosen = auto_choice() if backend == "auto" else backend
    faults = [f for f in CATALOGUE if not only or f.name in only.split(",")]
    if not faults:
        raise WorkbookError(f"no fault matches {only!r}; known: {', '.join(f.name for f in CATALOGUE)}.")
    run_dir = Path(runs_dir) / f"faults-{datetime.now():%Y%m%d-%H%M%S}-{chosen}"
    run_dir.mkdir(parents=True, exist_ok=False)
    rows, baselines = [], {}
    for base, f in _plan(faults, chosen):
        print(f"[{f.name} on {base}] ...", flush=True)
        t0 = time.perf_counter()
        try:
            verdicts = run_stages(model, base, recipe, f, run_dir, prompt, threshold)
        except WorkbookError as exc:
            rows.append({"fault": f.name, "candidate": base, "new_alarms": "error", "localized": False,
                         "stage_b_first_divergence": str(exc)})
            continue
        if f.name == "none":
            baselines[base] = verdicts
        rows.append(r := summarize(f, base, verdicts, baselines.get(base), time.perf_counter() - t0))
        print(f"[{f.name} on {base}] expected {r['expected_stage']}, new alarms {r['new_alarms']}, "
              f"B: {r['stage_b_first_divergence']}, localized {r['localized']}", flush=True)
    rows += [{"fault": f.name, "candidate": chosen, "expected_stage": f.expected_stage, "new_alarms": "not run",
              "localized": None, "stage_b_first_divergence": f"needs backend {' or '.join(f.backends)}"}
             for f in faults if f.fp8 and chosen not in f.backends]
    _write_localization(rows, run_dir, {"model": model, "backend": chosen, "recipe": recipe, "threshold": threshold})
    if sweep_candidates:
        run_sweep(model, sweep_candidates, run_dir)
    return 0


def run_sweep(model: str, candidates: list[str], run_dir: Path) -> pd.DataFrame:
    """The detection-limit sweep: table, per-trial CSV, clean runs and figure into run_dir."""
    from fp8parity.detection import sweep
    from fp8parity.fault_results import detection_limits
    from fp8parity.plots import DPI, detection_curves

    trials, cleans = sweep(model, candidates)
    trials.to_csv(run_dir / "sweep_trials.csv", index=False)
    cleans.to_csv(run_dir / "sweep_clean_runs.csv", index=False)
    limits = detection_limits(trials)
    text = limits.to_markdown(index=False, floatfmt=".3g")
    (run_dir / "detection_limits.md").write_text(text + "\n\nclean runs:\n\n" + cleans.to_markdown(index=False) + "\n")
    detection_curves(trials).savefig(run_dir / "detection_limits.png", dpi=DPI)
    print(text)
    print(cleans.to_markdown(index=False))
    print(f"detection limits: {run_dir / 'detection_limits.md'}")
    return limits
