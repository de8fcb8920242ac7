"""One readable Qwen2 forward from a GGUF, with per-op taps and a pluggable linear backend.

References: Qwen2 in transformers (modeling_qwen2.py) and llama.cpp's qwen2 graph. GGUF stores Q/K
unpermuted for qwen2, so RoPE is the "rotate half" (NeoX) form applied to the weights as stored.

Two paths, as real engines have them: `prefill` (the whole prompt in one forward) and serial
`decode` (one token a step against a KV cache). Every linear goes through `backend.linear`, so FP8
backends and faults swap a part and the model code stays one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from gguf import MODEL_TENSOR

from fp8parity.errors import WorkbookError
from fp8parity.gguf_file import GGUFModel, ModelConfig
from fp8parity.names import OUTPUT, OUTPUT_NORM, TOKEN_EMBD, tensor_name
from fp8parity.taps import EMBEDDING, FINAL_NORM, GLOBAL_LAYER, LINEAR_OPS, LOGITS, Recorder


@dataclass
class ForwardOptions:
    """Deviations from the file's own recipe; all default to "as the GGUF says". Faults set these."""

    rms_eps: float | None = None  # override RMSNorm epsilon (the eps 1e-5 vs 1e-6 bug class)
    rope_theta: float | None = None  # override RoPE base
    embedding_row_offset: int = 0  # read row id+offset (an off-by-one lookup)
    transposed_weights: tuple[str, ...] = ()  # GGUF tensor names read transposed (a GEMV layout bug)
    activation_quant: str | None = None  # "q8_k": round linear inputs like llama.cpp's Q8_K (256-blocks)
    # (layer, op, kind, magnitude, path): an op's output perturbed where it is computed. kind "scale" multiplies
    # by (1 + magnitude); "offset" adds magnitude * rms(output) to every element (rel. L2 error = magnitude);
    # "permute" swaps the output's first two head_dim blocks (a head/column permutation). path: prefill,
    # decode or both.
    perturb: tuple[tuple[int, str, str, float, str], ...] = ()
    kv_shift_decode: bool = False  # decode attention reads the K/V cache shifted by one position
    attn_scale_power: float | None = None  # softmax scale head_dim**-power instead of 1/sqrt(head_dim) (1: the 1/d bug)
    rope_wrong_from: int | None = None  # positions >= this use RoPE theta 1e4 (wrong only past position N)
    softmax_fp16: bool = False  # attention scores and softmax in fp16


def available_memory() -> int:
    """Bytes of memory the OS says are available (MemAvailable), or 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def weights_fit(gguf, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a model keeps its dequantized weights in memory between forwards by default: when they take under a
    third of what is available (else they are streamed through reused buffers)."""
    return gguf.fp32_bytes() * (dtype.itemsize / 4) < available_memory() / 3


class WeightStore:
    """Dequantized weights on demand, on the CPU: kept (fast repeats) or streamed through reused buffers
    (a 7B on 24 GB). GPU backends move what they need to the device themselves, once."""

    def __init__(self, gguf: GGUFModel, dtype: torch.dtype, keep: bool):
        self.gguf, self.dtype, self.keep = gguf, dtype, keep
        self.device = torch.device("cpu")
        self._kept: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}  # streamed: one reused buffer per tensor kind (`_buffer`)
        self._cache = None  # fp8parity.weight_cache: the model's dequantized weights on disk, opened on first use

    def _cached(self, name: str) -> torch.Tensor | None:
        from fp8parity import weight_cache

        if self._cache is None:
            self._cache = weight_cache.open_cache(self.gguf) or False
        return weight_cache.get(self._cache, name) if self._cache else None

    def _buffer(self, name: str) -> torch.Tensor:
        """A streamed matrix's buffer, one per kind of tensor (blk.3.attn_k.weight: attn_k.weight), reused by the next
        block's: the weights a block reads together (q, k, v; gate, up), alike in shape, never overwrite one another."""
        kind = re.sub(r"^blk\.\d+\.", "", name)
        shape = self.gguf.shape(name)
        buf = self._buffers.get(kind)
        if buf is None or buf.shape != shape:
            buf = self._buffers[kind] = torch.empty(shape, dtype=torch.float32)
        return buf

    def get(self, name: str) -> torch.Tensor:
        if name in self._kept:
            return self._kept[name]
        # norms and biases are kept even when the matrices stream: they are tiny, and a buffer handed out twice would
        # be overwritten under whoever still holds it
        keep = self.keep or len(self.gguf.shape(name)) == 1
        if keep:
            w = self._cached(name) if self.keep else None
            w = self.gguf.tensor(name) if w is None else w
        else:
            w = self.gguf.tensor(name, out=self._buffer(name))
        w = w.to(dtype=self.dtype)
        if keep:
            self._kept[name] = w
        return w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    # As transformers' Qwen2RMSNorm: normalize in the compute dtype, then scale.
    var = x.pow(2).mean(-1, keepdim=True)
    return multiply(weight, x * torch.rsqrt(var + eps), dtype)


def multiply(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """a * b, computed in their dtype; rounded once to `dtype` on the way out where given (one kernel, the same bits as
    computing then casting)."""
    if dtype is None:
        return a * b
    return torch.mul(a, b, out=torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype, device=b.device))


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple:
    """cos/sin of shape (T, head_dim), computed in float32 (as transformers does) then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, n_heads, hd); rotate-half form: x * cos + [-x2, x1] * sin."""
    return rotate(x, cos, rotation_sin(sin))


def rotation_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated. [-x2, x1] * sin equals roll(x, half) * this bit for bit (negating a factor
    negates the rounded product exactly), in one kernel (roll) instead of two (neg, cat): made once per forward."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor) -> torch.Tensor:
    """RoPE of x (T, n_heads, hd) with cos and `rotation_sin(sin)` (T, hd): four kernels."""
    return x * cos[:, None, :] + x.roll(x.shape[-1] // 2, -1) * sin_rot[:, None, :]


def quantize_q8_k(x: torch.Tensor) -> torch.Tensor:
    """Round activations as llama.cpp's quantize_row_q8_K does: one scale per 256 values (lossy for outliers)."""
    t, n = x.shape
    if n % 256:
        return x
    blocks = x.reshape(t, n // 256, 256)
    idx = blocks.abs().argmax(dim=-1, keepdim=True)
    mx = torch.gather(blocks, -1, idx)
    # a true division, as C's -127.f/max: torch computes `scalar / tensor` as reciprocal times scalar, which rounds
    # twice and moved x * iscale from 37.499996 to 37.5 on the real model (one activation a step off llama.cpp's)
    iscale = torch.where(mx == 0, torch.zeros_like(mx), torch.full_like(mx, -127.0) / mx)
    q = torch.clamp(torch.round(blocks * iscale), -128, 127)
    d = torch.where(mx == 0, torch.zeros_like(mx), 1.0 / iscale)
    return (q * d).reshape(t, n)


# a GPU prefill of this many tokens or more runs the fused attention kernel: it gains a third at 2048 tokens and
# nothing at 128 (benchmarks/gpu_speed.py); the cascade's prompts and notebook 09's 512-token windows stay below
FUSED_ATTENTION_MIN_TOKENS = 1024
# a CPU prefill of this many tokens or more (from the first position, causal) runs torch's fused CPU kernel: 3x faster
# than the textbook form at notebook 09's 512-token windows, with a correct fp32 attention's error
# (benchmarks/cpu_attention.py); the cascade's prompts stay below, and the fp64 oracle keeps the textbook form
CPU_FUSED_ATTENTION_MIN_TOKENS = 256

# A block's linear layers grouped by the tap they read (q, k, v: attn_norm; gate, up: ffn_norm), as (op, GGUF tensor
# kind, bias) in forward order: a backend may run a group as one GEMM
GEMMS_BY_INPUT: dict[str, tuple[tuple[str, MODEL_TENSOR, bool], ...]] = {
    tap_in: tuple((op, kind, bias) for op, i, kind, bias in LINEAR_OPS if i == tap_in)
    for tap_in in dict.fromkeys(i for _, i, _, _ in LINEAR_OPS)}


def causal_mask(S: int, T: int, start: int | torch.Tensor, device) -> torch.Tensor:
    """(T, S) True where query start+t may not see key s (s > start+t); `start` may be a device tensor."""
    return torch.arange(S, device=device)[None, :] > (start + torch.arange(T, device=device))[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor, scale: float | None = None,
              softmax_fp16: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: (H, T, hd) at positions start..start+T-1; k, v: (KV, S, hd). Grouped-query, causal -> (H, T, hd).

    The textbook form (scores, masked softmax, weighted sum) everywhere but a long prefill. On a CPU, fp32 from
    CPU_FUSED_ATTENTION_MIN_TOKENS tokens, that runs torch's flash attention kernel (3x faster at 512 tokens, a correct
    fp32 attention's error: benchmarks/cpu_attention.py). On a GPU, from FUSED_ATTENTION_MIN_TOKENS, one fused
    fp32 kernel (memory-efficient attention, no TF32): there the fp32 score matrix is the cost (te block, 7B shapes,
    2048 tokens: the fused kernel 44.0 of 87.9 ms of CUDA time; the textbook form's two fp32 GEMMs and softmax 50.0 of
    120.1 ms). Shorter forwards keep the textbook form: a decode step runs faster that way (0.5B te 4.7 vs 5.4 ms a
    token; benchmarks/gpu_speed.py, H200), and it computes the numbers the cascade's real-model verdicts were checked
    with. The fused kernel's error is that of a
    correct fp32 attention, within stage B's attention floor (measured there against the CPU twin)."""
    H, T, hd = q.shape
    rep = H // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)  # (H, S, hd)
    S = k.shape[1]
    # from position 0 over T keys the mask is the causal one (the forward's): the fused kernels' own
    causal = isinstance(start, int) and start == 0 and S == T
    if (not q.is_cuda and causal and T >= CPU_FUSED_ATTENTION_MIN_TOKENS and not softmax_fp16
            and q.dtype == torch.float32):
        return cpu_fused_attention(q, k, v, 1 / math.sqrt(hd) if scale is None else scale)
    mask = causal_mask(S, T, start, q.device) if mask is None else mask
    if q.is_cuda and T >= FUSED_ATTENTION_MIN_TOKENS and not softmax_fp16 and q.dtype != torch.float64:  # no fp64 kernel
        return fused_attention(q, k, v, None if causal else mask, 1 / math.sqrt(hd) if scale is None else scale)
    return textbook_attention(q, k, v, mask, scale, softmax_fp16)


def textbook_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       scale: float | None = None, softmax_fp16: bool = False) -> torch.Tensor:
    """q (H, T, hd), k, v (H, S, hd), mask (T, S) True where masked: scores (divided by sqrt(hd) unless `scale` is
    given), masked softmax, weighted sum."""
    scores = q @ k.transpose(1, 2)  # (H, T, S), fresh: scaled and masked in place (the same bits, no new buffers)
    scores = scores.div_(math.sqrt(q.shape[-1])) if scale is None else scores.mul_(scale)
    scores = scores.masked_fill_(mask, float("-inf"))
    if softmax_fp16:
        return torch.softmax(scores.half(), dim=-1).to(v.dtype) @ v
    return torch.softmax(scores, dim=-1) @ v


def cpu_fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k, v: (H, T, hd) on the CPU, causal from position 0 -> (H, T, hd), by torch's flash attention CPU kernel
    (called directly: no silent fallback to another kernel)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None], k[None], v[None], 0.0, True,
                                                                       scale=scale)[0][0]


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """q, k, v: (H, T or S, hd) on a GPU, mask (T, S) True where masked -> (H, T, hd), by the memory-efficient kernel.
    No mask: causal with T == S, by the kernel's own mask, which skips the key blocks wholly above the diagonal (half
    the work at 2048 tokens); a skipped block would have added exp(-inf) = 0 to every sum, so the bits are the same
    (tests/test_gpu_speed_paths.py).

    Called directly, not through scaled_dot_product_attention: that entry point loads torch's cuDNN to weigh its
    backends, after which Transformer Engine's cuDNN no longer loads in the same process (measured on the H200)."""
    H, T, _ = q.shape
    S = k.shape[1]
    if mask is None:
        return torch.ops.aten._scaled_dot_product_efficient_attention(q[None], k[None], v[None], None, False, 0.0,
                                                                     True, scale=scale)[0][0]
    # the kernel reads the bias with a row stride that is a multiple of 16: allocate padded, use the first S columns
    bias = torch.zeros(T, S + (-S) % 16, device=q.device, dtype=q.dtype)[:, :S].masked_fill_(mask, float("-inf"))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q[None], k[None], v[None], bias.expand(1, H, T, S),
                                                                 False, 0.0, False, scale=scale)[0]
    return out[0]


def perturb_output(x: torch.Tensor, kind: str, magnitude: float, head_dim: int) -> torch.Tensor:
    """A planted fault on one op's output (see ForwardOptions.perturb)."""
    if kind == "scale":
        return x * (1 + magnitude)
    if kind == "offset":
        return x + magnitude * x.pow(2).mean().sqrt()
    if kind == "permute":
        flat = x.reshape(x.shape[0], -1).clone()
        a, b = flat[:, :head_dim].clone(), flat[:, head_dim:2 * head_dim].clone()
        flat[:, :head_dim], flat[:, head_dim:2 * head_dim] = b, a
        return flat.reshape(x.shape)
    raise WorkbookError(f"unknown perturbation {kind!r}; use scale, offset or permute.")


@dataclass
class KVCache:
    """Per-layer keys/values (n_kv_heads, T, head_dim) after RoPE, grown by concatenation (the CPU path)."""

    k: list[torch.Tensor | None] = field(default_factory=list)
    v: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0  # positions run so far (counted: a forward that ends early stores no layer's keys)

    def reserve(self, n_layers: int, tokens: int) -> None:
        if not self.k:
            self.k, self.v = [None] * n_layers, [None] * n_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, start) -> tuple:
        """Store this forward's keys/values (KV, T, hd) and return the keys/values its attention reads."""
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), 1), torch.cat((self.v[layer], v), 1)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, tokens: int) -> None:
        """The forward is done."""
        self.length += tokens


class StaticKVCache:
    """Keys/values preallocated for `capacity` positions (the GPU path): fixed addresses, so a forward over it can be
    captured once as a CUDA graph and replayed (fp8parity.cuda_graphs). A decode step (one token) attends over the
    whole capacity with the slots past its position masked, the same in eager and in a graph; a prefill attends over
    the positions written so far, as the growing cache does."""

    def __init__(self, cfg: ModelConfig, capacity: int, device, dtype: torch.dtype):
        shape = (cfg.n_kv_heads, capacity, cfg.head_dim)
        # zeros, not empty: a masked slot enters the softmax as exp(-inf) = 0 times its value, and 0 * NaN is NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.capacity, self.length = capacity, 0

    def reserve(self, n_layers: int, tokens: int) -> None:
        if self.length + tokens > self.capacity:
            raise WorkbookError(f"the K/V cache holds {self.capacity} positions and this forward would need "
                                f"{self.length + tokens}; make the cache with a larger capacity.")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, start) -> tuple:
        self.k[layer].index_copy_(1, pos, k)
        self.v[layer].index_copy_(1, pos, v)
        if k.shape[1] == 1:  # a decode step: the whole capacity (its position may be a graph's device tensor)
            return self.k[layer], self.v[layer]
        return self.k[layer][:, : start + k.shape[1]], self.v[layer][:, : start + k.shape[1]]

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def reset(self) -> StaticKVCache:
        self.length = 0
        return self


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]  # generated ids (the stop token included when one ended it)
    text: str
    stop_reason: str  # "stop_token <id>" or "max_new_tokens"
    path: str = "prefill+decode"
    logits: torch.Tensor | None = None  # keep_logits: (tokens, vocab) fp32 on the CPU, the row each token was picked from


class ForwardTaps:
    """One forward's taps, called at each op: its planted fault applied, then recorded; and which ops may be written in
    the backend's input dtype."""

    def __init__(self, model: Qwen2Model, recorder: Recorder | None, path: str, start: int | torch.Tensor, T: int):
        opts = model.options
        self.rec, self.dtype, self.head_dim = recorder, model.dtype, model.cfg.head_dim
        self.perturb = {(L, op): (kind, m) for L, op, kind, m, on in opts.perturb if on in (path, "both")}
        self.positions = list(range(start, start + T)) if recorder is not None and isinstance(start, int) else None
        # a recorder that keeps nothing past a layer ends the forward there (a drill-down of layer 0's ops)
        self.last_layer = recorder.last_layer() if recorder is not None else None
        # q8_k (a fault) rounds the activations' dtype
        self.narrow = model.backend.input_dtype if opts.activation_quant is None else None

    def __call__(self, op: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The op's output as the rest of the forward sees it: a planted fault applied, then recorded."""
        if self.perturb and (layer, op) in self.perturb:  # in the activations' dtype (a bf16 GEMM output converted)
            x = perturb_output(x.to(self.dtype), *self.perturb[(layer, op)], self.head_dim)
        if self.rec is not None:
            self.rec.record(op, layer, x, self.positions)
        return x

    def gemm_input(self, op: str, layer: int) -> torch.dtype | None:
        """The dtype to write an op read only by GEMMs in: the backend's input dtype, unless the op is tapped or
        perturbed (a tap records, and a fault perturbs, the activations' dtype; the GEMM rounds it the same)."""
        watched = (layer, op) in self.perturb or self.rec is not None and self.rec.wants(op, layer)
        return None if watched else self.narrow


class Qwen2Model:
    """A Qwen2 forward over a GGUF file.

    backend: the linear backend (fp8parity.backends); dtype: float32 (default) or float64;
    keep_weights: keep dequantized weights between forwards (None: keep when they fit comfortably).
    """

    def __init__(self, gguf: GGUFModel, backend=None, dtype: torch.dtype = torch.float32,
                 options: ForwardOptions | None = None, keep_weights: bool | None = None,
                 weights: WeightStore | None = None, cuda_graphs: bool = True):
        from fp8parity.backends import ReferenceBackend
        from fp8parity.cuda_graphs import CudaGraphs

        self.gguf = gguf
        self.cfg: ModelConfig = gguf.config
        self.backend = backend if backend is not None else ReferenceBackend()
        self.device = torch.device(getattr(self.backend, "device", "cpu"))
        self.dtype = dtype
        self.options = options or ForwardOptions()
        if keep_weights is None:
            keep_weights = weights_fit(gguf, dtype)
        # an fp32 store serves an fp64 model as well: every weight is an fp32 value, widened exactly where it is used
        share = weights is not None and (weights.dtype == dtype or dtype == torch.float64)
        self.weights = weights if share else WeightStore(gguf, dtype, keep_weights)
        self._small: dict[str, torch.Tensor] = {}  # norms and biases on the model's device
        # on the GPU: static K/V caches, and untapped forwards of a repeated shape replayed as CUDA graphs
        self.graphs = CudaGraphs(self) if self.device.type == "cuda" and cuda_graphs else None

    def describe(self) -> dict:
        return {
            "model": self.cfg.name, "file": str(self.gguf.path), "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device), "backend": self.backend.describe(), "options": self.options.__dict__,
            "weights": "kept" if self.weights.keep else "streamed",
            "cuda_graphs": self.graphs.describe() if self.graphs is not None else None,
        }

    # --- pieces -----------------------------------------------------------------------------------
    def _w(self, name: str) -> torch.Tensor:
        w = self.weights.get(name)
        if name in self.options.transposed_weights:
            if w.shape[0] != w.shape[1]:
                raise WorkbookError(f"cannot read {name} transposed: it is not square {tuple(w.shape)}.")
            w = w.t().contiguous()
        return w

    def small(self, name: str) -> torch.Tensor:
        """A norm weight or bias on the model's device (kept: they are tiny)."""
        t = self._small.get(name)
        if t is None:
            t = self._small[name] = self.weights.get(name).to(self.device, self.dtype)
        return t

    def _gemm_operands(self, weight: str, bias: str | None, key: str) -> tuple:
        """(w, b, key) as a backend takes them: no w where the backend holds its own (not dequantized again)."""
        return None if self.backend.holds(key) else self._w(weight), self.small(bias) if bias else None, key

    def _block_linears(self, x: torch.Tensor, layer: int, tap_in: str) -> list[torch.Tensor]:
        """A block's linear layers that read the tap `tap_in` (`GEMMS_BY_INPUT`; blk.<layer>.<kind>.weight, and .bias
        where it has one), as the backend leaves them (`linear_native`: bf16 stays bf16 until an op converts it)."""
        if self.options.activation_quant == "q8_k":
            x = quantize_q8_k(x)
        gemms = [self._gemm_operands(tensor_name(kind, layer), tensor_name(kind, layer, "bias") if bias else None,
                                     f"{layer}.{op}") for op, kind, bias in GEMMS_BY_INPUT[tap_in]]
        return self.backend.linear_group(x, gemms)

    @property
    def rms_eps(self) -> float:
        return self.options.rms_eps if self.options.rms_eps is not None else self.cfg.rms_eps

    @property
    def rope_theta(self) -> float:
        return self.options.rope_theta if self.options.rope_theta is not None else self.cfg.rope_theta

    def embed_rows(self, ids: list[int]) -> list[int]:
        """The embedding rows the tokens read (the off-by-one fault shifts them), clamped to the vocabulary."""
        return [min(max(i + self.options.embedding_row_offset, 0), self.cfg.vocab - 1) for i in ids]

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.gguf.rows(TOKEN_EMBD, self.embed_rows(ids)).to(self.device, self.dtype)

    def embedding_table(self) -> torch.Tensor:
        """The whole token embedding table on the model's device, the values `embed` reads row by row (a CUDA graph
        gathers its rows on the GPU); dequantized here, not kept on the host."""
        return self.gguf.tensor(TOKEN_EMBD).to(self.device, self.dtype)

    # --- forward ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, ids: list[int], cache: KVCache | None = None, recorder: Recorder | None = None,
                logits_for: str | slice = "all", path: str = "prefill") -> torch.Tensor | None:
        """Run T tokens at positions cache.length ... cache.length+T-1; returns logits (T or 1, vocab), or None where
        the recorder keeps nothing past a layer (`Recorder.last_layer`: the forward ends there).

        `path` names the engine path this call belongs to (prefill, or a decode step): faults may be tied to one."""
        if self.graphs is not None:
            logits = self.graphs.forward(ids, cache, logits_for, path, recorder)
            if logits is not None:
                return logits
        with self.backend.forward_context():  # Transformer Engine's autocast, entered once per forward
            return self._forward(ids, cache, recorder, logits_for, path)

    def _forward(self, ids: list[int], cache: KVCache | StaticKVCache | None, recorder: Recorder | None,
                 logits_for: str | slice, path: str) -> torch.Tensor | None:
        if cache is None:
            cache = KVCache()
        cache.reserve(self.cfg.n_layers, len(ids))
        if hasattr(self.backend, "reset"):
            self.backend.reset()  # per-forward backend state (the stale-cache fault's cache lives for one forward)
        logits = self.body(self.embed(ids), cache.length, cache, recorder, logits_for, path)
        cache.advance(len(ids))
        return logits

    def body(self, x: torch.Tensor, start: int | torch.Tensor, cache: KVCache | StaticKVCache,
             recorder: Recorder | None, logits_for: str | slice, path: str) -> torch.Tensor | None:
        """Everything after the embedding lookup, for embedded tokens `x` (T, hidden) at positions start... Only
        device work: `start` may be a device tensor (a decode step captured as a CUDA graph, whose recorder, if any,
        takes no positions: the graph's caller knows them)."""
        cfg = self.cfg
        T, H, KV, hd = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pos = torch.arange(T, device=self.device) + start  # the positions, on the device
        tap = ForwardTaps(self, recorder, path, start, T)
        gemm_input = tap.gemm_input
        x = tap(EMBEDDING, GLOBAL_LAYER, x)  # (T, hidden)
        cos, sin = self._rope(pos)  # sin as `rotate` takes it (rotation_sin)
        for L in range(cfg.n_layers if tap.last_layer is None else tap.last_layer + 1):
            h = tap("attn_norm", L, rms_norm(x, self.small(tensor_name(MODEL_TENSOR.ATTN_NORM, L)), self.rms_eps,
                                             gemm_input("attn_norm", L)))
            q, k, v = self._block_linears(h, L, "attn_norm")  # (T, H*hd), (T, KV*hd), (T, KV*hd)
            q, k, v = tap("q_proj", L, q), tap("k_proj", L, k), tap("v_proj", L, v)
            qk = rotate(torch.cat((q.view(T, H, hd), k.view(T, KV, hd)), 1), cos, sin)  # one RoPE: 5 kernels, not 8
            q = tap("q_post_rope", L, qk[:, :H].contiguous())  # q laid out as before (no copy for one token)
            k = tap("k_post_rope", L, qk[:, H:])
            kt, vt = self._cached_kv(cache, L, k.view(T, KV, hd), v.view(T, KV, hd).to(x.dtype), pos, start,
                                     path)  # (KV, S, hd)
            if L == 0:  # the same in every layer
                mask = causal_mask(kt.shape[1], T, start, self.device)
            attn = self._attention(q.view(T, H, hd).transpose(0, 1), kt, vt, start, mask)  # (H, T, hd)
            attn = tap("attention", L, attn.transpose(0, 1).reshape(T, H * hd))
            (o,) = self._block_linears(attn, L, "attention")
            x = tap("post_attn_residual", L, x + tap("attn_out", L, o))  # a bf16 o promotes: the same sum
            h = tap("ffn_norm", L, rms_norm(x, self.small(tensor_name(MODEL_TENSOR.FFN_NORM, L)), self.rms_eps,
                                            gemm_input("ffn_norm", L)))
            g, u = self._block_linears(h, L, "ffn_norm")
            g, u = tap("ffn_gate", L, g), tap("ffn_up", L, u)
            # silu in x's dtype; a bf16 u promotes
            s = tap("ffn_swiglu", L, multiply(torch.nn.functional.silu(g.to(x.dtype)), u, gemm_input("ffn_swiglu", L)))
            (d,) = self._block_linears(s, L, "ffn_swiglu")
            x = tap("post_ffn_residual", L, x + tap("ffn_out", L, d))
        if tap.last_layer is not None:
            return None  # the recorder has all it keeps: no logits
        rows = slice(-1, None) if logits_for == "last" else logits_for  # a slice: some rows only (half a window)
        if isinstance(rows, slice):
            x = x[rows]
            tap.positions = tap.positions[rows] if tap.positions is not None else None
        h = tap(FINAL_NORM, GLOBAL_LAYER, rms_norm(x, self.small(OUTPUT_NORM), self.rms_eps))
        head = TOKEN_EMBD if self.cfg.tied_embeddings else OUTPUT
        w = None if self.backend.holds("lm_head") else self._w(head)
        return tap(LOGITS, GLOBAL_LAYER, self.backend.linear(h, w, None, "lm_head"))

    def _cached_kv(self, cache, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, start, path: str):
        """This forward's keys/values (T, KV, hd) into the cache; the keys/values attention reads back."""
        kt, vt = cache.append(layer, k.transpose(0, 1), v.transpose(0, 1), pos, start)
        if self.options.kv_shift_decode and path == "decode" and kt.shape[1] > 1:  # slot j reads position j-1
            kt, vt = torch.cat((kt[:, :1], kt[:, :-1]), 1), torch.cat((vt[:, :1], vt[:, :-1]), 1)
        return kt, vt

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and `rotation_sin` at the positions (the rope_wrong_from fault: theta 1e4 from a position on)."""
        hd, wrong_from = self.cfg.head_dim, self.options.rope_wrong_from
        cos, sin = rope_tables(pos, hd, self.rope_theta, self.dtype, self.device)
        if wrong_from is not None:
            bad = pos >= wrong_from
            cos_b, sin_b = rope_tables(pos, hd, 1e4, self.dtype, self.device)
            cos, sin = torch.where(bad[:, None], cos_b, cos), torch.where(bad[:, None], sin_b, sin)
        return cos, rotation_sin(sin)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start, mask: torch.Tensor) -> torch.Tensor:
        """q: (H, T, hd); k, v: (KV, S, hd) with S = start + T. Grouped-query, causal."""
        power = self.options.attn_scale_power
        scale = None if power is None else q.shape[-1] ** -power
        return attention(q, k, v, start, scale, self.options.softmax_fp16, mask)

    # --- the two paths ------------------------------------------------------------------------------
    def new_cache(self, tokens: int) -> KVCache | StaticKVCache:
        """A K/V cache for a run of `tokens` positions: growing on the CPU; static on the GPU (one per capacity, so
        asking again empties it), which is what lets a decode step replay as a CUDA graph."""
        if self.device.type != "cuda":
            return KVCache()
        if self.graphs is not None:
            return self.graphs.new_cache(tokens)
        from fp8parity.cuda_graphs import CudaGraphs

        return StaticKVCache(self.cfg, CudaGraphs.capacity_for(tokens), self.device, self.dtype)

    def prefill(self, ids: list[int], recorder: Recorder | None = None, logits_for: str | slice = "all",
                cache: KVCache | None = None) -> torch.Tensor | None:
        return self.forward(ids, cache=cache, recorder=recorder, logits_for=logits_for)

    def decode_serial(self, ids: list[int], recorder: Recorder | None = None) -> torch.Tensor | None:
        """Token by token against a KV cache; logits (T, vocab) stacked from each step (None where the recorder ends
        each step early: `Recorder.last_layer`)."""
        cache = self.new_cache(len(ids))
        steps = [self.forward([i], cache=cache, recorder=recorder, path="decode") for i in ids]
        return None if steps[-1] is None else torch.cat(steps, dim=0)

    def run(self, ids: list[int], path: str = "prefill", recorder: Recorder | None = None) -> torch.Tensor | None:
        if path == "prefill":
            return self.prefill(ids, recorder)
        if path == "decode":
            return self.decode_serial(ids, recorder)
        raise WorkbookError(f"unknown path {path!r}; use 'prefill' or 'decode'.")

    @torch.no_grad()
    def generation_logits(self, prompt_ids: list[int], forced: list[int], max_new_tokens: int) -> torch.Tensor:
        """The logits `generate` picks its next token from once it has emitted `forced`: the prompt's prefill, then
        each forced token as one decode step, over the cache `generate` would make: the same path, so the same numbers.
        (A prefill of prompt + forced is another computation: an FP8 candidate's activation scales differ with the
        batch, and its near-tie there can rank the two tokens the other way.)"""
        cache = self.new_cache(len(prompt_ids) + max_new_tokens)
        logits = self.forward(prompt_ids, cache=cache, logits_for="last")
        for t in forced:
            logits = self.forward([t], cache=cache, path="decode")
        return logits[-1]

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int] | None,
                 tokenizer=None, keep_logits: bool = False) -> GenerationResult:
        """Greedy decoding: prefill the prompt, then one token a step; stops on any of stop_ids. With `keep_logits`
        the result holds the logits each token was picked from (what `generation_logits` computes again)."""
        cache = self.new_cache(len(prompt_ids) + max_new_tokens)
        logits = self.forward(prompt_ids, cache=cache, logits_for="last")
        out: list[int] = []
        kept: list[torch.Tensor] = []
        reason = "max_new_tokens"
        stops = set(stop_ids or [])
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(logits[-1]))
            out.append(nxt)
            if keep_logits:  # a copy: a CUDA graph's output buffer is overwritten by its next replay
                kept.append(logits[-1].float().clone())
            if nxt in stops:
                reason = f"stop_token {nxt}"
                break
            if len(out) == max_new_tokens:
                break
            logits = self.forward([nxt], cache=cache, path="decode")
        text = tokenizer.decode(out) if tokenizer is not None else ""
        return GenerationResult(list(prompt_ids), out, text, reason,
                                logits=torch.stack(kept).cpu() if keep_logits else None)
