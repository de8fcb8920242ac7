"""Stage D: does the candidate's pre-attention RMSNorm match the reference's to the last bit or so?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from gguf import MODEL_TENSOR

from fp8parity import metrics
from fp8parity.names import tensor_name
from fp8parity.qwen2 import rms_norm
from fp8parity.stages.verdict import FAIL, PASS, Verdict
from fp8parity.taps import EMBEDDING, GLOBAL_LAYER, Recorder
from fp8parity.workbench import Workbench

WRONG_EPS = 1e-5  # the known bug class: eps 1e-5 instead of the file's


@dataclass
class RMSNormResult:
    per_layer: pd.DataFrame  # layer, max ULP to the reference, both sides' max ULP to fp64, cosine, max abs
    ulps: list[np.ndarray]  # per layer: (positions, dims) ULP distance candidate vs reference
    eps_ulp: np.ndarray  # layer 0: ULP distance of eps 1e-5 against the file's eps, same inputs
    eps_effect: dict
    candidate_eps: float
    file_eps: float


def _norm_input(rec: Recorder, layer: int, positions: int) -> torch.Tensor:
    op, at = (EMBEDDING, GLOBAL_LAYER) if layer == 0 else ("post_ffn_residual", layer - 1)
    return torch.stack([rec.tensors[(p, at, op)] for p in range(positions)])


def measure_d(wb: Workbench) -> RMSNormResult:
    """Every layer's attn_norm on the candidate, fed the reference's own input (upstream drift cannot leak in)."""
    ids, file_eps, eps_c = wb.prompt_ids(), wb.gguf.config.rms_eps, wb.candidate.rms_eps
    rec = Recorder(ops=[EMBEDDING, "post_ffn_residual", "attn_norm"])
    wb.reference.prefill(ids, rec)
    rows, ulps = [], []
    for L in range(wb.gguf.config.n_layers):
        x = _norm_input(rec, L, len(ids))
        ref_out = torch.stack([rec.tensors[(p, L, "attn_norm")] for p in range(len(ids))])
        w = wb.candidate.weights.get(tensor_name(MODEL_TENSOR.ATTN_NORM, L))
        cand_out = rms_norm(x.to(wb.candidate.device), w.to(wb.candidate.device), eps_c).cpu().float()
        exact = rms_norm(x.double(), w.cpu().double(), file_eps).float()  # who is further from fp64?
        ulps.append(metrics.ulp_distance(cand_out, ref_out).reshape(len(ids), -1))
        rows.append({"layer": L, "max_ulp": int(ulps[-1].max()),
                     "cand_ulp_vs_fp64": int(metrics.ulp_distance(cand_out, exact).max()),
                     "ref_ulp_vs_fp64": int(metrics.ulp_distance(ref_out, exact).max()),
                     "cosine": metrics.cosine(cand_out, ref_out), "max_abs": metrics.max_abs_diff(cand_out, ref_out)})
    x0, w0 = _norm_input(rec, 0, len(ids)), wb.reference.weights.get(tensor_name(MODEL_TENSOR.ATTN_NORM, 0))
    good, wrong = rms_norm(x0, w0, file_eps), rms_norm(x0, w0, WRONG_EPS)
    eps_ulp = metrics.ulp_distance(wrong, good).reshape(len(ids), -1)
    eps_effect = {"file_eps": file_eps, "wrong_eps": WRONG_EPS, "max_ulp": int(eps_ulp.max()),
                  "median_ulp": float(np.median(eps_ulp)), "max_abs": metrics.max_abs_diff(wrong, good),
                  "cosine": metrics.cosine(wrong, good), "rel_l2": metrics.rel_l2(wrong, good),
                  "x_rms_min": float(x0.pow(2).mean(-1).sqrt().min())}
    return RMSNormResult(pd.DataFrame(rows), ulps, eps_ulp, eps_effect, eps_c, file_eps)


@dataclass(frozen=True)
class RMSNormRule:
    """The spec's rule: within max_ulp fp32 ULPs of the reference. A GPU reduces in another order, so a few ULPs
    either way also pass when the candidate is no further from fp64 than the reference (plus max_ulp of slack)."""

    max_ulp: int = 1


@dataclass
class RMSNormVerdict(Verdict):
    max_ulp_allowed: int
    worst_layer: int
    worst_max_ulp: int
    spec_rule_1ulp: bool
    candidate_as_accurate_as_reference_vs_fp64: bool
    worst_cand_ulp_vs_fp64: int
    worst_ref_ulp_vs_fp64: int
    candidate_eps: float
    file_eps: float
    eps_1e_5_effect: dict


def judge_d(result: RMSNormResult, rule: RMSNormRule) -> RMSNormVerdict:
    df = result.per_layer
    spec_ok = bool((df.max_ulp <= rule.max_ulp).all())
    as_accurate = bool((df.cand_ulp_vs_fp64 <= df.ref_ulp_vs_fp64 + rule.max_ulp).all())
    ok = spec_ok or as_accurate
    worst = df.sort_values("max_ulp").iloc[-1]
    cand64, ref64 = int(df.cand_ulp_vs_fp64.max()), int(df.ref_ulp_vs_fp64.max())
    if spec_ok:
        summary = (f"attn_norm on the candidate is within {rule.max_ulp} ULP of the reference on every dim of all "
                   f"{len(df)} layers (worst {int(worst.max_ulp)} ULP, layer {int(worst.layer)}).")
    elif ok:
        summary = (f"attn_norm differs from the reference by up to {int(worst.max_ulp)} ULP (the spec's "
                   f"{rule.max_ulp}-ULP rule fails), but the candidate is as close to fp64 as the reference is "
                   f"({cand64} vs {ref64} ULP): reduction-order rounding, not a bug.")
    else:
        over = float((result.ulps[int(worst.layer)] > rule.max_ulp).mean())
        eps = "" if abs(result.candidate_eps - result.file_eps) < 1e-12 else (
            f" The candidate uses eps {result.candidate_eps:g}, the file says {result.file_eps:g}.")
        summary = (f"attn_norm differs by up to {int(worst.max_ulp)} ULP (layer {int(worst.layer)}, {over:.1%} of "
                   f"values over {rule.max_ulp} ULP) and is further from fp64 than the reference ({cand64} vs {ref64} "
                   f"ULP).{eps}")
    return RMSNormVerdict("D", PASS if ok else FAIL, summary, rule.max_ulp, int(worst.layer), int(worst.max_ulp),
                          spec_ok, as_accurate, cand64, ref64, result.candidate_eps, result.file_eps, result.eps_effect)
