"""Tap names in forward order, and the Recorder that collects tapped activations.

A tap is (position, layer, stage). Global stages (embedding, final_norm, logits) have layer -1.
Recording is off unless a Recorder is passed; a Recorder can restrict layers, stages and positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

EMBEDDING = "embedding"
FINAL_NORM = "final_norm"
LOGITS = "logits"
LAYER_STAGES = (
    "attn_norm", "q_proj", "k_proj", "v_proj", "q_post_rope", "k_post_rope", "attention", "attn_out",
    "post_attn_residual", "ffn_norm", "ffn_gate", "ffn_up", "ffn_swiglu", "ffn_out", "post_ffn_residual",
)
GLOBAL_LAYER = -1
# Each linear layer of a block: (its output tap, the tap holding its input, GGUF tensor stem in blk.N., has bias)
LINEAR_OPS = (
    ("q_proj", "attn_norm", "attn_q", True),
    ("k_proj", "attn_norm", "attn_k", True),
    ("v_proj", "attn_norm", "attn_v", True),
    ("attn_out", "attention", "attn_output", False),
    ("ffn_gate", "ffn_norm", "ffn_gate", False),
    ("ffn_up", "ffn_norm", "ffn_up", False),
    ("ffn_out", "ffn_swiglu", "ffn_down", False),
)
ALL_STAGES = (EMBEDDING, *LAYER_STAGES, FINAL_NORM, LOGITS)


def forward_order(stage: str, layer: int) -> tuple[int, int]:
    """Sort key that puts taps in the order the forward computes them."""
    if stage == EMBEDDING:
        return (0, 0)
    if stage in (FINAL_NORM, LOGITS):
        return (2, 0 if stage == FINAL_NORM else 1)
    return (1, layer * len(LAYER_STAGES) + LAYER_STAGES.index(stage))


TapKey = tuple[int, int, str]  # (position, layer, stage)


class Recorder:
    """Collects tapped activations as float32 CPU vectors keyed by (position, layer, stage)."""

    def __init__(
        self,
        layers: Iterable[int] | None = None,
        stages: Iterable[str] | None = None,
        positions: Iterable[int] | None = None,
    ):
        self.layers = None if layers is None else set(layers)
        self.stages = None if stages is None else set(stages)
        self.positions = None if positions is None else set(positions)
        unknown = (self.stages or set()) - set(ALL_STAGES)
        if unknown:
            from fp8parity.errors import WorkbookError

            raise WorkbookError(f"unknown tap stage(s) {sorted(unknown)}; known: {', '.join(ALL_STAGES)}.")
        self.tensors: dict[TapKey, torch.Tensor] = {}

    def wants(self, stage: str, layer: int) -> bool:
        if self.stages is not None and stage not in self.stages:
            return False
        return layer == GLOBAL_LAYER or self.layers is None or layer in self.layers

    def record(self, stage: str, layer: int, x: torch.Tensor, positions: list[int]) -> None:
        """x: (T, ...) activations of the T tokens at `positions`; each row is stored flattened."""
        if not self.wants(stage, layer):
            return
        # one private float32 copy of the batch (the forward may reuse its buffers), each row a view into it
        rows = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float32, copy=True)
        for i, pos in enumerate(positions):
            if self.positions is None or pos in self.positions:
                self.tensors[(pos, layer, stage)] = rows[i]
