"""The fast GPU paths change no number: FP8 weights quantized once and one autocast per forward give logits and
every tap bit-identical to the per-call path, for each Transformer Engine recipe. Runs on a CUDA FP8 GPU only."""

from __future__ import annotations

import pytest
import torch

from fp8parity.backends.gpu import TEBackend
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import Qwen2Model
from fp8parity.taps import Recorder
from fp8parity.workbench import calibrate

pytestmark = pytest.mark.gpu
needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")


def traced(model: Qwen2Model, ids: list[int], path: str) -> dict:
    rec = Recorder()
    model.run(ids, path, rec)
    model.run(ids, path, rec)  # twice: the second call reuses the cached FP8 weights
    return rec.tensors


@needs_fp8_gpu
@pytest.mark.parametrize("recipe", ["current", "block", "delayed-calibrated", "delayed"])
def test_cached_fp8_weights_and_one_autocast_are_bit_identical_to_the_per_call_path(tiny_path, recipe):
    pytest.importorskip("transformer_engine")
    g = GGUFModel(tiny_path)
    ids = list(range(3, 40))
    sides = []
    for fast in (False, True):
        model = Qwen2Model(g, backend=TEBackend(recipe, cache_weights=fast, one_autocast=fast))
        model.backend.collect_stats = False
        calibrate(model, ids)
        sides.append({path: traced(model, ids, path) for path in ("prefill", "decode")})
    for path in ("prefill", "decode"):
        slow, fast = sides[0][path], sides[1][path]
        assert slow.keys() == fast.keys()
        different = [k for k in slow if not torch.equal(slow[k], fast[k])]
        assert not different, (recipe, path, different[:5])


@needs_fp8_gpu
@pytest.mark.parametrize("recipe", ["current", "block", "delayed-calibrated"])
def test_te_borrowing_the_gpu_references_weights_is_bit_identical_and_holds_no_second_copy(tiny_path, tmp_path, recipe):
    pytest.importorskip("transformer_engine")
    from fp8parity.config import RunConfig
    from fp8parity.workbench import Workbench

    wb = Workbench(RunConfig(model=str(tiny_path), backend="te", recipe=recipe, reference_device="cuda"), tmp_path)
    assert wb.backend.weights_from is wb.reference.backend
    ids = list(range(3, 40))
    own = Qwen2Model(wb.gguf, backend=TEBackend(recipe), weights=wb.reference.weights)
    for model in (wb.candidate, own):
        calibrate(model, ids)
    for path in ("prefill", "decode"):
        borrowed, kept = traced(wb.candidate, ids, path), traced(own, ids, path)
        different = [k for k in kept if not torch.equal(borrowed[k], kept[k])]
        assert borrowed.keys() == kept.keys() and not different, (recipe, path, different[:5])
    ref_w = wb.reference.backend._w
    unpadded = {k: m for k, m in wb.backend.modules.items() if m.weight.shape[0] == m.n_out}  # padded: te's own
    assert len(unpadded) >= 7 * wb.gguf.config.n_layers
    for key, mod in unpadded.items():
        assert mod.weight.data_ptr() == ref_w[key].data_ptr(), key  # the reference's tensor, not a copy
        assert mod.weight.data_ptr() != own.backend.modules[key].weight.data_ptr()
    # a fault that reads a weight transposed must not borrow the reference's untransposed copy
    bad = Workbench(RunConfig(model=str(tiny_path), backend="te", fault="transposed-q-weight", reference_device="cuda"),
                    tmp_path / "fault")
    assert bad.backend.weights_from is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_rounding_a_shared_input_once_is_bit_identical_to_rounding_it_per_call(tiny_path):
    """bf16 casts an input read by several GEMMs (q, k, v; gate, up) once and its biases once: the same logits and
    taps as casting both on every call, as it did."""
    import torch.nn.functional as F

    from fp8parity.backends.gpu import BF16Backend

    class PerCall(BF16Backend):
        def linear(self, x, w, b, key):
            wb = self._w.get(key)
            if wb is None:
                wb = self._w[key] = w.to(self.device, torch.bfloat16)
            bb = None if b is None else b.to(self.device, torch.bfloat16)
            return F.linear(x.to(self.device, torch.bfloat16), wb, bb).to(x.dtype)

    g = GGUFModel(tiny_path)
    ids = list(range(3, 40))
    once, per_call = (Qwen2Model(g, backend=b) for b in (BF16Backend(), PerCall()))
    for path in ("prefill", "decode"):
        a, b = traced(once, ids, path), traced(per_call, ids, path)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and len(a) > 100 and not different, (path, different[:5])
