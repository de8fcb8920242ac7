"""Stage A: is the candidate deterministic, and how do its last-position logits compare with the reference's?"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from fp8parity import metrics
from fp8parity.config import DEFAULT_THRESHOLD
from fp8parity.stages.verdict import FAIL, PASS, Verdict
from fp8parity.workbench import Workbench


@dataclass
class ReproducerResult:
    input_ids: list[int]
    hashes: list[str]  # FNV-1a-64 of each candidate run's last-position logits
    reference_hash: str
    reference: torch.Tensor  # last-position logits
    candidate: torch.Tensor  # the first candidate run's
    fit: metrics.AffineFit  # candidate = slope * reference + intercept

    @property
    def cosine(self) -> float:
        return metrics.cosine(self.candidate, self.reference)

    @property
    def reference_argmax(self) -> int:
        return int(torch.argmax(self.reference))

    @property
    def candidate_argmax(self) -> int:
        return int(torch.argmax(self.candidate))


def measure_a(wb: Workbench, runs: int = 5, ids: list[int] | None = None) -> ReproducerResult:
    """`runs` candidate forwards of the same input, hashed; one reference forward."""
    ids = ids if ids is not None else wb.prompt_ids()
    wb.prepare_candidate(ids)
    ref = wb.reference.prefill(ids, logits_for="last")[-1].cpu()
    cand = [wb.candidate.prefill(ids, logits_for="last")[-1].cpu() for _ in tqdm(range(runs), desc="stage A runs")]
    return ReproducerResult(ids, [metrics.fnv1a64(c) for c in cand], metrics.fnv1a64(ref), ref, cand[0],
                            metrics.affine_fit(cand[0], ref))


@dataclass(frozen=True)
class ReproducerRule:
    """Pass: every run bit-identical. The reproducer's exit code says whether candidate and reference agree."""

    threshold: float = DEFAULT_THRESHOLD  # agreement: same argmax and cosine at least this


@dataclass
class ReproducerVerdict(Verdict):
    deterministic: bool
    runs: int
    candidate_hashes: list[str]
    reference_hash: str
    cosine: float
    reference_argmax: int
    candidate_argmax: int
    affine: dict
    exit_code: int  # 0: candidate and reference agree


def judge_a(result: ReproducerResult, rule: ReproducerRule) -> ReproducerVerdict:
    deterministic = len(set(result.hashes)) == 1
    agree = result.candidate_argmax == result.reference_argmax and result.cosine >= rule.threshold
    status = PASS if deterministic else FAIL
    what = "bit-identical" if deterministic else f"NOT bit-identical ({len(set(result.hashes))} distinct hashes)"
    summary = (f"{len(result.hashes)} candidate runs are {what} (FNV-1a {result.hashes[0]}); candidate vs reference: "
               f"argmax {result.candidate_argmax} vs {result.reference_argmax}, cosine {result.cosine:.6f}, "
               f"{result.fit}; the reproducer exits {0 if agree else 1} ({'agree' if agree else 'disagree'}).")
    return ReproducerVerdict("A", status, summary, deterministic, len(result.hashes), result.hashes,
                             result.reference_hash, result.cosine, result.reference_argmax, result.candidate_argmax,
                             result.fit.to_dict(), 0 if agree else 1)
