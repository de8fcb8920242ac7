"""Tap names in forward order, and the Recorder that collects tapped activations.

A tap is (position, layer, op): an op is a point of the forward ("stage" is reserved for the cascade's A-F).
Global ops (embedding, final_norm, logits) have layer -1.
Recording is off unless a Recorder is passed; a Recorder can restrict layers, ops and positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from gguf import MODEL_TENSOR

from fp8parity.ops import ALL_OPS, EMBEDDING, FINAL_NORM, GLOBAL_LAYER, LAYER_OPS, LOGITS

__all__ = ["ALL_OPS", "EMBEDDING", "FINAL_NORM", "GLOBAL_LAYER", "LAYER_OPS", "LOGITS", "LINEAR_OPS", "Recorder",
           "TapKey", "forward_order"]
# Each linear layer of a block: (its output tap, the tap holding its input, its GGUF tensor, has bias)
LINEAR_OPS = (
    ("q_proj", "attn_norm", MODEL_TENSOR.ATTN_Q, True),
    ("k_proj", "attn_norm", MODEL_TENSOR.ATTN_K, True),
    ("v_proj", "attn_norm", MODEL_TENSOR.ATTN_V, True),
    ("attn_out", "attention", MODEL_TENSOR.ATTN_OUT, False),
    ("ffn_gate", "ffn_norm", MODEL_TENSOR.FFN_GATE, False),
    ("ffn_up", "ffn_norm", MODEL_TENSOR.FFN_UP, False),
    ("ffn_out", "ffn_swiglu", MODEL_TENSOR.FFN_DOWN, False),
)


def forward_order(op: str, layer: int) -> tuple[int, int]:
    """Sort key that puts taps in the order the forward computes them."""
    if op == EMBEDDING:
        return (0, 0)
    if op in (FINAL_NORM, LOGITS):
        return (2, 0 if op == FINAL_NORM else 1)
    return (1, layer * len(LAYER_OPS) + LAYER_OPS.index(op))


TapKey = tuple[int, int, str]  # (position, layer, op)


class Recorder:
    """Collects tapped activations as float32 CPU vectors keyed by (position, layer, op)."""

    def __init__(
        self,
        layers: Iterable[int] | None = None,
        ops: Iterable[str] | None = None,
        positions: Iterable[int] | None = None,
    ):
        self.layers = None if layers is None else set(layers)
        self.ops = None if ops is None else set(ops)
        self.positions = None if positions is None else set(positions)
        unknown = (self.ops or set()) - set(ALL_OPS)
        if unknown:
            from fp8parity.errors import WorkbookError

            raise WorkbookError(f"unknown op(s) {sorted(unknown)}; known: {', '.join(ALL_OPS)}.")
        self.tensors: dict[TapKey, torch.Tensor] = {}

    def wants(self, op: str, layer: int) -> bool:
        if self.ops is not None and op not in self.ops:
            return False
        return layer == GLOBAL_LAYER or self.layers is None or layer in self.layers

    def record(self, op: str, layer: int, x: torch.Tensor, positions: list[int]) -> None:
        """x: (T, ...) activations of the T tokens at `positions`; each row is stored flattened."""
        if not self.wants(op, layer):
            return
        # one private float32 copy of the batch (the forward may reuse its buffers), each row a view into it
        rows = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float32, copy=True)
        for i, pos in enumerate(positions):
            if self.positions is None or pos in self.positions:
                self.tensors[(pos, layer, op)] = rows[i]
