"""The twin of llama.cpp's CPU matrix multiplications: before its integer dot products, ggml quantizes the activations
to the type the weight's kernel pairs with (Q8_K for the K-quants, Q8_0 / Q8_1 for the older block types, fp16 for F16
weights). That rounding is llama.cpp's intended arithmetic, not a bug: replayed here on the candidate's own inputs
(activations rounded the same way, then an exact dot product with the dequantized weight), a correct llama.cpp op
agrees to fp32 accumulation noise, and whatever remains is what stage B should look at.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fp8parity.backends.base import LinearBackend
from fp8parity.names import OUTPUT, TOKEN_EMBD, tensor_name
from fp8parity.taps import LINEAR_OPS

# ggml-cpu's vec_dot_type of each weight type (ggml/src/ggml-cpu/ggml-cpu.c, type_traits_cpu)
VEC_DOT_TYPE = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1", "Q2_K": "Q8_K",
                "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "F16": "F16", "BF16": "BF16", "F32": "F32"}


def gemm_tensors(gguf) -> dict[str, str]:
    """GEMM key (as the forward names it: '3.q_proj', 'lm_head') -> the GGUF tensor of its weight."""
    names = {f"{L}.{op}": tensor_name(kind, L) for L in range(gguf.config.n_layers) for op, _, kind, _ in LINEAR_OPS}
    return names | {"lm_head": TOKEN_EMBD if gguf.config.tied_embeddings else OUTPUT}


def weight_types(gguf) -> dict[str, str]:
    """GEMM key -> the GGUF type of its weight."""
    return {key: gguf.qtype(name) for key, name in gemm_tensors(gguf).items()}


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 / Q8_1 as x86 ggml-cpu's quantize_row_q8_0 rounds: per 32 values id = 127 / amax, q = round half to even
    (the AVX path's _mm256_round_ps), the scale d = amax / 127 stored in fp16; returned as q * fp16(d)."""
    t, n = x.shape
    if n % 32:
        return x
    b = x.reshape(t, n // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax == 0, torch.zeros_like(amax), torch.full_like(amax, 127.0) / amax)  # a true division, as C
    q = torch.round(b * inv)
    return (q * (amax / 127.0).half().float()).reshape(t, n)


def ggml_rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple:
    """cos/sin (T, head_dim) as ggml computes its RoPE angles (ggml-cpu's rope_cache_init): theta_scale =
    powf(base, -2/head_dim) in fp32, each pair's angle the previous one times theta_scale, in fp32, starting from the
    position; cos and sin of the fp32 angle, rounded to fp32 (glibc's cosf/sinf are that accurate)."""
    scale = torch.tensor(theta, dtype=torch.float32) ** torch.tensor(-2.0 / head_dim, dtype=torch.float32)
    angles = [positions.to(torch.float32)]
    for _ in range(head_dim // 2 - 1):
        angles.append(angles[-1] * scale)  # one fp32 rounding a pair, as the C loop's theta *= theta_scale
    a = torch.stack(angles, dim=-1).double()
    cos, sin = a.cos().float(), a.sin().float()
    return torch.cat((cos, cos), -1).to(dtype=dtype, device=device), torch.cat((sin, sin), -1).to(dtype=dtype, device=device)


def quantize_activations(x: torch.Tensor, vec_dot: str) -> torch.Tensor:
    """The activations as ggml-cpu rounds them for a kernel of `vec_dot` type (returned dequantized, in fp32)."""
    from fp8parity.qwen2 import quantize_q8_k

    if vec_dot == "Q8_K":
        return quantize_q8_k(x.float())
    if vec_dot in ("Q8_0", "Q8_1"):
        return _q8_0(x.float())
    if vec_dot == "F16":
        return x.half().float()
    if vec_dot == "BF16":
        return x.bfloat16().float()
    return x.float()


class GGMLCPUTwin(LinearBackend):
    """llama.cpp's CPU GEMM: activations rounded for the weight's kernel, then an exact (fp64) dot product with the
    weight as the file defines it, rounded to fp32; the bias added in fp32."""

    name = "ggml-cpu twin"
    rope_tables = staticmethod(ggml_rope_tables)  # the replay's RoPE angles as ggml forms them

    def __init__(self, types: dict[str, str]):
        super().__init__()
        self.types = types

    def linear(self, x, w, b, key):
        xq = quantize_activations(x, VEC_DOT_TYPE.get(self.types.get(key, "F32"), "F32"))
        y = (xq.double() @ w.double().t()).float()
        return y if b is None else y + b.float()


# --- llama.cpp's CUDA kernels (ggml-cuda, built with -use_fast_math) ---------------------------------------------------
# Up to MMVQ_MAX_BATCH rows (decode) a quantized GEMM runs MMVQ, more rows (prefill) MMQ (ggml-cuda.cu, mmvq.cuh; MMQ on
# every card with int8 tensor cores). Both round the activations to Q8_1: per 32 values, d = amax / 127, q = roundf(x/d).
MMVQ_MAX_BATCH = 8
# MMQ stores the Q8_1 scale with the block sum as an fp16 pair (DS4 layout) for these weight types, as fp32 otherwise
# (mmq.cuh, mmq_get_q8_1_ds_layout); MMVQ's block_q8_1 always holds it in fp16
MMQ_DS4 = {"Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K"}
# MMVQ applies these types' offset through the activation block's fp16 sum of the unquantized values, not through the
# quantized ones: d * (d8 * Σ (q + off) q8 - off * s8) (vecdotq.cuh, vec_dot_q4_0/q5_0_q8_1_impl); block bytes
MMVQ_SUM_OFFSET = {"Q4_0": 8, "Q5_0": 16}
BLOCK_BYTES = {"Q4_0": 18, "Q5_0": 22}
QUANTIZED = set(VEC_DOT_TYPE) - {"F16", "BF16", "F32"}
# -use_fast_math divides approximately (2 ulp): where x/d lies this many fp32 ulps from a rounding tie, the GPU may round
# either way, and the twin admits both (one quantization step, at that one activation)
TIE_ULPS = 4


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero) of fp32 values, evaluated exactly in fp64."""
    v = v.double()
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _blocks32(x: torch.Tensor) -> torch.Tensor:
    t, n = x.shape
    return x.float().reshape(t, n // 32, 32)


def q8_1(x: torch.Tensor, kernel: str, scale_fp16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations as ggml-cuda's Q8_1 quantizers round them, per 32 values: MMVQ (quantize_q8_1) d = amax/127,
    q = roundf(x/d); MMQ (quantize_mmq_q8_1) q = roundf(x * (127/amax)), d = 1/(127/amax). Returns (q, d as the
    kernel stores it, other), each (T, n/32, 32 | 1); `other` is, for values within TIE_ULPS of a rounding tie, the
    step to the other rounding (+1 or -1), and 0 elsewhere."""
    b = _blocks32(x)
    amax = b.abs().amax(-1, keepdim=True)
    zero = amax == 0
    safe = torch.where(zero, torch.ones_like(amax), amax)
    if kernel == "mmvq":
        d = safe / 127.0
        v = b / d
    else:
        inv = torch.full_like(safe, 127.0) / safe  # true divisions, as the C source writes them
        v = b * inv
        d = 1.0 / inv
    q = torch.where(zero, torch.zeros_like(b), _roundf(v).float())
    ulp = torch.abs(torch.nextafter(v, torch.full_like(v, math.inf)) - v)
    tie = ((v.abs() - v.abs().floor() - 0.5).abs() <= TIE_ULPS * ulp) & ~zero
    other = torch.where(tie, torch.sign(v.double() - q.double()).float(), torch.zeros_like(v))
    d = torch.where(zero, torch.zeros_like(d), d)
    return q, (d.half().float() if scale_fp16 else d), other


def q4_k_mmq_parts(raw: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_K weight as MMQ's tensor-core path multiplies it: each 32-value sub-block's d*sc and dmin*m formed in fp16
    (mmq-load-tiles.cuh: dm * make_half2(sc, m)). Returns (W1: q * fp16(d*sc), (rows, cols); M: fp16(dmin*m),
    (rows, cols/32)); the GEMM is then x̂ @ W1ᵀ - fp16(block sums of x) @ Mᵀ."""
    from fp8parity.dequant import _f16, _k_scale_min, _q4_k

    b = raw.reshape(-1, 144)
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    a = (_f16(b, 0) * sc.float()).half().float()
    m = (_f16(b, 1) * mn.float()).half().float()
    unit = b.clone()  # d = 1, dmin = 0, every scale 1: dequantizing yields the 4-bit values themselves
    unit[:, 0:4] = torch.tensor([0x00, 0x3C, 0x00, 0x00], dtype=torch.uint8)
    unit[:, 4:16] = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.uint8)
    q = torch.empty(n * 256, dtype=torch.float32)
    _q4_k(unit, q.view(n, 256))
    w1 = (q.view(n, 8, 32) * a.view(n, 8, 1)).reshape(rows, cols)
    return w1, m.reshape(rows, cols // 32)


def fp16_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each 32-value block's sum as the kernels store it (fp16), and the step to its other fp16 rounding where the
    fp32 sum lies within the reach of another summation order of a tie (32 · 2^-24 · Σ|x|), 0 elsewhere: ggml-cuda
    sums by warp shuffles, and one such block on the H200 rounded the other way (an 8.6e-5 row error, 1.3e-7 after)."""
    b = _blocks32(x)
    s32 = b.sum(-1)
    s16 = s32.half()
    up = torch.nextafter(s16, torch.full_like(s16, math.inf)).float()
    down = torch.nextafter(s16, torch.full_like(s16, -math.inf)).float()
    h = s16.float()
    other = torch.where(s32 >= h, up, down)  # the neighbour on s32's side of h
    reach = 32 * 2.0**-24 * b.abs().sum(-1)
    near = ((s32 - (h + other) / 2).abs() <= reach) & torch.isfinite(other)
    return h, torch.where(near, other - h, torch.zeros_like(h))


def block_scales(raw: torch.Tensor, rows: int, cols: int, qtype: str) -> torch.Tensor:
    """The fp16 scale d of each 32-value block of a Q4_0 / Q5_0 weight, (rows, cols/32)."""
    b = raw.reshape(-1, BLOCK_BYTES[qtype])
    return b[:, :2].contiguous().view(torch.float16).float().reshape(rows, cols // 32)


class GGMLCUDATwin(LinearBackend):
    """llama.cpp's CUDA GEMMs: activations rounded to Q8_1 as MMVQ (≤ 8 rows) or MMQ (more) round them, a Q4_K weight's
    sub-block scales in fp16 as MMQ forms them, a Q4_0 / Q5_0 offset through MMVQ's block sums, then an exact (fp64)
    product rounded to fp32, the bias added in fp32.

    Fast-math division can put an activation one step the other side of a rounding tie, and another summation order a
    block sum on the other side of its fp16 rounding; `linear_near` admits, at those ties only and best first per row,
    the rounding nearer the candidate's output, and counts them (`admitted`)."""

    name = "ggml-cuda twin"
    rope_tables = staticmethod(ggml_rope_tables)

    def __init__(self, gguf, precision: torch.dtype = torch.float64):
        super().__init__()
        self.gguf, self.types, self.tensors = gguf, weight_types(gguf), gemm_tensors(gguf)
        self.precision = precision  # float64: the exact product; float32: a correct fp32 evaluation (its noise floor)
        self.batch_rows: int | None = None  # rows of the candidate's batch (the replayer sets it): MMVQ or MMQ
        self.admitted = 0  # activations and block sums rounded the other way at a tie, over the whole replay

    def _raw(self, key: str) -> torch.Tensor:
        """The weight's quantized blocks as the file stores them (uint8)."""
        return torch.from_numpy(np.ascontiguousarray(self.gguf.tensors[self.tensors[key]].data)).view(torch.uint8)

    def _parts(self, x, w, key):
        """(x @ wᵀ as the kernel computes it, in `precision`; the tie steps and the weight columns they move along)."""
        p, qtype = self.precision, self.types.get(key, "F32")
        if qtype not in QUANTIZED or x.shape[-1] % 32:
            xq = x.half().float() if qtype == "F16" else x.float()  # cuBLAS on fp16 operands, fp32 sums
            return xq.to(p) @ w.to(p).t(), None
        kernel = "mmvq" if (self.batch_rows or x.shape[0]) <= MMVQ_MAX_BATCH else "mmq"
        q, d, other = q8_1(x, kernel, scale_fp16=kernel == "mmvq" or qtype in MMQ_DS4)
        xq = (q * d).reshape(x.shape).to(p)
        sum_w = None  # what a block sum (stored beside d, in fp16) multiplies, for the kernels that use one
        if kernel == "mmq" and qtype == "Q4_K":
            w1, m = q4_k_mmq_parts(self._raw(key), *w.shape)
            w, sum_w = w1.to(p), -m.to(p)  # a step of an activation moves the output along w, of a block sum along sum_w
        elif kernel == "mmvq" and qtype in MMVQ_SUM_OFFSET:
            off, dw = MMVQ_SUM_OFFSET[qtype], block_scales(self._raw(key), *w.shape, qtype).to(p)
            w, sum_w = w.to(p) + off * dw.repeat_interleave(32, dim=1), -off * dw  # the stored (unsigned) values × d
        else:
            w = w.to(p)
        y = xq @ w.t()
        steps = [((other * d).reshape(x.shape), w)]  # an activation's other rounding at a tie, and what it multiplies
        if sum_w is not None:
            sums, sum_step = fp16_sums(x)
            y = y + sums.to(p) @ sum_w.t()
            steps.append((sum_step.to(p), sum_w))
        return y, steps

    def linear(self, x, w, b, key):
        y, _ = self._parts(x, w, key)
        y = y.float()
        return y if b is None else y + b.float()

    def linear_near(self, x, w, b, key, target: torch.Tensor) -> torch.Tensor:
        """As `linear`, with each tied activation (and tied block sum) rounded the way that brings its row nearer
        `target`."""
        y, ties = self._parts(x, w, key)
        if ties:
            y = self._admit(y, target.to(y.dtype) - (0 if b is None else b.to(y.dtype)), ties)
        y = y.float()
        return y if b is None else y + b.float()

    def _admit(self, y, target, ties):
        """Per row, best first: the tied rounding that brings the row nearest `target`, again, while one helps."""
        moves: dict[int, list[torch.Tensor]] = {}
        for step, along in ties:
            for t, k in step.nonzero().tolist():
                moves.setdefault(t, []).append(float(step[t, k]) * along[:, k])
        for t, options in moves.items():
            while options:
                gaps = [(y[t] + m - target[t]).norm() for m in options]
                best = min(range(len(options)), key=gaps.__getitem__)
                if gaps[best] >= (y[t] - target[t]).norm():
                    break
                y[t] = y[t] + options.pop(best)
                self.admitted += 1
        return y
