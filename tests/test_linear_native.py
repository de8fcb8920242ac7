"""A backend may leave a GEMM's output in a narrower dtype (bf16) and let the forward convert it only where an op needs
the activations' dtype (`LinearBackend.linear_native`), and have the ops read only by its GEMMs (the norms, SwiGLU)
written in the dtype it rounds its inputs to (`input_dtype`): the logits and every tap are the same bits as computing
everything in fp32 and rounding at each GEMM, untraced, traced and traced in part, with planted faults, on both
paths. On the CPU (bf16 GEMMs run there too), so that it is checked on every machine; the GPU's bf16 backend is held
to the same in tests/test_gpu_speed_paths.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp8parity.backends import ReferenceBackend
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import ForwardOptions, Qwen2Model
from fp8parity.taps import LOGITS, Recorder


class CPUBF16(ReferenceBackend):
    """bf16 GEMMs on the CPU; `narrow`: inputs taken in bf16 and outputs left in it, else fp32 in and out (as before)."""

    def __init__(self, narrow: bool):
        super().__init__()
        self.narrow = narrow
        self.input_dtype = torch.bfloat16 if narrow else None

    def linear_native(self, x, w, b, key):
        y = F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16))
        return y if self.narrow else y.to(x.dtype)

    def linear(self, x, w, b, key):
        return self.linear_native(x, w, b, key).to(x.dtype)


def run(model: Qwen2Model, ids: list[int], path: str, traced: str) -> dict:
    """traced: "" (logits only), "all" (every tap) or "part" (a few ops: the others written narrow)."""
    rec = {"": None, "all": Recorder(), "part": Recorder(ops=("attn_norm", "ffn_up", LOGITS))}[traced]
    logits = model.run(ids, path, rec)
    return rec.tensors if traced else {LOGITS: logits}


@pytest.mark.parametrize("perturb", [(), ((1, "ffn_up", "scale", 0.01, "both"), (0, "q_proj", "offset", 0.02, "both"),
                                         (1, "ffn_norm", "scale", 0.01, "both"))])
def test_leaving_bf16_outputs_narrow_changes_no_bit(tiny_path, perturb):
    g = GGUFModel(tiny_path)
    ids = list(range(3, 30))
    options = ForwardOptions(perturb=perturb)
    narrow, converted = (Qwen2Model(g, backend=CPUBF16(n), options=options) for n in (True, False))
    assert narrow.backend.linear_native(torch.ones(1, 4), torch.ones(2, 4), None, "k").dtype == torch.bfloat16
    for path in ("prefill", "decode"):
        for traced in ("", "all", "part"):
            a, b = run(narrow, ids, path, traced), run(converted, ids, path, traced)
            assert a.keys() == b.keys() and len(a) >= {"": 1, "all": 100, "part": 20}[traced]
            different = [k for k in a if a[k].dtype != torch.float32 or not torch.equal(a[k], b[k])]
            assert not different, (path, traced, different[:5])
    # the fault took effect: a perturbed run is not the clean one
    if perturb:
        clean = Qwen2Model(g, backend=CPUBF16(True))
        assert not torch.equal(run(clean, ids, "prefill", "")[LOGITS], run(narrow, ids, "prefill", "")[LOGITS])


def test_a_shared_input_is_prepared_once_per_tensor_object():
    """`shared_input` (bf16's cast, te's pad) prepares the GEMMs' common input once: again for another tensor, even
    one with equal values, and never handing one tensor's prepared copy to another."""
    backend, calls = ReferenceBackend(), []

    def prepare(t):
        calls.append(t)
        return t * 2

    x, same_values = torch.arange(4.0), torch.arange(4.0)
    first = backend.shared_input(x, prepare)
    assert backend.shared_input(x, prepare) is first and len(calls) == 1  # q, k, v: one preparation
    other = backend.shared_input(same_values, prepare)
    assert other is not first and len(calls) == 2 and torch.equal(other, first)
    assert backend.shared_input(x, prepare) is not first and len(calls) == 3  # only the last input is held
