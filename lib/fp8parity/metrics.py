"""Parity metrics: small pure functions, computed in float64 (the reference is always the second argument).

NaN anywhere makes cosine NaN, and NaN never passes a threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

FNV_OFFSET, FNV_PRIME, MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1)


def cosine(candidate, reference) -> float:
    a, b = _f64(candidate), _f64(reference)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b) / (na * nb)


def max_abs_diff(candidate, reference) -> float:
    return float((_f64(candidate) - _f64(reference)).abs().max())


def rel_l2(candidate, reference) -> float:
    a, b = _f64(candidate), _f64(reference)
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb else (0.0 if float(a.norm()) == 0 else math.inf)


def norm_ratio(candidate, reference) -> float:
    """|candidate| / |reference|: the one number that sees a pure scale error, which cosine cannot."""
    a, b = _f64(candidate), _f64(reference)
    nb = float(b.norm())
    return float(a.norm()) / nb if nb else (1.0 if float(a.norm()) == 0 else math.inf)


def sqnr_db(candidate, reference) -> float:
    """Signal-to-quantization-noise ratio: 10 log10(|ref|^2 / |cand - ref|^2); inf when identical."""
    a, b = _f64(candidate), _f64(reference)
    noise, signal = float(((a - b) ** 2).sum()), float((b**2).sum())
    if noise == 0:
        return math.inf
    ratio = signal / noise  # an infinite noise (an inf in the candidate) leaves no signal: -inf dB, not an error
    return 10.0 * math.log10(ratio) if ratio > 0 else (-math.inf if ratio == 0 else math.nan)


def _ordered_int(x: torch.Tensor) -> np.ndarray:
    """fp32 bits mapped so that integer order is float order (negative floats flipped)."""
    i = x.detach().to("cpu", torch.float32).reshape(-1).numpy().view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def _ordered_int_torch(x: torch.Tensor) -> torch.Tensor:
    """_ordered_int of each row of a (T, ...) tensor, on its own device: (T, n) int64 (on a CPU numpy's is 1.5x faster:
    0.75 vs 1.14 ms for 37 rows of 4,864, one thread)."""
    i = x.detach().to(torch.float32).reshape(x.shape[0], -1).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(i < 0, -(i & 0x7FFFFFFF), i)


def ulp_distance(candidate, reference) -> np.ndarray:
    """Per element: how many fp32 values lie between candidate and reference."""
    return np.abs(_ordered_int(torch.as_tensor(candidate)) - _ordered_int(torch.as_tensor(reference)))


def fnv1a64(x) -> str:
    """FNV-1a 64 over the little-endian float32 bytes (as the investigation hashed its logits).

    Sequential by definition (each step depends on the last), so a plain loop over Python ints, about
    7 MB/s here: fine for logits and one row per (layer, op), too slow to hash every tap of a trace.
    """
    return _fnv1a64_bytes(_f32_bytes(x))


def _f32_bytes(x) -> bytes:
    return torch.as_tensor(x).detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


def _fnv1a64_bytes(data: bytes) -> str:
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return f"{h:016x}"


def fnv1a64_rows(rows: list) -> list[str]:
    """fnv1a64 of each row; rows of one length hashed side by side (numpy's uint64 arithmetic wraps modulo 2**64, as
    the hash does), so many short rows cost one pass over their bytes, not one Python loop each."""
    out: list[str | None] = [None] * len(rows)
    data = [_f32_bytes(r) for r in rows]
    by_length: dict[int, list[int]] = {}
    for i, d in enumerate(data):
        by_length.setdefault(len(d), []).append(i)
    for length, idx in by_length.items():
        if len(idx) < 8:  # a few long rows (logits): the plain loop is faster than numpy's per-byte overhead
            for i in idx:
                out[i] = _fnv1a64_bytes(data[i])
            continue
        # byte j of every row side by side in memory: one contiguous row of `cols` per step
        cols = np.frombuffer(b"".join(data[i] for i in idx), dtype=np.uint8).reshape(len(idx), length).T.astype(np.uint64)
        h = np.full(len(idx), FNV_OFFSET, dtype=np.uint64)
        prime = np.uint64(FNV_PRIME)
        with np.errstate(over="ignore"):
            for col in cols:
                np.bitwise_xor(h, col, out=h)
                np.multiply(h, prime, out=h)
        for i, v in zip(idx, h.tolist(), strict=True):
            out[i] = f"{v:016x}"
    return out


@dataclass
class AffineFit:
    """candidate ~ slope * reference + intercept by ordinary least squares over all elements."""

    slope: float
    intercept: float
    pearson_r: float
    residual_rms: float
    top_residuals: list[tuple[int, float]]  # (index, residual), largest |residual| first

    def to_dict(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept, "pearson_r": self.pearson_r,
                "residual_rms": self.residual_rms, "top_residuals": self.top_residuals}

    def __str__(self) -> str:
        return f"candidate = {self.slope:.4f} * reference {self.intercept:+.4f}  (r = {self.pearson_r:.6f})"


def affine_fit(candidate, reference, top: int = 10) -> AffineFit:
    y, x = _f64(candidate), _f64(reference)
    mx, my = x.mean(), y.mean()
    dx, dy = x - mx, y - my
    var_x = float((dx * dx).mean())
    cov = float((dx * dy).mean())
    slope = cov / var_x if var_x else float("nan")
    intercept = float(my) - slope * float(mx)
    denom = math.sqrt(var_x * float((dy * dy).mean()))
    r = cov / denom if denom else float("nan")
    resid = y - (slope * x + intercept)
    k = min(top, resid.numel())
    idx = torch.topk(resid.abs(), k).indices.tolist() if k else []
    return AffineFit(slope, intercept, r, float(resid.pow(2).mean().sqrt()), [(int(i), float(resid[i])) for i in idx])


def row_metrics(candidate, reference) -> dict:
    """Everything one (position, layer, stage) row reports."""
    ulp = ulp_distance(candidate, reference)
    return {
        "cosine": cosine(candidate, reference),
        "max_abs": max_abs_diff(candidate, reference),
        "rel_l2": rel_l2(candidate, reference),
        "norm_ratio": norm_ratio(candidate, reference),
        "sqnr_db": sqnr_db(candidate, reference),
        "ulp_max": int(ulp.max()) if ulp.size else 0,
        "ulp_median": float(np.median(ulp)) if ulp.size else 0.0,
    }


def _ulp_stats(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row of two (T, n) tensors: the largest and the median ULP distance (numpy: the faster on a CPU)."""
    ulp = np.abs(_ordered_int(candidate).reshape(candidate.shape[0], -1)
                 - _ordered_int(reference).reshape(reference.shape[0], -1))
    return ulp.max(1), np.median(ulp, axis=1)


def _ulp_stats_torch(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """_ulp_stats on the tensors' device; the median by np.median's rule: the mean of the two middle values."""
    ulp = (_ordered_int_torch(candidate) - _ordered_int_torch(reference)).abs()
    n, ordered = ulp.shape[1], ulp.sort(dim=1).values
    median = (ordered[:, (n - 1) // 2].double() + ordered[:, n // 2].double()) / 2
    return ulp.amax(1).cpu().numpy(), median.cpu().numpy()


def row_metrics_batch(candidate: torch.Tensor, reference: torch.Tensor,
                      device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """row_metrics for every row of two (T, n) tensors at once: the same numbers, one vectorized pass.

    On a CUDA `device` the pass runs there: ULP counts, medians and maxima are the same integers, the float64 sums
    (norms, dot products) may differ from the CPU's in their last bit (another summation order). A stage B trace of
    the real model took 1.4 s a comparison on the host's cores; the GPU removes it from the critical path."""
    device = torch.device(device)
    candidate, reference = candidate.detach().to(device), reference.detach().to(device)  # one copy each to the device
    a, b = candidate.to(torch.float64), reference.to(torch.float64)
    finite = torch.isfinite(a).all(1) & torch.isfinite(b).all(1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    diff = a - b
    nd = diff.norm(dim=1)
    dot = (a * b).sum(1)
    energy, noise = (b * b).sum(1), (diff * diff).sum(1)
    max_abs = diff.abs().amax(1)
    ulp_max, ulp_median = (_ulp_stats if device.type == "cpu" else _ulp_stats_torch)(candidate, reference)
    finite, na, nb, nd, dot, energy, noise, max_abs = (t.cpu().numpy() for t in (finite, na, nb, nd, dot, energy,
                                                                                     noise, max_abs))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, dot / (na * nb)))
        rel = np.where(nb > 0, nd / nb, np.where(na == 0, 0.0, math.inf))
        ratio = np.where(nb > 0, na / nb, np.where(na == 0, 1.0, math.inf))
        sqnr = np.where(noise == 0, math.inf, np.where(energy > 0, 10.0 * np.log10(energy / noise), -math.inf))
    return {"cosine": np.where(finite, cos, math.nan), "max_abs": max_abs, "rel_l2": rel, "norm_ratio": ratio,
            "sqnr_db": sqnr, "ulp_max": ulp_max, "ulp_median": ulp_median}
