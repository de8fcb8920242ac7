"""The twin of llama.cpp's CPU matrix multiplications: before its integer dot products, ggml quantizes the activations
to the type the weight's kernel pairs with (Q8_K for the K-quants, Q8_0 / Q8_1 for the older block types, fp16 for F16
weights). That rounding is llama.cpp's intended arithmetic, not a bug: replayed here on the candidate's own inputs
(activations rounded the same way, then an exact dot product with the dequantized weight), a correct llama.cpp op
agrees to fp32 accumulation noise, and whatever remains is what stage B should look at.
"""

from __future__ import annotations

import torch

from fp8parity.backends.base import LinearBackend
from fp8parity.names import OUTPUT, TOKEN_EMBD, tensor_name
from fp8parity.taps import LINEAR_OPS

# ggml-cpu's vec_dot_type of each weight type (ggml/src/ggml-cpu/ggml-cpu.c, type_traits_cpu)
VEC_DOT_TYPE = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1", "Q2_K": "Q8_K",
                "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "F16": "F16", "BF16": "BF16", "F32": "F32"}


def weight_types(gguf) -> dict[str, str]:
    """GEMM key (as the forward names it: '3.q_proj', 'lm_head') -> the GGUF type of its weight."""
    types = {f"{L}.{op}": gguf.tensors[tensor_name(kind, L)].tensor_type.name
             for L in range(gguf.config.n_layers) for op, _, kind, _ in LINEAR_OPS}
    head = TOKEN_EMBD if gguf.config.tied_embeddings else OUTPUT
    return types | {"lm_head": gguf.tensors[head].tensor_type.name}


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

    def __init__(self, types: dict[str, str]):
        super().__init__()
        self.types = types

    def linear(self, x, w, b, key):
        xq = quantize_activations(x, VEC_DOT_TYPE.get(self.types.get(key, "F32"), "F32"))
        y = (xq.double() @ w.double().t()).float()
        return y if b is None else y + b.float()
