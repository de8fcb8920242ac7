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


def private_copy(x: torch.Tensor) -> torch.Tensor:
    """A tap's (T, n) float32 copy on its device, a row per token: the forward may reuse the buffers it tapped."""
    return x.detach().reshape(x.shape[0], -1).to(torch.float32, copy=True)


# Taps staged on the GPU before one copy to the host: beyond this many bytes they are copied over early (a 7B's long
# prefill would otherwise hold every tap twice on the card)
MAX_STAGED_BYTES = 2**30


class Recorder:
    """Collects tapped activations as float32 CPU vectors keyed by (position, layer, op).

    A tap of a GPU forward is copied on the GPU (an asynchronous float32 copy) and staged; the staged taps go to the
    host together, in one transfer, when `tensors` is read. A copy to the host per tap would wait for the GPU at every
    tap (13,000-14,000 waits a decode trace of the real model), and could not be part of a CUDA graph."""

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
        self._tensors: dict[TapKey, torch.Tensor] = {}
        self._staged: list[tuple[torch.Tensor, list[tuple[str, int, int, int, list[int]]]]] = []
        self._staged_bytes = 0

    @property
    def tensors(self) -> dict[TapKey, torch.Tensor]:
        self._to_host()
        return self._tensors

    def filter_key(self) -> tuple:
        """What this recorder keeps of a forward, as a hashable key (a CUDA graph's taps depend on it)."""
        return (None if self.layers is None else tuple(sorted(self.layers)),
                None if self.ops is None else tuple(sorted(self.ops)))

    def last_layer(self) -> int | None:
        """The last layer this recorder keeps anything of where it keeps nothing of the forward's end (its ops exclude
        the final norm and the logits): a forward may stop after that layer (-1: after the embedding). None: it needs
        the forward to the end."""
        if self.ops is None or self.layers is None or self.ops & {FINAL_NORM, LOGITS}:
            return None
        return max(self.layers, default=GLOBAL_LAYER)

    def wants(self, op: str, layer: int) -> bool:
        if self.ops is not None and op not in self.ops:
            return False
        return layer == GLOBAL_LAYER or self.layers is None or layer in self.layers

    def record(self, op: str, layer: int, x: torch.Tensor, positions: list[int]) -> None:
        """x: (T, ...) activations of the T tokens at `positions`; each row is stored flattened."""
        if not self.wants(op, layer):
            return
        rows = private_copy(x)
        if rows.device.type == "cpu":
            self._keep(rows, op, layer, positions)
        else:
            self.stage(rows.reshape(-1), [(op, layer, *rows.shape, positions)])

    def stage(self, flat: torch.Tensor, layout: list[tuple[str, int, int, int, list[int]]]) -> None:
        """Taps still on the GPU: `flat` holds, one after another, a (T, n) float32 block per (op, layer, T, n,
        positions of its T tokens) of `layout`. It must not change before `tensors` is read (a private copy)."""
        self._staged.append((flat, layout))
        self._staged_bytes += flat.numel() * 4
        if self._staged_bytes > MAX_STAGED_BYTES:
            self._to_host()

    def _to_host(self) -> None:
        if not self._staged:
            return
        staged, self._staged, self._staged_bytes = self._staged, [], 0
        host = torch.cat([flat for flat, _ in staged]).cpu() if len(staged) > 1 else staged[0][0].cpu()
        offset = 0
        for _, layout in staged:
            for op, layer, T, n, positions in layout:
                self._keep(host[offset:offset + T * n].view(T, n), op, layer, positions)
                offset += T * n

    def _keep(self, rows: torch.Tensor, op: str, layer: int, positions: list[int]) -> None:
        for i, pos in enumerate(positions):
            if self.positions is None or pos in self.positions:
                self._tensors[(pos, layer, op)] = rows[i]
