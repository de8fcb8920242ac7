"""emulated-fp8: E4M3 GEMMs on any machine, quantized exactly as the GPU quantizes.

Granularities: `tensor` (one current scale per tensor, TE Float8CurrentScaling / per-tensor _scaled_mm),
`delayed` (scale 1.0: TE DelayedScaling used naively under no_grad), `delayed-calibrated` (scale
from the amax seen in a calibration pass), `rowwise` (per token x per output channel, _scaled_mm
rowwise), `block` (1x128 activations, 128x128 weights, power-of-two scales: Float8BlockScaling),
and `batch-ftz` (one per-batch scale with subnormals flushed to zero: the bug of #3807).
Accumulation: `fp32` (exact products, fp32 sums), `fp64` (the cast-to-representable control: any
error left is quantization error), `fast` (a model of Hopper's ~14-bit fast accumulation: partial
sums of 32 products in fp32, the running sum rounded to 13 mantissa bits after each chunk).
On a CPU, a one-row GEMM (a decode step) with fp32 accumulation may read an fp16 copy of its E4M3 weight instead
(`FP16Copies`): the same values, products and fp32 sums, half the bytes.
"""

from __future__ import annotations

import functools

import torch

from fp8parity import fp8
from fp8parity.backends.base import LinearBackend
from fp8parity.config import RunConfig
from fp8parity.errors import WorkbookError

GRANULARITIES = ("tensor", "delayed", "delayed-calibrated", "rowwise", "block", "batch-ftz")
ACCUMULATIONS = ("fp32", "fp64", "fast")
# The fast-accumulation model: K is consumed in chunks (wgmma's k=32 for FP8); the running fp32 sum keeps only
# FAST_ACCUM_BITS mantissa bits after each chunk, truncated or rounded. Calibrated against cuBLASLt / TE on an H200
# (benchmarks/gpu_fp8_check.py, section "fast accumulation model").
# Measured there: cuBLASLt's fast accumulation is 1.33e-3 (rel. L2) away from fp32 accumulation at
# (128, 3584) x (3584, 3584); chunks of 32 with 14 bits kept by truncation land at 1.39e-3 (rounding to
# nearest at 14 bits: 0.27e-3). It models the size of the error, not its elements.
FAST_ACCUM_CHUNK, FAST_ACCUM_BITS, FAST_ACCUM_TRUNCATE = 32, 14, True
BLOCK = 128
# fp16 copies of E4M3 weights for one-row GEMMs (decode steps), per weight file: a 0.5B's are 1 GB; a model's beyond
# this (a 7B's 14 GB, beside its 28 GB of fp32 E4M3 values) are not all made, the rest keep the fp32 path
FP16_COPIES_MAX_BYTES = 4 << 30
# Making a weight's copy costs what 55-119 of its one-row GEMMs then save on the CPU VM, one thread (184-205 on the GPU
# host's Xeon; benchmarks/decode_layout.py), so a copy is made at a weight's 90th: about twice the better choice's cost
# at worst, whether the decode stops there or goes on (a stage B decode runs 75 a weight, stage F's candidate 333)
COPY_AFTER_ONE_ROW_GEMMS = 90


def column_major(w: torch.Tensor) -> torch.Tensor:
    """w's values stored transposed, (in, out) row-major, and seen as (out, in): a decode step's one-row GEMMs read a
    weight 1.44-1.48x faster so on the CPU VM (benchmarks/decode_layout.py); a prefill's sums are the same bits, a
    decode step's are summed in another order (the real 0.5B: other bits for 1-3 rows)."""
    return w.t().contiguous().t()


@functools.cache
def fbgemm_fp16() -> bool:
    """Whether this torch and CPU run fbgemm's fp16-weight GEMM (x86 with AVX2; not an ARM build, say)."""
    try:
        w = torch.ops.quantized.linear_prepack_fp16(torch.ones(8, 8), None)
        return bool(torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 8), w).eq(8).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def fp16_copy(wq: torch.Tensor):
    """E4M3 values (as fp32, (out, in)) packed as fp16 for fbgemm: exact, fp16 holds every E4M3 value, subnormals too.
    Packed from a row-major copy: a fifth faster than from the column-major values."""
    return torch.ops.quantized.linear_prepack_fp16(wq.contiguous(), None)


def one_row_gemm(a: torch.Tensor, packed) -> torch.Tensor:
    """a (1, in) fp32 @ the packed weight's transpose: fbgemm converts each weight to fp32 and sums the exact products
    in fp32. On the CPU VM (AMD EPYC, torch 2.13) these are the bits of sgemm's one-row kernel over the column-major
    weight, so no decode number moves; on the GPU host's Xeon (torch 2.11) the order differs (an fp32 sum all the same:
    tests/test_cpu_speed_paths.py). Half the bytes read: a decode step's GEMMs 2.6-4.5x faster on the VM, 1.3x on the
    Xeon (benchmarks/decode_layout.py, which reports the bits too)."""
    return torch.ops.quantized.linear_dynamic_fp16(a, packed)


class FP16Copies:
    """fp16 copies of one set of E4M3 weights, by GEMM key, each made once its weight has run
    COPY_AFTER_ONE_ROW_GEMMS one-row GEMMs (up to FP16_COPIES_MAX_BYTES)."""

    def __init__(self):
        self.copies: dict[str, object] = {}
        self.one_row_gemms: dict[str, int] = {}
        self.nbytes = 0

    def get(self, key: str, wq: torch.Tensor, expected: int = 0):
        """The copy of `wq` (the weight of `key`) for this one-row GEMM, or None where it runs the fp32 path; made at
        once where the caller expects at least COPY_AFTER_ONE_ROW_GEMMS of them (`expected`)."""
        if key in self.copies:
            return self.copies[key]
        n = self.one_row_gemms[key] = self.one_row_gemms.get(key, 0) + 1
        if max(n, expected) < COPY_AFTER_ONE_ROW_GEMMS or self.nbytes + 2 * wq.numel() > FP16_COPIES_MAX_BYTES:
            return None
        self.copies[key] = fp16_copy(wq)
        self.nbytes += 2 * wq.numel()
        return self.copies[key]


# Shared by the backends of a process that read one weight file (a candidate and its twin of the same recipe: the same
# E4M3 values, so one copy serves both)
SHARED_FP16_COPIES: dict[str, FP16Copies] = {}


class EmulatedFP8Backend(LinearBackend):
    name = "emulated-fp8"

    def __init__(self, granularity: str = "tensor", accumulate: str = RunConfig.accumulate, output_dtype: str = "fp32",
                 bias_dtype: str = "fp32", stale_activation_cache: bool = False, collect_stats: bool = False,
                 input_scales: dict[str, float] | None = None):
        super().__init__()
        self.collect_stats = collect_stats
        if granularity not in GRANULARITIES:
            raise WorkbookError(f"unknown FP8 granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}.")
        if accumulate not in ACCUMULATIONS:
            raise WorkbookError(f"unknown accumulation {accumulate!r}; choose one of {', '.join(ACCUMULATIONS)}.")
        self.granularity, self.accumulate = granularity, accumulate
        self.output_dtype, self.bias_dtype = output_dtype, bias_dtype
        self.stale_activation_cache = stale_activation_cache
        self.calibrating = False
        self.row_scales = False  # per-tensor scales taken per row: each row scaled as a forward of that row alone
        self.fast_bits, self.fast_truncate, self.fast_chunk = FAST_ACCUM_BITS, FAST_ACCUM_TRUNCATE, FAST_ACCUM_CHUNK
        self._amax_history: dict[str, torch.Tensor] = {}  # input amax per GEMM
        self.input_scales = dict(input_scales or {})  # delayed-calibrated: scales a candidate used, replayed as given
        self._act_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Weights are constant: quantize each GEMM's weight once (values kept as exact fp32, stats kept).
        self._weights: dict[str, tuple[torch.Tensor, torch.Tensor, dict]] = {}
        self.weight_file = None  # the same quantized weights on disk (fp8_weight_cache.attach)
        self._own_fp16_copies = FP16Copies()  # where no weight file is shared
        self._expected_one_row_gemms = 0  # expect_one_row_gemms

    def describe(self) -> dict:
        return super().describe() | {
            "granularity": self.granularity, "accumulate": self.accumulate, "output_dtype": self.output_dtype,
            "bias_dtype": self.bias_dtype, "stale_activation_cache": self.stale_activation_cache,
        }

    # --- scales ---------------------------------------------------------------------------------------
    def _input_scale(self, x: torch.Tensor, key: str) -> torch.Tensor:
        g = self.granularity
        if g in ("tensor", "batch-ftz"):
            return fp8.scale_from_amax(fp8.amax_rows(x) if self.row_scales else fp8.amax_tensor(x))
        if g == "delayed":
            return torch.ones(1, 1)
        if g == "delayed-calibrated":
            if key in self.input_scales:
                return torch.tensor([[self.input_scales[key]]], dtype=torch.float32)
            seen = self._amax_history.get(key)
            if self.calibrating or seen is None:
                amax = fp8.amax_tensor(x) if seen is None else torch.maximum(fp8.amax_tensor(x), seen)
                self._amax_history[key] = seen = amax
            return fp8.scale_from_amax(seen)
        if g == "rowwise":
            return fp8.scale_from_amax(fp8.amax_rows(x))
        return fp8.scale_from_amax(fp8.amax_blocks(x, 1, BLOCK), pow2=True)  # block

    def _weight_scale(self, w: torch.Tensor) -> torch.Tensor:
        """Scale already expanded to w's layout where it is not a scalar."""
        g = self.granularity
        if g == "delayed":
            return torch.ones(1, 1)
        if g == "rowwise":
            return fp8.scale_from_amax(fp8.amax_rows(w))
        if g == "block":
            return fp8.expand_blocks(fp8.scale_from_amax(fp8.amax_blocks(w, BLOCK, BLOCK), pow2=True),
                                     BLOCK, BLOCK, tuple(w.shape))
        return fp8.scale_from_amax(fp8.amax_tensor(w))  # tensor, batch-ftz, delayed-calibrated

    def quantize_operands(self, x: torch.Tensor, w: torch.Tensor, key: str = "gemm"):
        """-> (xq, wq, sx, sw): e4m3 operands and quantization scales in the granularity's layout."""
        x32 = x.to(torch.float32)
        if key not in self._weights:
            w32 = w.to(torch.float32)
            cached = self.weight_file.get(key) if self.weight_file is not None else None
            if cached is None:
                swe = self._weight_scale(w32)
                wq = column_major(fp8.quantize(w32, swe).to(torch.float32))
            else:
                wq, swe = cached
            wstats = fp8.quant_stats(w32, swe, wq).to_dict() if self.collect_stats else {}  # once per weight
            self._weights[key] = (wq, swe, wstats)
            if cached is None and self.weight_file is not None:
                self.weight_file.offer(self._weights)
        wq, swe, wstats = self._weights[key]
        sx = self._input_scale(x32, key)
        sxe = fp8.expand_blocks(sx, 1, BLOCK, tuple(x32.shape)) if self.granularity == "block" else sx
        xq = fp8.quantize(x32, sxe, flush_subnormals=self.granularity == "batch-ftz")
        if self.collect_stats:
            self.stats[key] = {"input": fp8.quant_stats(x32, sxe, xq).to_dict(), "weight": wstats}
        return xq, wq, sxe, swe

    # --- GEMM -----------------------------------------------------------------------------------------
    def _fp16_copy(self, key: str | None, wq: torch.Tensor, rows: int):
        """The fp16 copy of a GEMM's weight where a one-row GEMM may use it (E4M3 values, fp32 sums, on a CPU with
        fbgemm, once made); None elsewhere. Block's weights are divided by their scales first: not fp16's."""
        if (key is None or rows != 1 or self.accumulate != "fp32" or self.granularity == "block"
                or wq.device.type != "cpu" or not fbgemm_fp16()):
            return None
        copies = (self._own_fp16_copies if self.weight_file is None
                  else SHARED_FP16_COPIES.setdefault(str(self.weight_file.path), FP16Copies()))
        return copies.get(key, wq, self._expected_one_row_gemms)

    def expect_one_row_gemms(self, n: int) -> None:
        """Where a caller expects COPY_AFTER_ONE_ROW_GEMMS or more (stage F: about 480), each weight's copy is made at
        its first one-row GEMM."""
        self._expected_one_row_gemms = n

    def _gemm(self, xq: torch.Tensor, wq: torch.Tensor, sxe: torch.Tensor, swe: torch.Tensor,
              key: str | None = None) -> torch.Tensor:
        """xq wq^T scaled back; a one-row GEMM of a named weight (`key`) reads its fp16 copy (`_fp16_copy`)."""
        acc = torch.float64 if self.accumulate == "fp64" else torch.float32
        if self.granularity == "block":
            # dequantize exactly (power-of-two scales) and let the accumulator do the rest
            xd = xq.to(acc) / sxe.to(acc)
            wd = wq.to(acc) / swe.to(acc)
            return self._accumulate(xd, wd, acc)
        packed = self._fp16_copy(key, wq, xq.shape[0] if xq.dim() == 2 else 0)
        y = one_row_gemm(xq.to(acc), packed) if packed is not None else self._accumulate(xq.to(acc), wq.to(acc), acc)
        if self.granularity == "rowwise":  # sxe (T, 1), swe (N, 1)
            return y * (1.0 / sxe).to(acc) * (1.0 / swe).t().to(acc)
        # per-tensor: cuBLAS applies alpha = scale_inv_a * scale_inv_b once, in fp32
        alpha = ((1.0 / sxe) * (1.0 / swe)).to(torch.float32).to(acc)
        return y * alpha

    def _accumulate(self, a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        if self.accumulate != "fast":
            return a @ b.t()
        K = a.shape[1]
        total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32)
        c = self.fast_chunk
        for k in range(0, K, c):
            part = a[:, k:k + c] @ b[:, k:k + c].t()
            total = fp8.round_mantissa(total + part, self.fast_bits, self.fast_truncate)
        return total

    def linear(self, x, w, b, key):
        if self.stale_activation_cache:
            # The #3727 bug: quantized activations cached by element count (what a (pointer, count) key
            # degenerates to when the caching allocator hands back the same block), reused across GEMMs.
            cached = self._act_cache.get(x.numel())
            xq_w = self.quantize_operands(x, w, key)
            if cached is not None:
                xq, sxe = cached
                xq_w = (xq, xq_w[1], sxe, xq_w[3])
            else:
                self._act_cache[x.numel()] = (xq_w[0], xq_w[2])
            xq, wq, sxe, swe = xq_w
        else:
            xq, wq, sxe, swe = self.quantize_operands(x, w, key)
        y = self._gemm(xq, wq, sxe, swe, key)
        if b is not None:
            bias = b.to(torch.bfloat16) if self.bias_dtype == "bf16" else b
            y = y + bias.to(y.dtype)
        if self.output_dtype == "fp16":
            y = y.to(torch.float16)  # #3728: values above 65504 become inf
        return y.to(x.dtype)

    def rows_as_forwards(self, on: bool) -> bool:
        """Per-tensor scales are then taken per row (cuBLAS's alpha, 1/(sx·sw) in fp32, per row too: the same numbers as
        one row's forward). Not with calibration still open (the scale would follow the batch) or the stale cache."""
        able = not self.stale_activation_cache and (self.granularity != "delayed-calibrated" or bool(self.input_scales))
        self.row_scales = on and able
        return able

    def used_input_scales(self) -> dict[str, float]:
        """delayed-calibrated: the input scale each GEMM uses (what a trace records for its twin)."""
        if self.granularity != "delayed-calibrated":
            return {}
        return {k: float(fp8.scale_from_amax(v)) for k, v in self._amax_history.items()} | self.input_scales

    def reset(self) -> None:
        """Forget per-run state (the activation cache lives for one forward, like the bug's did)."""
        self._act_cache.clear()
