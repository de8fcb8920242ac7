"""The six stages of the falsifier cascade, one function each, returning a Verdict the notebooks show.

Pass rules follow the spec (../shared/INVESTIGATION.md) and say so where this workbook adds to them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from fp8parity import metrics, parity, replay, twin
from fp8parity.backends.emulated import EmulatedFP8Backend
from fp8parity.config import DEFAULT_PATHS, RunConfig
from fp8parity.errors import WorkbookError
from fp8parity.qwen2 import Qwen2Model, rms_norm
from fp8parity.taps import Recorder, forward_order
from fp8parity.trace import load_trace, save_trace
from fp8parity.workbench import PROBE_TOKEN, Workbench

PASS, FAIL, UNMEASURED = "pass", "fail", "unmeasured"
STAGES = {"A": "deterministic reproducer", "B": "per-layer parity", "C": "embedding lookup parity",
          "D": "pre-attention RMSNorm parity", "E": "Q/K/V FP8 matmul parity", "F": "golden output"}


MARK_COLORS = {PASS: "#1a7f37", FAIL: "#cf222e", UNMEASURED: "#6e7781"}


def verdict_mark(status: str) -> str:
    """The verdict as coloured text: no emoji, which render as empty boxes where the font lacks them."""
    return f'<span style="color:{MARK_COLORS[status]};font-weight:bold">{status.upper()}</span>'


@dataclass
class Verdict:
    stage: str
    status: str  # pass / fail / unmeasured
    summary: str  # one sentence a reviewer reads first
    numbers: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"Stage {self.stage}: {STAGES[self.stage]}"

    def to_dict(self) -> dict:
        return asdict(self) | {"title": self.title}

    def markdown(self) -> str:
        return f"### {self.title} — {verdict_mark(self.status)}\n\n{self.summary}"


def save_verdict(wb: Workbench, v: Verdict) -> None:
    wb.save_json(f"verdicts/stage_{v.stage}.json", v.to_dict() | {"provenance": wb.provenance()})


# --- A: deterministic reproducer -----------------------------------------------------------------------------
def stage_a(wb: Workbench, runs: int = 5, ids: list[int] | None = None) -> tuple[Verdict, dict]:
    """N candidate forwards of the same input: bit-identical logits? Then how they compare to the reference."""
    ids = ids if ids is not None else wb.prompt_ids()
    wb.prepare_candidate(ids)
    ref = wb.reference.prefill(ids, logits_for="last")[-1]
    cand_runs = [wb.candidate.prefill(ids, logits_for="last")[-1].cpu() for _ in tqdm(range(runs), desc="stage A runs")]
    hashes = [metrics.fnv1a64(c) for c in cand_runs]
    deterministic = len(set(hashes)) == 1
    cand = cand_runs[0]
    fit = metrics.affine_fit(cand, ref)
    agree = int(torch.argmax(cand)) == int(torch.argmax(ref)) and metrics.cosine(cand, ref) >= wb.params.threshold
    numbers = {
        "input_ids": ids[:64], "runs": runs, "candidate_hashes": hashes, "reference_hash": metrics.fnv1a64(ref),
        "deterministic": deterministic, "reference_argmax": int(torch.argmax(ref)),
        "reference_max": float(ref.max()), "candidate_argmax": int(torch.argmax(cand)), "candidate_max": float(cand.max()),
        "cosine": metrics.cosine(cand, ref), "pearson_r": fit.pearson_r, "affine": fit.to_dict(),
        "max_abs": metrics.max_abs_diff(cand, ref), "exit_code": 0 if agree else 1,
    }
    status = PASS if deterministic else FAIL
    what = "bit-identical" if deterministic else f"NOT bit-identical ({len(set(hashes))} distinct hashes)"
    summary = (f"{runs} candidate runs are {what} (FNV-1a {hashes[0]}); candidate vs reference: argmax "
               f"{numbers['candidate_argmax']} vs {numbers['reference_argmax']}, cosine {numbers['cosine']:.6f}, {fit}; "
               f"the reproducer exits {numbers['exit_code']} ({'agree' if agree else 'disagree'}).")
    return Verdict("A", status, summary, numbers), {"reference": ref, "candidate": cand}


# --- B: per-layer parity ---------------------------------------------------------------------------------------
def record(model, ids: list[int], path: str, positions=None) -> dict:
    rec = Recorder(positions=positions)
    model.run(ids, path, rec)
    return rec.tensors


DRIFT_FACTOR = 2.0  # the candidate's end-to-end drift beyond this multiple of its twin's is reported


def candidate_twin(wb: Workbench) -> twin.TwinSpec:
    """The twin of the candidate's declared recipe (what the user asked for, not what a fault made it do)."""
    return twin.declared_spec(wb.backend.describe(), wb.fault.recipe or wb.params.recipe)


def _first_in_order(found: list[tuple[int, str, dict]], paths) -> tuple[int, str, dict] | None:
    """The earliest op in forward order over prompts and paths (ties: path order, then prompt)."""
    if not found:
        return None
    return min(found, key=lambda f: (forward_order(f[2]["op"], f[2]["layer"]), list(paths).index(f[1]), f[0]))


def stage_b(wb: Workbench, paths=DEFAULT_PATHS, prompts: list[int] | None = None, save_traces: bool = True,
            factor: float = replay.ALARM_FACTOR, reference_traces: bool = False
            ) -> tuple[Verdict, pd.DataFrame, pd.DataFrame, dict]:
    """Every op of the candidate replayed on its own traced inputs by a twin of its recipe (the local check), next
    to the global view: per-(layer, op) cosine and relative error against the reference, and both sides vs fp64.

    Fails at the first op in forward order, on any prompt and path, whose local error is more than `factor` times
    the noise floor of its op class, or when the reference itself is the outlier against fp64.
    `save_traces` keeps the candidate's traces in the run folder (the evidence); the reference's are recomputable
    from the model file (its sha256 is recorded) and are kept too only with `reference_traces`.
    Returns (verdict, global table, local table, parity reports).
    """
    th = wb.params.threshold
    prompt_idx = list(range(len(wb.params.prompts))) if prompts is None else prompts
    spec = candidate_twin(wb)
    collect, wb.backend.collect_stats = wb.backend.collect_stats, False  # statistics are stage E's, not B's
    tables, locals_, reports, found, spec_first, drift, rp, fp = [], [], {}, [], None, [], None, None
    first_prefill: dict = {}  # the first prompt's prefill traces, reused for the judgment against fp64
    for i in tqdm(prompt_idx, desc="stage B prompts"):
        ids = wb.prompt_ids(i)
        wb.prepare_candidate(ids)
        scales = wb.backend.used_input_scales()  # after calibration on this prompt: the scales the candidate uses now
        if rp is None:
            twin_backend = twin.make_twin(spec, scales)
            rp = replay.Replayer(wb.reference, twin_backend, spec.gemm_class)
            twin_model = Qwen2Model(wb.gguf, backend=twin_backend, weights=wb.reference.weights)
        elif scales:  # a delayed-calibrated twin replays the scales the candidate settled on for this prompt
            twin_backend.input_scales = dict(scales)
        for path in paths:
            ref, cand = record(wb.reference, ids, path), record(wb.candidate, ids, path)
            if save_traces:
                base = wb.run_dir / "traces" / f"prompt{i}-{path}"
                meta = {"path": path, "prompt_ids": ids, "prompt": wb.params.prompts[i]} | wb.provenance()
                if reference_traces:
                    save_trace(base / "reference", ref, meta | {"side": "reference", "backend": "reference"})
                save_trace(base / "candidate", cand, meta | {"side": "candidate", "twin": spec.to_dict(),
                                                              "input_scales": scales})
            rows = parity.compare_traces(ref, cand, th)
            table = parity.per_stage(rows)
            fd = parity.first_divergence(table, th)
            if fd is not None and spec_first is None:
                spec_first = (i, path, fd)
            reports[f"prompt{i}-{path}"] = parity.parity_report(table, wb.gguf.config.name, list(range(len(ids))), th)
            wb.save_json(f"stage_b/prompt{i}-{path}/parity.json", reports[f"prompt{i}-{path}"])
            for rec in parity.layer_jsons(rows, ref, cand):
                wb.save_json(f"stage_b/prompt{i}-{path}/layer_{rec['layer_idx']:02d}_{rec['stage']}.json", rec)
            local = replay.local_table(rp.replay(cand, path, ids), factor)
            wb.save_json(f"stage_b/prompt{i}-{path}/local.json", local.to_dict(orient="records"))
            lfd = replay.first_beyond(local)
            if lfd is not None:
                found.append((i, path, lfd))
            if fp is None:
                fp = replay.fingerprint(wb.reference, cand, path, ids, scales)
            if path == "prefill" and not first_prefill:
                first_prefill = {"reference": ref, "candidate": cand}
            for t in (table, local):
                t.insert(0, "path", path)
                t.insert(0, "prompt", i)
            tables.append(table)
            locals_.append(local)
            if path == "prefill":  # the twin run end to end: how far a correct implementation drifts
                twin_logits = twin_model.prefill(ids)
                ref_l = torch.stack([ref[(p, -1, "logits")] for p in range(len(ids))])
                cand_l = torch.stack([cand[(p, -1, "logits")] for p in range(len(ids))])
                drift.append({"prompt": i, "candidate": metrics.rel_l2(cand_l, ref_l),
                              "twin": metrics.rel_l2(twin_logits, ref_l)})
    wb.backend.collect_stats = collect
    table, local = pd.concat(tables, ignore_index=True), pd.concat(locals_, ignore_index=True)
    oracle = judge_against_oracle(wb, wb.prompt_ids(prompt_idx[0]), first_prefill)
    unmeasured = int((table.status == parity.UNMEASURED).sum()) + int((local.status == "UNMEASURED").sum())
    first = _first_in_order(found, paths)
    first_by_path = {p: _first_in_order([f for f in found if f[1] == p], paths) for p in paths}
    measured = local[local.status == "measured"]
    worst = replay.worst_row(local)
    cand_drift = max(d["candidate"] for d in drift) if drift else math.nan
    twin_drift = max(d["twin"] for d in drift) if drift else math.nan
    drift_ratio = cand_drift / twin_drift if twin_drift > 0 else (1.0 if cand_drift == 0 else math.inf)
    numbers = {
        "rule": f"local error > {factor:g}× the noise floor of its op class", "alarm_factor": factor,
        "floors": {k: {"rel_l2": f.rel_l2, "source": f.source} for k, f in rp.floors.items()},
        "twin": spec.to_dict() | {"label": spec.label()}, "paths": list(paths), "prompts": prompt_idx,
        "first_beyond_floor": None if first is None else {"prompt": first[0], "path": first[1]} | first[2],
        "first_by_path": {p: None if f is None else {"prompt": f[0]} | f[2] for p, f in first_by_path.items()},
        "ops_beyond_floor": int(measured.beyond.sum()),
        "worst": {"layer": int(worst.layer), "op": worst.op, "path": worst.path, "prompt": int(worst.prompt),
                  "position": int(worst.position), "rel_l2": float(worst.rel_l2), "times_floor": float(worst.times_floor)},
        "fingerprint": fp.drop(columns="spec").to_dict(orient="records"), "fingerprint_text": replay.describe_fingerprint(fp),
        "drift": {"per_prompt_prefill_logits_rel_l2": drift, "candidate": cand_drift, "twin": twin_drift,
                  "ratio": drift_ratio},
        "spec_rule": {"threshold": th, "holds": spec_first is None,
                      "first_divergence": None if spec_first is None else
                      {"prompt": spec_first[0], "path": spec_first[1]} | spec_first[2].__dict__},
        "min_cosine": float(table.min_cosine.min()), "max_rel_l2": float(table.max_rel_l2.max()),
        "oracle": oracle, "reference_is_outlier": oracle["reference_is_outlier"], "unmeasured_rows": unmeasured,
    }
    where = f"L{int(worst.layer)} {worst.op}" if worst.layer >= 0 else worst.op
    spec_line = ("The spec's rule (cosine ≥ {th} to the reference at every tap) holds." if spec_first is None else
                 f"The spec's rule (cosine ≥ {th} to the reference at every tap) fails first at {spec_first[2]}, "
                 f"{spec_first[1]} path, prompt {spec_first[0]}.").format(th=th)
    drift_line = (f"End to end (prefill logits), the candidate is {cand_drift:.3g} (rel. L2) from the reference, its "
                  f"twin {twin_drift:.3g}.")
    if oracle["reference_is_outlier"]:
        status = FAIL
        summary = (f"the REFERENCE is the outlier: against fp64 it first falls below {REFERENCE_BAR} at "
                   f"{oracle['reference_first_divergence_text']}, where the candidate is closer to fp64 "
                   f"({oracle['candidate_cosine_at_reference_divergence']:.6f}); fix the reference before blaming the candidate.")
    elif first is not None:
        status = FAIL
        summary = (f"first op beyond its noise floor: {replay.describe_where(first[2], first[1])}, prompt {first[0]} — "
                   f"the op itself computes differently from a correct {spec.label()} implementation on the "
                   f"candidate's own inputs. {int(measured.beyond.sum())} (layer, op) entries over all prompts and paths "
                   f"are beyond their floor.")
    else:
        status = PASS
        worst_text = ("every op is bit-identical to its twin" if worst.times_floor == 0 else
                      f"worst {where} at {worst.times_floor:.2f}× its floor ({worst.path}, position {int(worst.position)})")
        summary = (f"no op beyond its noise floor ({factor:g}× the floor of its class) on {len(prompt_idx)} prompt(s) × "
                   f"{len(paths)} path(s) against the twin ({spec.label()}); {worst_text}.")
        if drift_ratio > DRIFT_FACTOR:
            summary += (f" But the candidate drifts {drift_ratio:.1f}× further than its twin end to end although no op "
                        f"is locally beyond its floor: errors under the floor compound — look at the ops nearest it.")
    summary += f" {drift_line} {spec_line}"
    if spec.granularity == "delayed":
        summary += (" The declared recipe itself (DelayedScaling without calibration: scale 1.0) clips every GEMM input "
                    "above 448: a defect of the recipe, measured in stage E.")
    if unmeasured:
        summary += f" {unmeasured} taps were present on one side only, or lacked an input: UNMEASURED, not scored."
    return Verdict("B", status, summary, numbers), table, local, reports


REFERENCE_BAR = 0.99999  # an fp32 reference agrees with fp64 to ~1e-10; anything under this is a broken reference


def stage_b_from_trace(wb: Workbench, folder: str | Path, factor: float = replay.ALARM_FACTOR
                       ) -> tuple[Verdict, pd.DataFrame, pd.DataFrame]:
    """Stage B's local check on a trace another engine dumped (or one of ours): no candidate is run.

    The twin is the one the trace's meta.json names ('twin'), else the recipe the fingerprint finds best.
    Returns (verdict, local table, fingerprint table).
    """
    tensors, meta = load_trace(Path(folder))
    path = meta.get("path", "prefill")
    if path not in DEFAULT_PATHS:
        raise WorkbookError(f"trace {folder} names path {path!r}; meta.json 'path' must be prefill or decode.")
    ids = meta.get("prompt_ids")
    scales = meta.get("input_scales") or None
    replay.check_widths(tensors, wb.gguf.config)
    fp = replay.fingerprint(wb.reference, tensors, path, ids, scales)
    if not meta.get("twin") and fp.empty:
        raise WorkbookError(f"trace {folder} holds no GEMM of layers {replay.FINGERPRINT_LAYERS} with its input, so "
                            f"no recipe can be fingerprinted; name the twin in its meta.json ('twin').")
    spec = twin.TwinSpec(**meta["twin"]) if meta.get("twin") else twin.TwinSpec(**fp.iloc[0].spec)
    rp = replay.Replayer(wb.reference, twin.make_twin(spec, scales), spec.gemm_class)
    local = replay.local_table(rp.replay(tensors, path, ids), factor)
    local.insert(0, "path", path)
    local.insert(0, "prompt", 0)
    first = replay.first_beyond(local)
    worst = replay.worst_row(local)
    unmeasured = int((local.status == "UNMEASURED").sum())
    numbers = {"trace": str(folder), "path": path, "twin": spec.to_dict() | {"label": spec.label()},
               "twin_from": "meta.json" if meta.get("twin") else "fingerprint",
               "fingerprint": fp.drop(columns="spec").to_dict(orient="records"),
               "fingerprint_text": replay.describe_fingerprint(fp), "alarm_factor": factor,
               "first_beyond_floor": first, "unmeasured_ops": unmeasured}
    source = "named in its meta.json" if meta.get("twin") else "found by the fingerprint"
    if first is not None:
        v = Verdict("B", FAIL, f"trace {Path(folder).name} ({path}): first op beyond its noise floor against the twin "
                    f"{spec.label()} ({source}): {replay.describe_where(first)}.", numbers)
    else:
        v = Verdict("B", PASS, f"trace {Path(folder).name} ({path}): no op beyond its noise floor against the twin "
                    f"{spec.label()} ({source}); worst {worst.op} (layer {int(worst.layer)}) at "
                    f"{worst.times_floor:.2f}× its floor." + (f" {unmeasured} ops UNMEASURED (an input or output "
                                                              f"not in the trace)." if unmeasured else ""), numbers)
    return v, local, fp


def judge_against_oracle(wb: Workbench, ids: list[int], traces: dict | None = None) -> dict:
    """Reference and candidate each compared to the fp64 oracle (prefill, all taps).

    The reference is held to REFERENCE_BAR (it must be beyond doubt), the candidate to the run's threshold.
    The reference is the outlier when it fails its bar at a tap where the candidate is closer to fp64.
    `traces` are both sides' prefill traces of `ids` where the caller has them already.
    """
    th = wb.params.threshold
    oracle = record(wb.oracle, ids, "prefill")
    traces = traces or {}
    out, tables = {}, {}
    for side, model in (("reference", wb.reference), ("candidate", wb.candidate)):
        bar = REFERENCE_BAR if side == "reference" else th
        trace = traces.get(side) or record(model, ids, "prefill")
        table = tables[side] = parity.per_stage(parity.compare_traces(oracle, trace, bar))
        fd = parity.first_divergence(table, bar)
        out[f"{side}_first_divergence"] = None if fd is None else fd.__dict__
        out[f"{side}_first_divergence_text"] = None if fd is None else str(fd)
        out[f"{side}_min_cosine"] = float(table.min_cosine.min())
        logits = table[table.stage == "logits"].min_cosine
        out[f"{side}_logits_cosine"] = float(logits.iloc[0]) if len(logits) else math.nan
    out["reference_bar"] = REFERENCE_BAR
    fd = out["reference_first_divergence"]
    out["reference_is_outlier"] = False
    if fd is not None:
        at = (tables["candidate"].layer == fd["layer"]) & (tables["candidate"].stage == fd["stage"])
        cand_there = float(tables["candidate"][at].min_cosine.iloc[0]) if at.any() else math.nan
        out["candidate_cosine_at_reference_divergence"] = cand_there
        out["reference_is_outlier"] = bool(cand_there > fd["min_cosine"])
    return out


# --- C: embedding lookup -----------------------------------------------------------------------------------------
def stage_c(wb: Workbench, extra_tokens: tuple[int, ...] = (PROBE_TOKEN,)) -> tuple[Verdict, pd.DataFrame]:
    """Embedding rows of the candidate vs the reference: must be bit-exact (a lookup does no arithmetic)."""
    ids = list(dict.fromkeys([t for t in extra_tokens if t < wb.gguf.config.vocab] + wb.prompt_ids()))
    ref = wb.reference.embed(ids).cpu()
    cand = wb.candidate.embed(ids).cpu().to(ref.dtype)
    rows = []
    for k, t in enumerate(ids):
        rows.append({"token": t, "text": wb.tok.decode([t]), "first16_bit_exact": bool(torch.equal(ref[k, :16], cand[k, :16])),
                     "row_bit_exact": bool(torch.equal(ref[k], cand[k])), "max_abs": metrics.max_abs_diff(cand[k], ref[k]),
                     "cosine": metrics.cosine(cand[k], ref[k])})
    df = pd.DataFrame(rows)
    bad = df[~df.row_bit_exact]
    numbers = {"tokens": len(df), "not_bit_exact": int(len(bad)), "probe_token": PROBE_TOKEN,
               "probe_first16_ref": ref[0, :16].tolist(), "probe_first16_cand": cand[0, :16].tolist()}
    if bad.empty:
        return Verdict("C", PASS, f"all {len(df)} embedding rows (token {PROBE_TOKEN} and the prompt's tokens) are "
                       f"bit-exact, first 16 values included.", numbers), df
    worst = bad.sort_values("cosine").iloc[0]
    return Verdict("C", FAIL, f"{len(bad)} of {len(df)} embedding rows differ; worst token {int(worst.token)} has cosine "
                   f"{worst.cosine:.4f} — the lookup reads the wrong row or dequantizes differently.", numbers), df


# --- D: RMSNorm --------------------------------------------------------------------------------------------------
def stage_d(wb: Workbench, max_ulp: int = 1) -> tuple[Verdict, pd.DataFrame, dict]:
    """Every layer's attn_norm on the candidate, fed the reference's own inputs, within max_ulp fp32 ULPs.

    Feeding reference inputs isolates the op from upstream drift. Also measures what eps 1e-5 instead of
    the file's eps does to the same inputs.
    """
    ids = wb.prompt_ids()
    rec = Recorder(stages=["embedding", "post_ffn_residual", "attn_norm"])
    wb.reference.prefill(ids, rec)
    n, T = wb.gguf.config.n_layers, len(ids)
    rows, ulps_l0 = [], None
    eps_c = wb.candidate.rms_eps
    file_eps = wb.gguf.config.rms_eps
    for L in range(n):
        stage_in = "embedding" if L == 0 else "post_ffn_residual"
        x = torch.stack([rec.tensors[(p, -1 if L == 0 else L - 1, stage_in)] for p in range(T)])
        ref_out = torch.stack([rec.tensors[(p, L, "attn_norm")] for p in range(T)])
        w = wb.candidate.weights.get(f"blk.{L}.attn_norm.weight")
        cand_out = rms_norm(x.to(wb.candidate.device), w.to(wb.candidate.device), eps_c).cpu().float()
        ulp = metrics.ulp_distance(cand_out, ref_out).reshape(T, -1)
        # both sides against fp64 (rounded to fp32) of the same op with the file's eps: who is less accurate?
        exact = rms_norm(x.double(), w.cpu().double(), file_eps).float()
        cand_vs_exact = metrics.ulp_distance(cand_out, exact)
        ref_vs_exact = metrics.ulp_distance(ref_out, exact)
        if L == 0:
            ulps_l0 = ulp
        rows.append({"layer": L, "max_ulp": int(ulp.max()), "frac_over": float((ulp > max_ulp).mean()),
                     "cand_ulp_vs_fp64": int(cand_vs_exact.max()), "ref_ulp_vs_fp64": int(ref_vs_exact.max()),
                     "cosine": metrics.cosine(cand_out, ref_out), "max_abs": metrics.max_abs_diff(cand_out, ref_out)})
    df = pd.DataFrame(rows)
    # the known bug class, measured on layer 0: eps 1e-5 instead of the file's eps
    x0 = torch.stack([rec.tensors[(p, -1, "embedding")] for p in range(T)])
    w0 = wb.reference.weights.get("blk.0.attn_norm.weight")
    good, wrong = rms_norm(x0, w0, wb.gguf.config.rms_eps), rms_norm(x0, w0, 1e-5)
    eps_ulp = metrics.ulp_distance(wrong, good).reshape(T, -1)
    eps_effect = {"file_eps": wb.gguf.config.rms_eps, "wrong_eps": 1e-5, "max_ulp": int(eps_ulp.max()),
                  "median_ulp": float(np.median(eps_ulp)), "max_abs": metrics.max_abs_diff(wrong, good),
                  "cosine": metrics.cosine(wrong, good), "rel_l2": metrics.rel_l2(wrong, good),
                  "x_rms_min": float(x0.pow(2).mean(-1).sqrt().min())}
    worst = df.sort_values("max_ulp").iloc[-1]
    numbers = {"candidate_eps": eps_c, "file_eps": wb.gguf.config.rms_eps, "max_ulp_allowed": max_ulp,
               "worst_layer": int(worst.layer), "worst_max_ulp": int(worst.max_ulp), "eps_1e-5_effect": eps_effect,
               "layer0_ulp_per_dim_max": ulps_l0.max(0).tolist()}
    spec_ok = bool((df.max_ulp <= max_ulp).all())
    # a GPU reduces in another order: a few ULP either way is rounding, as long as the candidate is no
    # further from fp64 than the reference is (plus max_ulp of slack)
    as_accurate = bool((df.cand_ulp_vs_fp64 <= df.ref_ulp_vs_fp64 + max_ulp).all())
    ok = spec_ok or as_accurate
    numbers["spec_rule_1ulp"] = spec_ok
    numbers["candidate_as_accurate_as_reference_vs_fp64"] = as_accurate
    numbers["worst_cand_ulp_vs_fp64"] = int(df.cand_ulp_vs_fp64.max())
    numbers["worst_ref_ulp_vs_fp64"] = int(df.ref_ulp_vs_fp64.max())
    eps_note = "" if abs(eps_c - file_eps) < 1e-12 else f" The candidate uses eps {eps_c:g}, the file says {file_eps:g}."
    if spec_ok:
        summary = (f"attn_norm on the candidate is within {max_ulp} ULP of the reference on every dim of all {n} layers "
                   f"(worst {int(worst.max_ulp)} ULP, layer {int(worst.layer)}).")
    elif ok:
        summary = (f"attn_norm differs from the reference by up to {int(worst.max_ulp)} ULP (the spec's 1-ULP rule fails), "
                   f"but the candidate is as close to fp64 as the reference is ({numbers['worst_cand_ulp_vs_fp64']} vs "
                   f"{numbers['worst_ref_ulp_vs_fp64']} ULP): reduction-order rounding, not a bug.")
    else:
        summary = (f"attn_norm differs by up to {int(worst.max_ulp)} ULP (layer {int(worst.layer)}, {worst.frac_over:.1%} of "
                   f"values over {max_ulp} ULP) and is further from fp64 than the reference ({numbers['worst_cand_ulp_vs_fp64']}"
                   f" vs {numbers['worst_ref_ulp_vs_fp64']} ULP).{eps_note}")
    return Verdict("D", PASS if ok else FAIL, summary, numbers), df, {"layer0_ulp": ulps_l0, "eps_ulp": eps_ulp}


# --- E: Q/K/V FP8 matmul ---------------------------------------------------------------------------------------
def control_granularity(backend) -> str:
    """The E4M3 rounding the backend's recipe applies, for the cast-to-representable control."""
    g = getattr(backend, "granularity", None)
    if g is not None:
        return "tensor" if g in ("batch-ftz", "delayed-calibrated") else g
    recipe = getattr(backend, "recipe_name", "current")
    return {"block": "block", "delayed": "delayed"}.get(recipe, "tensor")


def gemm_parity(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, backend, key: str,
                w_candidate: torch.Tensor | None = None) -> dict:
    """One GEMM on the candidate backend vs fp64 of what it should compute, plus the cast-to-representable control.

    `w` is the weight as the file defines it; `w_candidate` the weight as the candidate engine reads it (the
    same unless a layout bug is injected)."""
    x64, w64 = x.double(), w.double()
    exact = x64 @ w64.t() + (b.double() if b is not None else 0)
    wc = w if w_candidate is None else w_candidate
    y = backend.linear(x.to(getattr(backend, "device", "cpu")), wc, b, key).cpu().double()
    # control: the same operands rounded to E4M3 exactly as the backend's recipe would, multiplied in fp64
    emu = EmulatedFP8Backend(control_granularity(backend), accumulate="fp64")
    xq, wq, sx, sw = emu.quantize_operands(x.cpu().float(), w.cpu().float(), key)
    control = emu._gemm(xq, wq, sx, sw) + (b.double() if b is not None else 0)
    # the yardstick: a well-scaled E4M3 GEMM (current per-tensor scales), same operands, fp64 sums
    good = EmulatedFP8Backend("tensor", accumulate="fp64")
    xq, wq, sx, sw = good.quantize_operands(x.cpu().float(), w.cpu().float(), key)
    well_scaled = good._gemm(xq, wq, sx, sw) + (b.double() if b is not None else 0)
    err = (y - exact).abs()
    per_dim = ((y - exact).norm(dim=0) / exact.norm(dim=0).clamp_min(1e-30)).numpy()
    return {
        "key": key, "shape": f"({x.shape[1]}, {x.shape[0]}, {w.shape[0]})", "cosine": metrics.cosine(y, exact),
        "rel_l2": metrics.rel_l2(y, exact), "sqnr_db": metrics.sqnr_db(y, exact),
        "max_rel_err_per_dim": float(per_dim.max()), "median_rel_err_per_dim": float(np.median(per_dim)),
        "dims_over_1pct": int((per_dim > 0.01).sum()), "dims": int(per_dim.size), "max_abs": float(err.max()),
        "output_peak": float(y.abs().max()) if torch.isfinite(y).all() else math.inf,
        "nonfinite": int((~torch.isfinite(y)).sum()),
        "control_rel_l2": metrics.rel_l2(control, exact), "control_cosine": metrics.cosine(control, exact),
        "candidate_vs_control_rel_l2": metrics.rel_l2(y, control),
        "well_scaled_rel_l2": metrics.rel_l2(well_scaled, exact),
        "stats": backend.stats.get(key, emu.stats.get(key)), "per_dim": per_dim,
    }


def stage_e(wb: Workbench, layers: list[int] | None = None, synthetic_batches=(1, 8, 16, 64, 128),
            synthetic_hidden: int = 3584, outlier_factor: float = 26.0) -> tuple[Verdict, pd.DataFrame, dict]:
    """Q/K/V projections of every layer (or `layers`) on real activations (the reference's attn_norm output),
    and at the investigation's shape (3584, batch, 3584) on Gaussian activations with one outlier channel."""
    ids = wb.prompt_ids()
    wb.prepare_candidate(ids)
    layers = list(range(wb.gguf.config.n_layers)) if layers is None else layers
    rec = Recorder(layers=layers, stages=["attn_norm"])
    wb.reference.prefill(ids, rec)
    rows, per_dim = [], {}
    W = wb.candidate
    for layer in tqdm(layers, desc="stage E layers"):
        x = torch.stack([rec.tensors[(p, layer, "attn_norm")] for p in range(len(ids))])
        for proj in ("q", "k", "v"):
            name = f"blk.{layer}.attn_{proj}.weight"
            w, w_cand = wb.reference._w(name), W._w(name)
            b = W.weights.get(f"blk.{layer}.attn_{proj}.bias")
            r = gemm_parity(x, w, b, wb.backend, f"{layer}.{proj}_proj", w_candidate=w_cand)
            dims = r.pop("per_dim")
            if layer == layers[0]:
                per_dim[f"L{layer} {proj}"] = dims
            rows.append({"source": "model activations", "layer": layer, "gemm": f"{proj}_proj", "batch": len(ids)} | r)
    gen = torch.Generator().manual_seed(0)
    wsyn = torch.randn(synthetic_hidden, synthetic_hidden, generator=gen) * 0.02
    for m in synthetic_batches:
        xs = torch.randn(m, synthetic_hidden, generator=gen)
        xs[:, 408 % synthetic_hidden] *= outlier_factor
        r = gemm_parity(xs, wsyn, None, wb.backend, f"synthetic.{m}")
        r.pop("per_dim")
        rows.append({"source": f"N(0,1), dim 408 ×{outlier_factor:g}", "layer": -1, "gemm": "3584x3584", "batch": m} | r)
    df = pd.DataFrame(rows)
    model_rows = df[df.source == "model activations"]
    th = wb.params.threshold
    finite = bool((model_rows.nonfinite == 0).all())
    cos_ok = bool((model_rows.cosine >= th).all())
    # no worse than a well-scaled E4M3 GEMM of the same operands (25% and 1e-3 absolute of headroom for accumulation)
    accum_ok = bool((model_rows.rel_l2 <= 1.25 * model_rows.well_scaled_rel_l2 + 1e-3).all())
    spec_1pct = bool((model_rows.dims_over_1pct == 0).all())
    ok = finite and cos_ok and accum_ok
    worst = model_rows.sort_values("cosine").iloc[0]
    numbers = {"layers": layers, "threshold": th, "spec_rule_1pct_all_dims": spec_1pct, "finite": finite,
               "min_cosine": float(model_rows.cosine.min()), "worst_gemm": f"L{int(worst.layer)} {worst.gemm}",
               "max_rel_err_per_dim": float(model_rows.max_rel_err_per_dim.max()),
               "control_rel_l2": float(worst.control_rel_l2), "candidate_rel_l2": float(worst.rel_l2),
               "well_scaled_rel_l2": float(worst.well_scaled_rel_l2),
               "accumulation_ok": accum_ok}
    rule = "meets" if spec_1pct else "fails"
    if ok:
        summary = (f"Q/K/V of {len(layers)} layer(s) on the candidate keep cosine ≥ {th} (worst L{int(worst.layer)} "
                   f"{worst.gemm} {worst.cosine:.5f}) and "
                   f"are no worse than a well-scaled E4M3 GEMM of the same operands (rel. error {worst.rel_l2:.4f} vs "
                   f"{worst.well_scaled_rel_l2:.4f}; own-recipe cast-to-representable control {worst.control_rel_l2:.4f}, "
                   f"so the rest is accumulation); the spec's 1%-per-dim rule {rule} "
                   f"(max {numbers['max_rel_err_per_dim']:.2%}), as E4M3 (unit roundoff 2^-4) is expected to.")
    else:
        why = [] if finite else ["non-finite outputs"]
        why += [] if cos_ok else [f"cosine {worst.cosine:.5f} < {th} on L{int(worst.layer)} {worst.gemm}"]
        bad = model_rows.loc[(model_rows.rel_l2 / model_rows.well_scaled_rel_l2).idxmax()]
        culprit = "the recipe's rounding" if bad.control_rel_l2 > 1.25 * bad.well_scaled_rel_l2 else "the GEMM itself"
        why += [] if accum_ok else [f"L{int(bad.layer)} {bad.gemm} error {bad.rel_l2:.4f} exceeds a well-scaled E4M3 GEMM's "
                                    f"{bad.well_scaled_rel_l2:.4f} (own-recipe control {bad.control_rel_l2:.4f}: {culprit})"]
        summary = f"Q/K/V FP8 GEMMs fail: {'; '.join(why)}; the spec's 1% rule {rule}."
    return Verdict("E", PASS if ok else FAIL, summary, numbers), df, per_dim


# --- F: golden output ------------------------------------------------------------------------------------------
def stage_f(wb: Workbench, runs: int = 5, max_new_tokens: int = RunConfig.max_new_tokens, stop_tokens: bool | None = None
            ) -> tuple[Verdict, pd.DataFrame, dict]:
    """Each chat prompt generated `runs` times on the candidate with the GGUF's stop tokens; golden = the
    reference's output. Also shows what generation does without stop tokens (the real cause, PR #1890)."""
    use_stops = wb.fault.stop_tokens if stop_tokens is None else stop_tokens
    stops = wb.tok.stop_ids()
    collect = getattr(wb.backend, "collect_stats", None)
    if collect is not None:
        wb.backend.collect_stats = False  # per-GEMM statistics cost more than a decode step; stage E shows them
    rows = []
    for i, prompt in enumerate(tqdm(wb.params.prompts, desc="stage F prompts")):
        ids = wb.prompt_ids(i)
        wb.prepare_candidate(ids)
        golden = wb.reference.generate(ids, max_new_tokens, stops, wb.tok)
        for r in range(runs):
            out = wb.candidate.generate(ids, max_new_tokens, stops if use_stops else None, wb.tok)
            rows.append({"prompt": prompt, "run": r + 1, "golden": golden.text, "output": out.text,
                         "stop_reason": out.stop_reason, "golden_stop_reason": golden.stop_reason,
                         "tokens": len(out.tokens), "matches_golden": out.tokens == golden.tokens,
                         "im_start_count": out.text.count("<|im_start|>")})
    df = pd.DataFrame(rows)
    no_stop = wb.candidate.generate(wb.prompt_ids(0), max_new_tokens, None, wb.tok)
    if collect is not None:
        wb.backend.collect_stats = collect
    deterministic = bool(df.groupby("prompt").output.nunique().max() == 1)
    ok = bool(df.matches_golden.all())
    numbers = {"runs": runs, "stop_ids": stops, "stop_tokens_used": use_stops, "deterministic": deterministic,
               "runs_matching_golden": int(df.matches_golden.sum()), "total_runs": len(df),
               "without_stop_tokens": {"text": no_stop.text, "stop_reason": no_stop.stop_reason,
                                       "tokens": len(no_stop.tokens)}}
    if ok:
        summary = (f"all {len(df)} runs ({runs} per prompt) reproduce the reference's golden output and stop on a GGUF "
                   f"stop token {stops}.")
    else:
        bad = df[~df.matches_golden].iloc[0]
        summary = (f"{len(df) - int(df.matches_golden.sum())} of {len(df)} runs differ from the golden output; first: "
                   f"{bad.prompt!r} → {bad.output[:80]!r} (stop: {bad.stop_reason}"
                   f"{'' if use_stops else ', generated WITHOUT stop tokens'}).")
    return Verdict("F", PASS if ok else FAIL, summary, numbers), df, {}
