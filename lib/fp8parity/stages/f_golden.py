"""Stage F: with the GGUF's stop tokens, does the candidate answer like the reference, every time?"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from tqdm import tqdm

from fp8parity.config import RunConfig
from fp8parity.stages.verdict import FAIL, PASS, Verdict
from fp8parity.workbench import Workbench


@dataclass
class GoldenResult:
    runs: pd.DataFrame  # one row per (prompt, run): output, golden output, stop reasons, matches_golden
    stop_ids: list[int]
    stop_tokens_used: bool
    without_stop_tokens: dict  # the first prompt generated with no stop token: text, stop reason, tokens


def measure_f(wb: Workbench, runs: int = 5, max_new_tokens: int = RunConfig.max_new_tokens,
              stop_tokens: bool | None = None) -> GoldenResult:
    """Each chat prompt generated greedily `runs` times on the candidate; golden = the reference's generation."""
    use_stops = wb.fault.stop_tokens if stop_tokens is None else stop_tokens
    stops = wb.tok.stop_ids()
    rows = []
    for i, prompt in enumerate(tqdm(wb.prompts, desc="stage F prompts")):
        ids = wb.prompt_ids(i)
        wb.prepare_candidate(ids)
        golden = wb.reference.generate(ids, max_new_tokens, stops, wb.tok)
        for r in range(runs):
            out = wb.candidate.generate(ids, max_new_tokens, stops if use_stops else None, wb.tok)
            rows.append({"prompt": prompt, "run": r + 1, "golden": golden.text, "output": out.text,
                         "stop_reason": out.stop_reason, "golden_stop_reason": golden.stop_reason,
                         "tokens": len(out.tokens), "matches_golden": out.tokens == golden.tokens,
                         "im_start_count": out.text.count("<|im_start|>")})
    no_stop = wb.candidate.generate(wb.prompt_ids(0), max_new_tokens, None, wb.tok)
    return GoldenResult(pd.DataFrame(rows), stops, use_stops,
                        {"text": no_stop.text, "stop_reason": no_stop.stop_reason, "tokens": len(no_stop.tokens)})


@dataclass(frozen=True)
class GoldenRule:
    """Pass: at least this fraction of the runs reproduce the golden output (the spec: all of them)."""

    min_fraction: float = 1.0


@dataclass
class GoldenVerdict(Verdict):
    runs_matching_golden: int
    total_runs: int
    deterministic: bool
    stop_ids: list[int]
    stop_tokens_used: bool
    without_stop_tokens: dict


def judge_f(result: GoldenResult, rule: GoldenRule) -> GoldenVerdict:
    df = result.runs
    matching = int(df.matches_golden.sum())
    ok = matching >= rule.min_fraction * len(df)
    if matching == len(df):
        summary = (f"all {len(df)} runs reproduce the reference's golden output and stop on a GGUF stop token "
                   f"{result.stop_ids}.")
    else:
        bad = df[~df.matches_golden].iloc[0]
        summary = (f"{len(df) - matching} of {len(df)} runs differ from the golden output; first: {bad.prompt!r} → "
                   f"{bad.output[:80]!r} (stop: {bad.stop_reason}"
                   f"{'' if result.stop_tokens_used else ', generated WITHOUT stop tokens'}).")
    deterministic = bool(df.groupby("prompt").output.nunique().max() == 1)
    return GoldenVerdict("F", PASS if ok else FAIL, summary, matching, len(df), deterministic, result.stop_ids,
                         result.stop_tokens_used, result.without_stop_tokens)
