"""E4M3 arithmetic, exactly as the GPU does it, runnable on any machine.

Scale formula (Transformer Engine's compute_scale_from_amax): scale = fp32(448) / amax with
round-to-nearest division; amax == 0 or inf -> 1; an infinite scale -> FLT_MAX; optionally rounded
down to a power of two (Float8BlockScaling). Quantize: q = e4m3(x * scale) with round-to-nearest-even,
saturating at +-448, subnormals kept (2^-9 ... 2^-6). Dequantize: q * (1 / scale).
torch's float8_e4m3fn casts exist on the CPU, so emulated operands equal the GPU's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MIN_SUBNORMAL = 2.0**-9
E4M3_SATURATION = 464.0  # round-to-nearest would take anything below 464 to 448: only beyond it is clipping
FP32_MAX = torch.finfo(torch.float32).max


def scale_from_amax(amax: torch.Tensor, pow2: bool = False, fp8_max: float = E4M3_MAX) -> torch.Tensor:
    """TE's quantization scale (multiply before the cast) from an fp32 amax; any shape."""
    amax = amax.to(torch.float32)
    scale = torch.full_like(amax, fp8_max) / amax
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)
    scale = torch.where((amax == 0) | torch.isinf(amax) | torch.isnan(scale), torch.ones_like(scale), scale)
    if pow2:
        bits = scale.view(torch.int32) & torch.tensor(0xFF800000 - 2**32, dtype=torch.int32)
        scale = bits.view(torch.float32)
    return scale


def cast_e4m3(y: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Round fp32 values to E4M3 (RNE) with saturation at +-448; returns float8_e4m3fn."""
    y = y.clamp_(-E4M3_MAX, E4M3_MAX) if inplace else y.clamp(-E4M3_MAX, E4M3_MAX)
    return y.to(torch.float8_e4m3fn)


def quantize(x: torch.Tensor, scale: torch.Tensor, flush_subnormals: bool = False) -> torch.Tensor:
    """q = e4m3(x * scale) in fp32 arithmetic; scale broadcasts (per-tensor, per-row, ...)."""
    y = x.to(torch.float32) * scale  # a fresh tensor: clamped in place
    if flush_subnormals:
        y = torch.where(y.abs() < E4M3_MIN_NORMAL, torch.zeros_like(y), y)
    return cast_e4m3(y, inplace=True)


@dataclass
class QuantStats:
    """What explains a bad FP8 cosine: how much of a tensor was lost at either end of E4M3's range."""

    amax: float
    scale_min: float
    scale_max: float
    frac_zeroed: float  # nonzero inputs that became exactly 0
    frac_subnormal: float  # nonzero results below E4M3's smallest normal (2^-6): 1-3 bits left
    frac_saturated: float  # |x * scale| beyond what rounds to 448 (>= 464), clipped

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def quant_stats(x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> QuantStats:
    xs = x.to(torch.float32) * scale
    qf = q.to(torch.float32)
    nz = x != 0
    n = max(int(nz.sum()), 1)
    s = scale.reshape(-1).float()
    return QuantStats(
        amax=float(x.abs().max()) if x.numel() else 0.0,
        scale_min=float(s.min()),
        scale_max=float(s.max()),
        frac_zeroed=float(((qf == 0) & nz).sum()) / n,
        frac_subnormal=float(((qf.abs() < E4M3_MIN_NORMAL) & (qf != 0)).sum()) / n,
        frac_saturated=float((xs.abs() >= E4M3_SATURATION).sum()) / n,
    )


# --- scales per granularity ------------------------------------------------------------------------
def amax_tensor(x: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(x)  # max(|min|, |max|) without an |x| copy
    return torch.maximum(lo.abs(), hi.abs()).to(torch.float32).reshape(1, 1)


def amax_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row (per token for activations, per output channel for a (out, in) weight): (rows, 1)."""
    return x.abs().amax(dim=1, keepdim=True).to(torch.float32)


def amax_blocks(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """amax over (rows x cols) tiles -> (ceil(R/rows), ceil(C/cols)); the edge tiles are partial."""
    R, C = x.shape
    pr, pc = (-R) % rows, (-C) % cols
    xp = torch.nn.functional.pad(x.abs().to(torch.float32), (0, pc, 0, pr))
    return xp.reshape((R + pr) // rows, rows, (C + pc) // cols, cols).amax(dim=(1, 3))


def expand_blocks(s: torch.Tensor, rows: int, cols: int, shape: tuple[int, int]) -> torch.Tensor:
    return s.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[: shape[0], : shape[1]]


def round_mantissa(x: torch.Tensor, bits: int, truncate: bool = False) -> torch.Tensor:
    """Keep `bits` explicit mantissa bits of fp32 values (RNE, or toward zero): a model of a narrow accumulator."""
    drop = 23 - bits
    i = x.to(torch.float32).contiguous().view(torch.int32)
    if not truncate:
        half = 1 << (drop - 1)
        lsb = (i >> drop) & 1
        i = i + half - 1 + lsb
    i = (i >> drop) << drop
    return i.view(torch.float32)
