"""Distribution parity: the statistics against direct computations, and faults on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fp8parity import distribution
from fp8parity.config import RunConfig
from fp8parity.workbench import Workbench


def stats_of(ref_logits, cand_logits, next_ids) -> distribution.PositionStats:
    s = distribution.PositionStats()
    s.extend(range(len(ref_logits)), torch.as_tensor(ref_logits), torch.as_tensor(cand_logits),
             torch.as_tensor(next_ids))
    return s


def test_the_kld_of_a_distribution_with_itself_is_zero():
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(1)) * 3
    s = stats_of(logits, logits, torch.arange(7))
    assert s.kld == [0.0] * 7 and all(s.same_top) and s.delta_p == [0.0] * 7 and s.nll_ref == s.nll_cand


def test_kld_same_top_and_delta_p_match_a_direct_computation():
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.3, 0.2])
    s = stats_of(np.log(p)[None], np.log(q)[None], [1])
    assert s.kld[0] == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-12)
    assert s.same_top == [True] and s.delta_p[0] == pytest.approx(0.5 - 0.7)
    assert s.nll_ref[0] == pytest.approx(-math.log(0.2)) and s.nll_cand[0] == pytest.approx(-math.log(0.3))
    s = stats_of(np.log(p)[None], np.log(q[::-1].copy())[None], [0])  # the candidate's top is token 0's opposite
    assert s.same_top == [False]


def test_the_fused_kld_gives_the_textbook_expressions_bits_on_fp32_logits():
    """KL(ref || cand) per row as exp(lr) * (lr - lc) summed, lr = log_softmax of the fp32 logits made float64: the
    scorer computes it in fewer passes (kl_div, log_softmax's dtype) and must give the same numbers."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(5, 151936, generator=g) * 4
    cand = ref + torch.randn(5, 151936, generator=g) * 0.05
    s = stats_of(ref, cand, torch.arange(5))
    lr, lc = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    assert s.kld == (lr.exp() * (lr - lc)).sum(-1).clamp_min(0).tolist()
    assert s.nll_ref == (-lr[torch.arange(5), torch.arange(5)]).tolist() and min(s.kld) > 0


def test_summary_percentiles_and_perplexity_match_numpy():
    rng = np.random.default_rng(0)
    ref, cand = rng.normal(size=(200, 30)) * 2, rng.normal(size=(200, 30)) * 2
    s = stats_of(ref, cand, rng.integers(0, 30, 200))
    out = distribution.summarize(s)
    for p in distribution.PERCENTILES:
        assert out["kld_percentiles"][f"p{p:g}"] == pytest.approx(np.percentile(s.kld, p))
        assert out["delta_p_percentiles"][f"p{p:g}"] == pytest.approx(np.percentile(s.delta_p, p))
    assert out["ppl_reference"] == pytest.approx(math.exp(np.mean(s.nll_ref)))
    assert out["ppl_ratio"] == pytest.approx(math.exp(np.mean(s.nll_cand) - np.mean(s.nll_ref)))
    assert out["same_top_p"] == pytest.approx(np.mean(s.same_top))
    assert out["mean_kld_err"] == pytest.approx(np.std(s.kld, ddof=1) / math.sqrt(200))


def test_windows_score_the_second_half_of_each():
    windows = list(distribution.scored_windows(list(range(1024)), 512))
    assert len(windows) == 2 and windows[1][2][0] == 512 + 256 and windows[0][1][-1] == 510  # the last predicts 511


def run(model_path, tmp_path, backend, fault, n_tokens=1024, oracle_windows=1):
    wb = Workbench(RunConfig(model=str(model_path), backend=backend, fault=fault, max_prompts=1), tmp_path / fault)
    return distribution.distribution_parity(wb.reference, wb.candidate, wb.oracle, wb.tok, "", n_tokens,
                                            oracle_windows=oracle_windows)


def test_missing_stop_tokens_leave_the_distribution_untouched(tiny_path, tmp_path):
    r = run(tiny_path, tmp_path, "reference", "missing-stop-tokens")
    assert r.candidate["mean_kld"] == 0.0 and r.candidate["same_top_p"] == 1.0 and r.first_greedy_difference is None
    assert 0 < r.oracle["mean_kld"] < 1e-9  # fp64 vs fp32: rounding, measured, not zero
    assert r.tokens == 1024 and r.candidate["positions"] == 2 * 255


def test_a_stale_activation_cache_raises_mean_kld_by_orders_of_magnitude(default_path, tmp_path):
    """Real model, one window: correct FP8 sits far below the broken cache (the tiny random model is too fragile)."""
    clean = run(default_path, tmp_path, "emulated-fp8", "none", 512, oracle_windows=0)
    stale = run(default_path, tmp_path, "emulated-fp8", "stale-activation-cache", 512, oracle_windows=0)
    assert stale.candidate["mean_kld"] > 100 * clean.candidate["mean_kld"] > 0
    assert stale.candidate["same_top_p"] < clean.candidate["same_top_p"]


def test_the_floor_reuses_the_references_first_window(tiny_path, tmp_path):
    """The fp64 floor scores the first window against the reference logits the candidate pass computed: one reference
    prefill per window in all, and the same floor as a pass that computes them again."""
    wb = Workbench(RunConfig(model=str(tiny_path), backend="emulated-fp8", max_prompts=1), tmp_path / "w")
    calls = []
    prefill = wb.reference.prefill
    wb.reference.prefill = lambda ids, *a, **k: calls.append(len(ids)) or prefill(ids, *a, **k)
    r = distribution.distribution_parity(wb.reference, wb.candidate, wb.oracle, wb.tok, "", 1024, oracle_windows=1)
    assert calls == [512, 512]  # two windows, each once
    ids = distribution.corpus_ids(wb.tok, distribution.load_corpus("")[0], 1024)
    again = distribution.summarize(distribution.measure(wb.reference, wb.oracle, ids[:512]))
    assert r.oracle == again and 0 < r.oracle["mean_kld"] < 1e-9
