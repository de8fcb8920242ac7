"""What `make faults` left in a runs folder, read back without torch (the summary notebook reads them, and importing
torch is 3.6 s on the GPU host): the newest localization table, the newest detection-limit sweep, and the limits."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def latest_localization(runs_dir: str | Path) -> tuple[Path, pd.DataFrame] | None:
    """The newest `make faults` result under runs_dir, or None."""
    found = sorted(Path(runs_dir).glob("faults-*/localization.csv"))
    if not found:
        return None
    return found[-1].parent, pd.read_csv(found[-1])


def latest_sweep(runs_dir: str | Path) -> pd.DataFrame | None:
    """The newest detection-limit sweep's trials under runs_dir, or None."""
    found = sorted(Path(runs_dir).glob("faults-*/sweep_trials.csv"))
    return pd.read_csv(found[-1]) if found else None


def detection_limits(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (candidate, class): the fraction localized at each magnitude, and the smallest magnitude from which on
    every placement is localized (the detection limit)."""
    frac = trials.groupby(["candidate", "class", "magnitude"]).localized.mean().unstack("magnitude")
    limits = []
    for _, row in frac.iterrows():
        ok = [m for m in row.index if all(row[n] == 1.0 for n in row.index if n >= m)]
        limits.append(min(ok) if ok else float("nan"))
    frac.columns = [f"{m:.1%}" for m in frac.columns]
    frac["detection_limit"] = limits
    return frac.reset_index()
