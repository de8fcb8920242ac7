"""The drill-down: one op at one position, on both sides — its inputs and its output, the error per dimension and
the dimensions that differ most. Both forwards are rerun with a Recorder restricted to the op and its inputs, so it
needs no stored trace and costs at most one forward a side: the forward ends after the op's layer (`Recorder.last_layer`)
unless the op is the final norm or the logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fp8parity import metrics
from fp8parity.errors import WorkbookError
from fp8parity.taps import ALL_OPS, EMBEDDING, FINAL_NORM, GLOBAL_LAYER, LOGITS, Recorder, TapKey
from fp8parity.workbench import Workbench

GLOBAL_OPS = (EMBEDDING, FINAL_NORM, LOGITS)


def inputs_of(op: str, layer: int, n_layers: int) -> list[tuple[str, int]]:
    """The taps an op reads, as (op, layer)."""
    prev = (EMBEDDING, GLOBAL_LAYER) if layer == 0 else ("post_ffn_residual", layer - 1)
    same = {"q_proj": "attn_norm", "k_proj": "attn_norm", "v_proj": "attn_norm", "q_post_rope": "q_proj",
            "k_post_rope": "k_proj", "attn_out": "attention", "ffn_norm": "post_attn_residual", "ffn_gate": "ffn_norm",
            "ffn_up": "ffn_norm", "ffn_out": "ffn_swiglu"}
    if op in same:
        return [(same[op], layer)]
    return {EMBEDDING: [], "attn_norm": [prev], "attention": [("q_post_rope", layer), ("k_post_rope", layer),
                                                             ("v_proj", layer)],
            "post_attn_residual": [prev, ("attn_out", layer)], "ffn_swiglu": [("ffn_gate", layer), ("ffn_up", layer)],
            "post_ffn_residual": [("post_attn_residual", layer), ("ffn_out", layer)],
            FINAL_NORM: [("post_ffn_residual", n_layers - 1)], LOGITS: [(FINAL_NORM, GLOBAL_LAYER)]}[op]


@dataclass
class DrillDown:
    key: TapKey  # (position, layer, op)
    path: str
    reference: np.ndarray  # the op's output on the reference
    candidate: np.ndarray  # ... and on the candidate
    inputs: dict[str, tuple[np.ndarray, np.ndarray]]  # "op (layer L)" -> (reference, candidate)

    @property
    def where(self) -> str:
        pos, layer, op = self.key
        return f"{op}{'' if layer < 0 else f' of layer {layer}'} at position {pos} ({self.path})"

    def top_dims(self, n: int = 10) -> pd.DataFrame:
        """The n output dimensions that differ most, largest absolute difference first."""
        diff = self.candidate.astype(np.float64) - self.reference
        order = np.argsort(-np.abs(diff), kind="stable")[:n]
        return pd.DataFrame({"dim": order, "reference": self.reference[order], "candidate": self.candidate[order],
                             "abs_diff": np.abs(diff[order]),
                             "rel_diff": np.abs(diff[order]) / np.maximum(np.abs(self.reference[order]), 1e-30)})

    def sentence(self) -> str:
        c, r = self.candidate, self.reference
        top = self.top_dims(1).iloc[0]
        return (f"{self.where}: rel. L2 {metrics.rel_l2(c, r):.3g}, cosine {metrics.cosine(c, r):.6f}, norm ratio "
                f"{metrics.norm_ratio(c, r):.4f}; the largest difference is {top.abs_diff:.3g} at dim {int(top.dim)}.")


def _check(wb: Workbench, layer: int, op: str, position: int, path: str, prompt: int) -> list[int]:
    if op not in ALL_OPS:
        raise WorkbookError(f"op {op!r} is unknown; choose one of {', '.join(ALL_OPS)}.")
    n = wb.gguf.config.n_layers
    if op in GLOBAL_OPS and layer != GLOBAL_LAYER or op not in GLOBAL_OPS and not 0 <= layer < n:
        raise WorkbookError(f"layer {layer} does not hold {op}: global ops ({', '.join(GLOBAL_OPS)}) are layer -1, "
                            f"the others layers 0..{n - 1}.")
    if not 0 <= prompt < len(wb.prompts):
        raise WorkbookError(f"prompt {prompt} is not one of the {len(wb.prompts)} judged prompt(s).")
    ids = wb.prompt_ids(prompt)
    if not 0 <= position < len(ids):
        raise WorkbookError(f"position {position} is outside prompt {prompt}'s {len(ids)} tokens.")
    return ids


def drill_down(wb: Workbench, layer: int, op: str, position: int, path: str = "prefill", prompt: int = 0) -> DrillDown:
    """Both sides' output of `op` at (`layer`, `position`) on `path`, and the taps it reads."""
    ids = _check(wb, layer, op, position, path, prompt)
    wanted = [(op, layer), *inputs_of(op, layer, wb.gguf.config.n_layers)]
    wb.prepare_candidate(ids)
    sides = []
    for model in (wb.reference, wb.candidate):
        rec = Recorder(layers={L for _, L in wanted if L >= 0}, ops={o for o, _ in wanted}, positions=[position])
        model.run(ids, path, rec)
        sides.append({k: v.numpy() for k, v in rec.tensors.items()})
    ref, cand = sides
    inputs = {f"{o}" + ("" if L < 0 else f" (layer {L})"): (ref[(position, L, o)], cand[(position, L, o)])
              for o, L in wanted[1:]}
    return DrillDown((position, layer, op), path, ref[(position, layer, op)], cand[(position, layer, op)], inputs)
