"""The cascade's stages and verdict statuses by name, torch-free: the reports (index.html, the summary notebook) name
them without importing the stages, which import torch (3.6 s on the GPU host)."""

from __future__ import annotations

PASS, FAIL, UNMEASURED = "pass", "fail", "unmeasured"
STAGES = {"A": "deterministic reproducer", "B": "per-layer parity", "C": "embedding lookup parity",
          "D": "pre-attention RMSNorm parity", "E": "Q/K/V FP8 matmul parity", "F": "golden output"}
MARK_COLORS = {PASS: "#1a7f37", FAIL: "#cf222e", UNMEASURED: "#6e7781"}


def verdict_mark(status: str) -> str:
    """The verdict as coloured text: no emoji, which render as empty boxes where the font lacks them."""
    return f'<span style="color:{MARK_COLORS[status]};font-weight:bold">{status.upper()}</span>'
