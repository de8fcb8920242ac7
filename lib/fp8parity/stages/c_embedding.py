"""Stage C: does the candidate read the same embedding rows as the reference?"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from fp8parity import metrics
from fp8parity.stages.verdict import FAIL, PASS, Verdict
from fp8parity.workbench import PROBE_TOKEN, Workbench


@dataclass
class EmbeddingResult:
    rows: pd.DataFrame  # one row per token: bit-exact (first 16 values, whole row), max abs difference, cosine
    probe_first16_reference: list[float]
    probe_first16_candidate: list[float]


def measure_c(wb: Workbench, extra_tokens: tuple[int, ...] = (PROBE_TOKEN,)) -> EmbeddingResult:
    """The embedding rows of the probe token and of every prompt token, on both sides."""
    ids = list(dict.fromkeys([t for t in extra_tokens if t < wb.gguf.config.vocab] + wb.prompt_ids()))
    ref = wb.reference.embed(ids).cpu()
    cand = wb.candidate.embed(ids).cpu().to(ref.dtype)
    rows = [{"token": t, "text": wb.tok.decode([t]), "first16_bit_exact": bool(torch.equal(ref[k, :16], cand[k, :16])),
             "row_bit_exact": bool(torch.equal(ref[k], cand[k])), "max_abs": metrics.max_abs_diff(cand[k], ref[k]),
             "cosine": metrics.cosine(cand[k], ref[k])} for k, t in enumerate(ids)]
    return EmbeddingResult(pd.DataFrame(rows), ref[0, :16].tolist(), cand[0, :16].tolist())


@dataclass(frozen=True)
class EmbeddingRule:
    """A lookup does no arithmetic: every row must be bit-exact (a tolerance is there to ask "what if")."""

    max_abs: float = 0.0


@dataclass
class EmbeddingVerdict(Verdict):
    tokens: int
    rows_beyond: int
    max_abs: float
    probe_token: int


def judge_c(result: EmbeddingResult, rule: EmbeddingRule) -> EmbeddingVerdict:
    rows = result.rows
    bad = rows[~(rows.max_abs <= rule.max_abs)]  # NaN is beyond
    exact = "bit-exact" if rule.max_abs == 0 else f"within {rule.max_abs:g}"
    if bad.empty:
        summary = f"all {len(rows)} embedding rows (token {PROBE_TOKEN} and the prompt's tokens) are {exact}."
    else:
        worst = bad.sort_values("cosine").iloc[0]
        summary = (f"{len(bad)} of {len(rows)} embedding rows are not {exact}; worst token {int(worst.token)} has "
                   f"cosine {worst.cosine:.4f} — the lookup reads the wrong row or dequantizes differently.")
    return EmbeddingVerdict("C", PASS if bad.empty else FAIL, summary, len(rows), len(bad), float(rows.max_abs.max()),
                            PROBE_TOKEN)
