"""Figures the notebooks show. Each function takes plain tables/arrays and returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fp8parity.ops import LAYER_OPS  # not taps: the summary draws without importing torch

DPI = 110  # the saved figures' resolution


def save(fig: plt.Figure, path) -> object:
    """Write the figure to `path` as a PNG and return that file as an image to display: the figure is drawn once (the
    inline backend would draw it again at the cell's end: 0.3-1 s a figure, 11 figures a run)."""
    from IPython.display import Image

    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Image(filename=str(path))


def cosine_per_layer(table: pd.DataFrame, threshold: float, title: str = "") -> plt.Figure:
    """1 - cosine per layer, one line per op, log axis; the threshold as a dashed line."""
    fig, ax = plt.subplots(figsize=(12, 5))
    layered = table[table.layer >= 0]
    cmap = plt.get_cmap("tab20")
    for i, op in enumerate(LAYER_OPS):
        g = layered[layered.op == op].groupby("layer").min_cosine.min()
        if len(g):
            ax.plot(g.index, np.clip(1 - g.values, 1e-12, None), marker="o", ms=3, lw=1.2, color=cmap(i), label=op)
    for op, style in (("embedding", "v"), ("final_norm", "s"), ("logits", "*")):
        g = table[table.op == op].min_cosine
        if len(g):
            x = -0.5 if op == "embedding" else layered.layer.max() + 0.5
            ax.scatter([x], [max(1 - g.min(), 1e-12)], marker=style, s=60, color="k", zorder=5, label=op)
    ax.axhline(1 - threshold, ls="--", color="red", lw=1, label=f"threshold (cos {threshold})")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("1 − cosine (min over positions)")
    ax.set_title(title or "per-layer parity: candidate vs reference")
    ax.legend(ncol=1, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, not over it
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def affine_drift(reference: np.ndarray, candidate: np.ndarray, slope: float, intercept: float, r: float,
                 title: str = "") -> plt.Figure:
    """Scatter of candidate vs reference logits with the least-squares line, and the residuals by vocab id."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    a.scatter(reference, candidate, s=1, alpha=0.25, color="tab:blue", rasterized=True)
    lo, hi = float(min(reference.min(), candidate.min())), float(max(reference.max(), candidate.max()))
    xs = np.linspace(lo, hi, 2)
    a.plot(xs, xs, color="gray", lw=1, ls=":", label="candidate = reference")
    a.plot(xs, slope * xs + intercept, color="red", lw=1.5, label=f"fit: {slope:.4f}·ref {intercept:+.4f} (r={r:.5f})")
    a.set_xlabel("reference logit")
    a.set_ylabel("candidate logit")
    a.legend(fontsize=8, loc="upper left")  # placed, not "best": that tests every one of 150k points (0.5 s a render)
    a.set_title(title or "logits affine drift")
    resid = candidate - (slope * reference + intercept)
    b.plot(np.arange(resid.size), resid, lw=0.4, color="tab:purple", rasterized=True)
    top = np.argsort(-np.abs(resid))[:5]
    b.scatter(top, resid[top], color="red", s=12, zorder=3, label="top residuals: " + ", ".join(map(str, top)))
    b.set_xlabel("vocabulary id")
    b.set_ylabel("residual")
    lo, hi = float(resid.min()), float(resid.max())
    b.set_ylim(lo - 0.05 * (hi - lo), hi + 0.25 * (hi - lo))  # headroom: the legend above the largest residuals
    b.legend(fontsize=8, loc="upper right")
    b.set_title("residuals of the fit")
    fig.tight_layout()
    return fig


def per_dim(values: dict[str, np.ndarray], ylabel: str, limit: float | None = None, title: str = "",
            log: bool = True) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(11, 3.8))
    for name, v in values.items():
        ax.plot(np.arange(len(v)), np.maximum(np.asarray(v, float), 1e-12) if log else v, lw=0.6, label=name)
    if limit is not None:
        ax.axhline(limit, color="red", ls="--", lw=1, label=f"limit {limit:g}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("output dim")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def bars(df: pd.DataFrame, x: str, ys: list[str], title: str, ylabel: str, log: bool = False) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(ys)
    pos = np.arange(len(df))
    for i, y in enumerate(ys):
        ax.bar(pos + i * width, df[y].values, width, label=y)
    ax.set_xticks(pos + width * (len(ys) - 1) / 2, df[x].astype(str).values, rotation=30, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def affine_signatures(df: pd.DataFrame) -> plt.Figure:
    """Slope and intercept of each fault's logits fit: which faults look like GPU ≈ 0.96·CPU + 0.12.
    Left: every fault; right: the neighbourhood of the identity, where the subtle ones sit."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    near = (df.slope.between(0.9, 1.06)) & (df.intercept.between(-0.2, 0.3))
    for ax, part, title in ((axes[0], df, "all faults"), (axes[1], df[near], "near the identity")):
        ax.scatter(part.slope, part.intercept, s=40, c=np.clip(part.pearson_r, 0, 1), cmap="viridis", vmin=0.5, vmax=1,
                   zorder=3)
        for i, r in enumerate(part.itertuples()):
            if ax is axes[0] and near.loc[r.Index]:
                continue  # labelled on the right
            label = f"{r.fault} ({r.candidate})" if "candidate" in part else r.fault
            ax.annotate(label, (r.slope, r.intercept), fontsize=7, xytext=(5, 6 - 5 * (i % 3)), textcoords="offset points")
        ax.scatter([0.96], [0.12], marker="*", s=220, color="red", zorder=4, label="investigation: 0.96·CPU + 0.12")
        ax.scatter([1.0], [0.0], marker="+", s=200, color="k", zorder=4, label="identity")
        ax.set_xlabel("slope (candidate on reference logits)")
        ax.set_ylabel("intercept")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("logits affine signature per fault (colour: Pearson r)")
    fig.tight_layout()
    return fig


def local_error_per_layer(local: pd.DataFrame, factor: float, title: str = "") -> plt.Figure:
    """Stage B's local check: each op's local error as a multiple of its noise floor, per layer (log axis), with the
    alarm line; beside it the candidate's relative error to the reference per layer (the drift it accumulates)."""
    fig, ax = plt.subplots(figsize=(12, 5))
    m = local[local.status == "measured"]
    layered = m[m.layer >= 0]
    cmap = plt.get_cmap("tab20")
    for i, op in enumerate(LAYER_OPS):
        g = layered[layered.op == op].groupby("layer").times_floor.max()
        if len(g):
            ax.plot(g.index, np.clip(g.values, 1e-4, None), marker="o", ms=3, lw=1.2, color=cmap(i), label=op)
    for op, style in (("embedding", "v"), ("final_norm", "s"), ("logits", "*")):
        g = m[m.op == op].times_floor
        if len(g):
            x = -0.5 if op == "embedding" else layered.layer.max() + 0.5
            ax.scatter([x], [max(g.max(), 1e-4)], marker=style, s=60, color="k", zorder=5, label=op)
    ax.axhline(factor, ls="--", color="red", lw=1, label=f"alarm: {factor:g}× floor")
    ax.axhline(1, ls=":", color="gray", lw=1, label="noise floor")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("local error / noise floor (worst position)")
    ax.set_title(title or "local error of every op against the twin, on the candidate's own inputs")
    ax.legend(ncol=1, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def drift_per_layer(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """The global view: per layer, the candidate's relative L2 error and norm ratio against the reference at the
    residual stream (post_ffn_residual), one line per (prompt, path)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for (prompt, path), t in table[table.op == "post_ffn_residual"].groupby(["prompt", "path"]):
        t = t.sort_values("layer")
        a.plot(t.layer, np.clip(t.max_rel_l2, 1e-12, None), marker="o", ms=3, label=f"prompt {prompt} {path}")
        b.plot(t.layer, t.norm_ratio, marker="o", ms=3, label=f"prompt {prompt} {path}")
    a.set_yscale("log")
    a.set_ylabel("rel. L2 error vs reference (max over positions)")
    b.axhline(1, color="gray", ls=":", lw=1)
    b.set_ylabel("‖candidate‖ / ‖reference‖ (worst-cosine position)")
    for ax in (a, b):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title or "drift along the residual stream: candidate vs reference")
    fig.tight_layout()
    return fig


def detection_curves(trials: pd.DataFrame) -> plt.Figure:
    """Fraction of planted faults localized to their exact (layer, op, path) against fault size, per candidate."""
    classes = list(dict.fromkeys(trials["class"]))
    fig, axes = plt.subplots(1, len(classes), figsize=(6 * len(classes), 4), squeeze=False)
    for ax, cls in zip(axes[0], classes, strict=True):
        t = trials[trials["class"] == cls]
        for cand, g in t.groupby("candidate", sort=False):
            f = g.groupby("magnitude").localized.mean()
            ax.plot(f.index * 100, f.values, marker="o", label=cand)
        ax.set_xscale("log")
        mags = sorted(t.magnitude.unique())
        ax.set_xticks([m * 100 for m in mags], [f"{m:.1%}" for m in mags], minor=False)
        ax.minorticks_off()
        ax.set_xlabel(f"{cls} error (of the op's output)")
        ax.set_ylabel("fraction localized (layer, op, path)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{cls} error at one GEMM ({t.path.iloc[0]} path)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def distribution(stats, title: str = "") -> plt.Figure:
    """KLD histogram (log bins), Δp against the reference's top-token probability, KLD along the corpus."""
    kld = np.maximum(np.asarray(stats.kld), 1e-12)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.2))
    a.hist(kld, bins=np.logspace(np.log10(kld.min()), np.log10(kld.max()) + 1e-9, 50), color="tab:blue")
    a.set_xscale("log")
    a.set_xlabel("KL(reference ‖ candidate), nats")
    a.set_ylabel("positions")
    a.set_title("KLD per scored position")
    b.scatter(stats.p_ref_top, stats.delta_p, s=3, alpha=0.4, color="tab:purple")
    b.axhline(0, color="gray", lw=1, ls=":")
    b.set_xlabel("reference's top-token probability")
    b.set_ylabel("Δp = p_cand(top) − p_ref(top)")
    b.set_title("Δp against the reference's confidence")
    c.plot(stats.position, kld, lw=0.5, color="tab:red")
    c.set_yscale("log")
    c.set_xlabel("corpus position (scored halves of each window)")
    c.set_ylabel("KLD, nats")
    c.set_title("KLD along the corpus")
    for ax in (a, b, c):
        ax.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def drill_down(dd) -> plt.Figure:
    """One op on both sides: output values (histogram), error per output dim, and the first input's values."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    bins = np.histogram_bin_edges(np.concatenate([dd.reference, dd.candidate]), bins=80)
    ax.hist(dd.reference, bins=bins, histtype="step", lw=1.5, label="reference")
    ax.hist(dd.candidate, bins=bins, histtype="step", lw=1.2, ls="--", label="candidate")
    ax.set(yscale="log", xlabel="output value", ylabel="dims", title="output values")
    ax.legend()
    ax = axes[1]
    err = np.abs(dd.candidate.astype(np.float64) - dd.reference)
    ax.plot(err, lw=0.6, color="C3")
    ax.set(xlabel="output dim", ylabel="|candidate - reference|", title="error per dim", ylim=(0, None))
    ax = axes[2]
    if dd.inputs:
        name, (r, c) = next(iter(dd.inputs.items()))
        bins = np.histogram_bin_edges(np.concatenate([r, c]), bins=80)
        ax.hist(r, bins=bins, histtype="step", lw=1.5, label="reference")
        ax.hist(c, bins=bins, histtype="step", lw=1.2, ls="--", label="candidate")
        ax.set(yscale="log", xlabel="input value", title=f"input: {name}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "a lookup reads no activation", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.suptitle(dd.where)
    fig.tight_layout()
    return fig
