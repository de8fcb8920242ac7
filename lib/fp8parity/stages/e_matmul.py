"""Stage E: is the FP8 GEMM itself sound, its error the rounding of its operands to E4M3 and nothing more?"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from gguf import MODEL_TENSOR
from tqdm import tqdm

from fp8parity import metrics
from fp8parity.backends.base import collecting_stats
from fp8parity.backends.emulated import EmulatedFP8Backend
from fp8parity.config import DEFAULT_THRESHOLD
from fp8parity.names import tensor_name
from fp8parity.stages.verdict import FAIL, PASS, Verdict
from fp8parity.taps import Recorder
from fp8parity.workbench import Workbench

INVESTIGATION_HIDDEN, OUTLIER_DIM, OUTLIER_FACTOR = 3584, 408, 26.0  # Qwen2.5-7B's width and its dim-408 outlier
SYNTHETIC_BATCHES = (1, 8, 16, 64, 128)


def control_granularity(backend) -> str:
    """The E4M3 rounding the backend's recipe applies, for the cast-to-representable control."""
    g = getattr(backend, "granularity", None)
    if g is not None:
        return "tensor" if g in ("batch-ftz", "delayed-calibrated") else g
    recipe = getattr(backend, "recipe_name", "current")
    return {"block": "block", "delayed": "delayed"}.get(recipe, "tensor")


def _fp64_of_e4m3(granularity: str, x: torch.Tensor, w: torch.Tensor, b, key: str) -> tuple[torch.Tensor, dict]:
    """The GEMM in fp64 on operands rounded to E4M3 at `granularity` (quantization error only), and its FP8
    statistics."""
    emu = EmulatedFP8Backend(granularity, accumulate="fp64", collect_stats=True)
    xq, wq, sx, sw = emu.quantize_operands(x.cpu().float(), w.cpu().float(), key)
    return emu._gemm(xq, wq, sx, sw) + (b.double() if b is not None else 0), emu.stats.get(key)


def gemm_parity(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, backend, key: str,
                w_candidate: torch.Tensor | None = None) -> dict:
    """One GEMM on the candidate backend vs fp64 of what it should compute, the cast-to-representable control (the
    backend's own E4M3 rounding, fp64 sums) and a well-scaled E4M3 yardstick (current per-tensor scales).

    `w` is the weight as the file defines it; `w_candidate` the weight as the candidate engine reads it."""
    exact = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    y = backend.linear(x.to(getattr(backend, "device", "cpu")), w if w_candidate is None else w_candidate, b,
                       key).cpu().double()
    control, control_stats = _fp64_of_e4m3(control_granularity(backend), x, w, b, key)
    well_scaled, _ = _fp64_of_e4m3("tensor", x, w, b, key)
    per_dim = ((y - exact).norm(dim=0) / exact.norm(dim=0).clamp_min(1e-30)).numpy()
    return {
        "key": key, "shape": f"({x.shape[1]}, {x.shape[0]}, {w.shape[0]})", "cosine": metrics.cosine(y, exact),
        "rel_l2": metrics.rel_l2(y, exact), "sqnr_db": metrics.sqnr_db(y, exact),
        "max_rel_err_per_dim": float(per_dim.max()), "median_rel_err_per_dim": float(np.median(per_dim)),
        "dims_over_1pct": int((per_dim > 0.01).sum()), "dims": int(per_dim.size),
        "max_abs": float((y - exact).abs().max()),
        "output_peak": float(y.abs().max()) if torch.isfinite(y).all() else math.inf,
        "nonfinite": int((~torch.isfinite(y)).sum()),
        "control_rel_l2": metrics.rel_l2(control, exact), "control_cosine": metrics.cosine(control, exact),
        "candidate_vs_control_rel_l2": metrics.rel_l2(y, control), "well_scaled_rel_l2": metrics.rel_l2(well_scaled, exact),
        "stats": backend.stats.get(key, control_stats), "per_dim": per_dim,
    }


@dataclass
class MatmulResult:
    gemms: pd.DataFrame  # one row per GEMM: source (model activations / synthetic), layer, gemm, batch, errors
    per_dim: dict[str, np.ndarray]  # first layer's q/k/v: relative error per output dim vs fp64

    @property
    def model_rows(self) -> pd.DataFrame:
        return self.gemms[self.gemms.source == "model activations"]


def _model_gemms(wb: Workbench, layers: list[int]) -> tuple[list[dict], dict]:
    ids = wb.prompt_ids()
    rec = Recorder(layers=layers, ops=["attn_norm"])
    wb.reference.prefill(ids, rec)
    rows, per_dim = [], {}
    for layer in tqdm(layers, desc="stage E layers"):
        x = torch.stack([rec.tensors[(p, layer, "attn_norm")] for p in range(len(ids))])
        for proj, kind in (("q", MODEL_TENSOR.ATTN_Q), ("k", MODEL_TENSOR.ATTN_K), ("v", MODEL_TENSOR.ATTN_V)):
            name = tensor_name(kind, layer)
            b = wb.candidate.weights.get(tensor_name(kind, layer, "bias"))
            r = gemm_parity(x, wb.reference._w(name), b, wb.backend, f"{layer}.{proj}_proj", wb.candidate._w(name))
            dims = r.pop("per_dim")
            if layer == layers[0]:
                per_dim[f"L{layer} {proj}"] = dims
            rows.append({"source": "model activations", "layer": layer, "gemm": f"{proj}_proj", "batch": len(ids)} | r)
    return rows, per_dim


def _synthetic_gemms(backend, batches, hidden: int, outlier_factor: float) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(hidden, hidden, generator=gen) * 0.02
    rows = []
    for m in batches:
        x = torch.randn(m, hidden, generator=gen)
        x[:, OUTLIER_DIM % hidden] *= outlier_factor
        r = gemm_parity(x, w, None, backend, f"synthetic.{m}")
        r.pop("per_dim")
        rows.append({"source": f"N(0,1), dim {OUTLIER_DIM} ×{outlier_factor:g}", "layer": -1,
                     "gemm": f"{hidden}x{hidden}", "batch": m} | r)
    return rows


def measure_e(wb: Workbench, layers: list[int] | None = None, synthetic_batches=SYNTHETIC_BATCHES,
              synthetic_hidden: int = INVESTIGATION_HIDDEN, outlier_factor: float = OUTLIER_FACTOR) -> MatmulResult:
    """Q/K/V of every layer (or `layers`) on real activations (the reference's attn_norm output), and the
    investigation's shape (hidden, batch, hidden) on Gaussian activations with one outlier channel."""
    wb.prepare_candidate(wb.prompt_ids())
    layers = list(range(wb.gguf.config.n_layers)) if layers is None else layers
    with collecting_stats(wb.backend):  # the FP8 statistics this stage shows
        rows, per_dim = _model_gemms(wb, layers)
        rows += _synthetic_gemms(wb.backend, synthetic_batches, synthetic_hidden, outlier_factor)
    return MatmulResult(pd.DataFrame(rows), per_dim)


@dataclass(frozen=True)
class MatmulRule:
    """Pass: finite, cosine to fp64 at least `threshold`, and no worse than a well-scaled E4M3 GEMM of the same
    operands (`headroom` times its error plus `slack`, for accumulation)."""

    threshold: float = DEFAULT_THRESHOLD
    headroom: float = 1.25
    slack: float = 1e-3


@dataclass
class MatmulVerdict(Verdict):
    threshold: float
    finite: bool
    min_cosine: float
    worst_gemm: str
    accumulation_ok: bool
    spec_rule_1pct_all_dims: bool
    max_rel_err_per_dim: float
    candidate_rel_l2: float
    control_rel_l2: float
    well_scaled_rel_l2: float


def _failures(m: pd.DataFrame, rule: MatmulRule, worst) -> list[str]:
    why = [] if (m.nonfinite == 0).all() else ["non-finite outputs"]
    if not (m.cosine >= rule.threshold).all():
        why.append(f"cosine {worst.cosine:.5f} < {rule.threshold} on L{int(worst.layer)} {worst.gemm}")
    bad = m.loc[(m.rel_l2 / m.well_scaled_rel_l2).idxmax()]
    if not (m.rel_l2 <= rule.headroom * m.well_scaled_rel_l2 + rule.slack).all():
        culprit = "the recipe's rounding" if bad.control_rel_l2 > rule.headroom * bad.well_scaled_rel_l2 else "the GEMM"
        why.append(f"L{int(bad.layer)} {bad.gemm} error {bad.rel_l2:.4f} exceeds a well-scaled E4M3 GEMM's "
                   f"{bad.well_scaled_rel_l2:.4f} (own-recipe control {bad.control_rel_l2:.4f}: {culprit})")
    return why


def judge_e(result: MatmulResult, rule: MatmulRule) -> MatmulVerdict:
    m = result.model_rows
    finite = bool((m.nonfinite == 0).all())
    accum_ok = bool((m.rel_l2 <= rule.headroom * m.well_scaled_rel_l2 + rule.slack).all())
    ok = finite and bool((m.cosine >= rule.threshold).all()) and accum_ok
    worst = m.sort_values("cosine").iloc[0]
    spec_1pct, max_dim = bool((m.dims_over_1pct == 0).all()), float(m.max_rel_err_per_dim.max())
    rule_1pct = "meets" if spec_1pct else "fails"
    if ok:
        summary = (f"Q/K/V of {m.layer.nunique()} layer(s) on the candidate keep cosine ≥ {rule.threshold} (worst "
                   f"L{int(worst.layer)} {worst.gemm} {worst.cosine:.5f}) and are no worse than a well-scaled E4M3 GEMM "
                   f"of the same operands (rel. error {worst.rel_l2:.4f} vs {worst.well_scaled_rel_l2:.4f}; own-recipe "
                   f"cast-to-representable control {worst.control_rel_l2:.4f}, so the rest is accumulation); the spec's "
                   f"1%-per-dim rule {rule_1pct} (max {max_dim:.2%}), as E4M3 (unit roundoff 2^-4) is expected to.")
    else:
        summary = f"Q/K/V FP8 GEMMs fail: {'; '.join(_failures(m, rule, worst))}; the spec's 1% rule {rule_1pct}."
    return MatmulVerdict("E", PASS if ok else FAIL, summary, rule.threshold, finite, float(m.cosine.min()),
                         f"L{int(worst.layer)} {worst.gemm}", accum_ok, spec_1pct, max_dim, float(worst.rel_l2),
                         float(worst.control_rel_l2), float(worst.well_scaled_rel_l2))
