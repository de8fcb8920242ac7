"""Compare two traces: a row per (position, layer, op), the per-(layer, op) table, first divergence.

A tap present on one side only is UNMEASURED: listed, never scored, never the first divergence (#3729).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from fp8parity.config import DEFAULT_THRESHOLD  # noqa: E402
from fp8parity.metrics import row_metrics_batch
from fp8parity.taps import TapKey, forward_order

MEASURED, UNMEASURED = "measured", "UNMEASURED"


def compare_traces(reference: dict[TapKey, torch.Tensor], candidate: dict[TapKey, torch.Tensor],
                   threshold: float = DEFAULT_THRESHOLD, device: str | None = None) -> pd.DataFrame:
    """One row per tap on either side, in forward order (metrics computed a (layer, op) at a time, on `device`: by
    default the GPU where there is one, see `row_metrics_batch`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    keys = sorted(set(reference) | set(candidate), key=lambda k: (forward_order(k[2], k[1]), k[0]))
    groups: dict[tuple[int, str], list[TapKey]] = {}
    for k in keys:
        groups.setdefault((k[1], k[2]), []).append(k)
    rows = []
    for (layer, op), ks in groups.items():
        both = [k for k in ks if k in reference and k in candidate]
        m = row_metrics_batch(torch.stack([candidate[k].reshape(-1) for k in both]),
                              torch.stack([reference[k].reshape(-1) for k in both]), device) if both else {}
        at = {k: i for i, k in enumerate(both)}
        for k in ks:
            row = {"position": k[0], "layer": layer, "op": op}
            if k in at:
                i = at[k]
                row |= {"status": MEASURED} | {name: (int(v[i]) if name == "ulp_max" else float(v[i])) for name, v in m.items()}
                row["passed"] = bool(row["cosine"] >= threshold)  # NaN compares False: never passes
            else:
                row |= {"status": UNMEASURED, "passed": None, "missing_on": "candidate" if k in reference else "reference"}
            rows.append(row)
    return pd.DataFrame(rows)


def per_op(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, op) in forward order: min cosine and where, max abs diff, positions compared."""
    out = []
    for (layer, op), g in rows.groupby(["layer", "op"], sort=False):
        m = g[g.status == MEASURED]
        if m.empty:
            out.append({"layer": layer, "op": op, "status": UNMEASURED, "min_cosine": math.nan,
                        "min_position": None, "max_abs": math.nan, "max_rel_l2": math.nan, "norm_ratio": math.nan,
                        "positions": 0})
            continue
        cos = m.cosine.fillna(-math.inf)
        worst = m.loc[cos.idxmin()]
        out.append({"layer": layer, "op": op, "status": MEASURED, "min_cosine": float(worst.cosine),
                    "min_position": int(worst.position), "max_abs": float(m.max_abs.max()),
                    "max_rel_l2": float(m.rel_l2.max()), "norm_ratio": float(worst.norm_ratio), "positions": len(m)})
    df = pd.DataFrame(out)
    df["order"] = [forward_order(s, L) for L, s in zip(df.layer, df.op, strict=True)]
    return df.sort_values("order").drop(columns="order").reset_index(drop=True)


@dataclass
class Divergence:
    op: str
    layer: int
    min_cosine: float
    min_position: int

    def __str__(self) -> str:
        where = f"layer {self.layer} {self.op}" if self.layer >= 0 else self.op
        return f"{where} (cosine {self.min_cosine:.6f} at position {self.min_position})"


def first_divergence(table: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> Divergence | None:
    """The first measured (layer, op) in forward order whose min cosine is below threshold (or NaN)."""
    for r in table.itertuples():
        if r.status == MEASURED and not (r.min_cosine >= threshold):
            return Divergence(r.op, int(r.layer), float(r.min_cosine), int(r.min_position))
    return None


def parity_report(table: pd.DataFrame, model: str, positions: list[int], threshold: float) -> dict:
    """The JSON of `apr parity --per-op`: model, positions, threshold, first_divergence, rows."""
    fd = first_divergence(table, threshold)
    rows = [{"op": r.op, "layer": int(r.layer), "status": r.status,
             "min_cosine": None if math.isnan(r.min_cosine) else r.min_cosine,
             "min_position": r.min_position, "max_abs": None if math.isnan(r.max_abs) else r.max_abs,
             "positions": int(r.positions)} for r in table.itertuples()]
    return {"model": model, "positions": positions, "threshold": threshold,
            "first_divergence": None if fd is None else fd.__dict__, "rows": rows}


def layer_jsons(rows: pd.DataFrame, reference: dict[TapKey, torch.Tensor],
                candidate: dict[TapKey, torch.Tensor]) -> list[dict]:
    """Stage B's spec schema, one record per (layer, op) at its worst position (checksums: FNV-1a-64)."""
    from fp8parity.metrics import fnv1a64_rows

    m = rows[rows.status == MEASURED]
    worst = [g.loc[g.cosine.fillna(-math.inf).idxmin()] for _, g in m.groupby(["layer", "op"], sort=False)]
    keys = [(int(w.position), int(w.layer), w.op) for w in worst]
    sums = fnv1a64_rows([reference[k] for k in keys] + [candidate[k] for k in keys])  # hashed side by side
    return [{"layer_idx": k[1], "op": k[2], "position": k[0], "cpu_checksum": sums[i], "gpu_checksum": sums[len(keys) + i],
             "cosine": None if math.isnan(w.cosine) else float(w.cosine), "max_abs_diff": float(w.max_abs)}
            for i, (k, w) in enumerate(zip(keys, worst, strict=True))]
