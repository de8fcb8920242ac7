"""Stage F: with the GGUF's stop tokens, does the candidate answer like the reference, every time?"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm import tqdm

from fp8parity import fp8_weight_cache
from fp8parity.config import RunConfig
from fp8parity.qwen2 import Qwen2Model
from fp8parity.stages.verdict import FAIL, PASS, Verdict
from fp8parity.twin import make_twin
from fp8parity.workbench import Workbench


@dataclass
class GoldenResult:
    runs: pd.DataFrame  # one row per (prompt, run): output, golden output, stop reasons, matches_golden
    stop_ids: list[int]
    stop_tokens_used: bool
    without_stop_tokens: dict  # the first prompt generated with no stop token: text, stop reason, tokens


NO_DIVERGENCE = {"diverged_at": -1, "divergence": "", "ref_margin": math.nan, "logit_noise": math.nan,
                 "twin_noise": math.nan, "top_two_swapped": False}


def logit_noise(logits: torch.Tensor, ref: torch.Tensor) -> float:
    """The RMS over the vocabulary of logits minus the reference's, their mean removed (an offset moves no margin)."""
    diff = logits.double().cpu() - ref
    return float((diff - diff.mean()).pow(2).mean().sqrt())


def twin_model(wb: Workbench) -> Qwen2Model | None:
    """A correct implementation of the candidate's declared recipe (stage B's twin, on the CPU) as a whole model: what
    its logits' noise is where the candidate left the golden output. None for another engine as the candidate."""
    if wb.engine is not None:
        return None
    from fp8parity.stages.b_parity import candidate_twin

    backend = make_twin(candidate_twin(wb), wb.backend.used_input_scales(), wb.gguf)
    model = Qwen2Model(wb.gguf, backend=backend, weights=wb.reference.weights)
    fp8_weight_cache.attach(backend, model)
    return model


def first_divergence(wb: Workbench, ids: list[int], golden: list[int], out: list[int], max_new_tokens: int,
                     twin: Qwen2Model | None = None, golden_logits: torch.Tensor | None = None,
                     out_logits: torch.Tensor | None = None) -> dict:
    """Where a run leaves the golden output, and how close a call that was: the reference's margin between its token
    and the candidate's, the candidate's logit noise and its `twin`'s (`logit_noise`), and whether the two tokens are
    both sides' top two, swapped. All logits are the ones a generation decides from at that step, along the golden
    prefix (its prefill and decode steps, not a prefill of the shared prefix, whose FP8 roundings differ): the two
    generations' own (`golden_logits`, `out_logits`: `generate(keep_logits=True)`) where given, else computed again
    (`generation_logits`, the same path); the twin's always computed."""
    i = next((k for k, (a, b) in enumerate(zip(golden, out, strict=False)) if a != b), min(len(golden), len(out)))
    if i >= min(len(golden), len(out)):  # one stopped where the other went on: never a near-tie
        return NO_DIVERGENCE | {"diverged_at": i, "divergence": "length"}
    ref = (wb.reference.generation_logits(ids, golden[:i], max_new_tokens) if golden_logits is None
           else golden_logits[i]).double().cpu()
    cand = (wb.candidate.generation_logits(ids, golden[:i], max_new_tokens) if out_logits is None
            else out_logits[i]).double().cpu()
    twin_noise = math.nan if twin is None else logit_noise(twin.generation_logits(ids, golden[:i], max_new_tokens), ref)
    swapped = ref.topk(2).indices.tolist() == [golden[i], out[i]] and cand.topk(2).indices.tolist() == [out[i], golden[i]]
    return {"diverged_at": i, "divergence": "token", "ref_margin": float(ref[golden[i]] - ref[out[i]]),
            "logit_noise": logit_noise(cand, ref), "twin_noise": twin_noise, "top_two_swapped": swapped}


def measure_f(wb: Workbench, runs: int = 5, max_new_tokens: int = RunConfig.max_new_tokens,
              stop_tokens: bool | None = None) -> GoldenResult:
    """Each chat prompt generated greedily `runs` times on the candidate; golden = the reference's generation."""
    use_stops = wb.fault.stop_tokens if stop_tokens is None else stop_tokens
    stops = wb.tok.stop_ids()
    rows, twin = [], None  # the twin: built when a run first diverges, anew where calibration gave a prompt new scales
    wb.backend.expect_one_row_gemms(len(wb.prompts) * runs * max_new_tokens)  # the candidate's decode steps to come
    for i, prompt in enumerate(tqdm(wb.prompts, desc="stage F prompts")):
        ids = wb.prompt_ids(i)
        wb.prepare_candidate(ids)
        if wb.backend.used_input_scales():  # delayed-calibrated: this prompt's scales
            twin = None
        # each generation keeps the logits it picked its tokens from: a divergence is measured on them, not recomputed
        golden = wb.reference.generate(ids, max_new_tokens, stops, wb.tok, keep_logits=True)
        seen: dict[tuple, dict] = {}
        for r in range(runs):
            out = wb.candidate.generate(ids, max_new_tokens, stops if use_stops else None, wb.tok, keep_logits=True)
            if out.tokens != golden.tokens and tuple(out.tokens) not in seen:
                if twin is None:
                    twin = twin_model(wb)  # stays None for another engine (nothing to build)
                seen[tuple(out.tokens)] = first_divergence(wb, ids, golden.tokens, out.tokens, max_new_tokens, twin,
                                                           golden.logits, out.logits)
            rows.append({"prompt": prompt, "run": r + 1, "golden": golden.text, "output": out.text,
                         "stop_reason": out.stop_reason, "golden_stop_reason": golden.stop_reason,
                         "tokens": len(out.tokens), "matches_golden": out.tokens == golden.tokens,
                         "im_start_count": out.text.count("<|im_start|>")} | seen.get(tuple(out.tokens), NO_DIVERGENCE))
    no_stop = wb.candidate.generate(wb.prompt_ids(0), max_new_tokens, None, wb.tok)
    return GoldenResult(pd.DataFrame(rows), stops, use_stops,
                        {"text": no_stop.text, "stop_reason": no_stop.stop_reason, "tokens": len(no_stop.tokens)})


@dataclass(frozen=True)
class GoldenRule:
    """Pass: at least this fraction of the runs reproduce the golden output (the spec: all of them). A run that leaves
    it at a near-tie counts as reproducing it: where the reference's margin between its token and the candidate's is
    within `tie_sigmas` standard deviations of what a correct implementation of the candidate's recipe does to a margin
    (√2 × the twin's RMS logit error at that step, measured there), whatever the two tokens' ranks: on nearly flat
    logits a correct FP8 run may pick the third token (a random 7B-shaped model: margin 0.003, noise 0.19). The
    candidate's own noise does not count: a broken candidate's would excuse its bug (attention scaled by 1/d diverged
    at margins of 11 and 17 logits, with a noise of 2.9 of its own). Another engine has no twin that generates: there,
    the two sides' top two tokens must be the same two, swapped, within 3 σ of the candidate's noise. Stopping early
    or running past the golden end is never a tie."""

    min_fraction: float = 1.0
    tie_sigmas: float = 3.0

    def near_tie(self, runs: pd.DataFrame) -> pd.Series:
        window = self.tie_sigmas * math.sqrt(2)
        twin_noise = runs.get("twin_noise", pd.Series(math.nan, index=runs.index))
        by_twin = twin_noise.notna() & (runs.ref_margin <= window * twin_noise)
        by_swap = twin_noise.isna() & runs.top_two_swapped.astype(bool) & (runs.ref_margin <= window * runs.logit_noise)
        return (runs.divergence == "token") & (by_twin | by_swap)


@dataclass
class GoldenVerdict(Verdict):
    runs_matching_golden: int
    runs_near_tie: int
    total_runs: int
    deterministic: bool
    stop_ids: list[int]
    stop_tokens_used: bool
    without_stop_tokens: dict


def _noise_text(row) -> str:
    twin_noise = getattr(row, "twin_noise", math.nan)
    if math.isnan(twin_noise):
        return f"the candidate's logit noise {row.logit_noise:.3f}"
    return f"a correct implementation's logit noise {twin_noise:.3f} (the candidate's {row.logit_noise:.3f})"


def judge_f(result: GoldenResult, rule: GoldenRule) -> GoldenVerdict:
    df = result.runs
    matching, tie = int(df.matches_golden.sum()), rule.near_tie(df)
    good = df.matches_golden | tie
    ok = int(good.sum()) >= rule.min_fraction * len(df)
    if matching == len(df):
        summary = (f"all {len(df)} runs reproduce the reference's golden output and stop on a GGUF stop token "
                   f"{result.stop_ids}.")
    elif good.all():
        t = df[tie].iloc[0]
        summary = (f"{matching} of {len(df)} runs reproduce the golden output and the other {len(df) - matching} leave "
                   f"it at a near-tie: {t.prompt!r} at generated token {t.diverged_at}, where the reference's margin "
                   f"is {t.ref_margin:.3f} logits and {_noise_text(t)} (within {rule.tie_sigmas:g} σ of a margin's "
                   f"noise); then {t.output[:60]!r}.")
    else:
        bad = df[~good].iloc[0]
        where = (f" at generated token {bad.diverged_at}: the reference's margin there is {bad.ref_margin:.3f} logits, "
                 f"{_noise_text(bad)}" if bad.divergence == "token" else
                 f" at generated token {bad.diverged_at}, where one of them stopped" if bad.divergence == "length" else "")
        summary = (f"{len(df) - int(good.sum())} of {len(df)} runs differ from the golden output beyond a near-tie; "
                   f"first: {bad.prompt!r} → {bad.output[:80]!r} (stop: {bad.stop_reason}"
                   f"{'' if result.stop_tokens_used else ', generated WITHOUT stop tokens'}){where}.")
    deterministic = bool(df.groupby("prompt").output.nunique().max() == 1)
    return GoldenVerdict("F", PASS if ok else FAIL, summary, matching, int(tie.sum()), len(df), deterministic,
                         result.stop_ids, result.stop_tokens_used, result.without_stop_tokens)
