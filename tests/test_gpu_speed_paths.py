"""The fast GPU paths change no number: FP8 weights quantized once and one autocast per forward give logits and
every tap bit-identical to the per-call path, for each Transformer Engine recipe. Runs on a CUDA FP8 GPU only."""

from __future__ import annotations

import math

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
def test_bf16_shared_casts_and_narrow_outputs_are_bit_identical_to_the_per_call_path(tiny_path):
    """bf16 casts an input read by several GEMMs (q, k, v; gate, up) once and its biases once, and leaves its outputs
    in bf16 where the next op converts them anyway: the same logits and taps as casting everything on every call and
    converting every output at once, as it did (its GEMMs one by one here: `fuse` is held to bits below)."""
    import torch.nn.functional as F

    from fp8parity.backends.base import LinearBackend
    from fp8parity.backends.gpu import BF16Backend

    class PerCall(BF16Backend):
        def linear_group(self, x, gemms):
            return LinearBackend.linear_group(self, x, gemms)

        def linear_native(self, x, w, b, key):
            return self.linear(x, w, b, key)

        def linear(self, x, w, b, key):
            wb = self._w.get(key)
            if wb is None:
                wb = self._w[key] = w.to(self.device, torch.bfloat16)
            bb = None if b is None else b.to(self.device, torch.bfloat16)
            return F.linear(x.to(self.device, torch.bfloat16), wb, bb).to(x.dtype)

    g = GGUFModel(tiny_path)
    ids = list(range(3, 40))
    once, per_call = (Qwen2Model(g, backend=b) for b in (BF16Backend(fuse=False), PerCall()))
    for path in ("prefill", "decode"):
        a, b = traced(once, ids, path), traced(per_call, ids, path)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and len(a) > 100 and not different, (path, different[:5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", ["0.5b", "7b"])
def test_bf16_fused_gemms_against_separate_ones_on_the_model_shapes(shape):
    """One bf16 GEMM over q|k|v (with biases) or gate|up against the separate GEMMs, on the real models' shapes, for
    a decode step's row up to a 2048-token prefill. Each output is the same dot product; cuBLAS picks its kernel by
    shape, so the order of its fp32 sum may differ. Measured on the H200: the same bits everywhere but q|k|v on the
    7B's shapes below 512 rows. Where the bits differ, the outputs may differ by one bf16 rounding step, no more."""

    from fp8parity.backends.gpu import BF16Backend

    hidden, heads, kv, ffn = {"0.5b": (896, 14, 2, 4864), "7b": (3584, 28, 4, 18944)}[shape]
    hd = hidden // heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    groups = {"q|k|v": [(rnd(n, hidden) * 0.02, rnd(n)) for n in (hidden, kv * hd, kv * hd)],
              "gate|up": [(rnd(ffn, hidden) * 0.02, None) for _ in range(2)]}
    differ = []
    for name, gemms in groups.items():
        fused, separate = BF16Backend(fuse=True), BF16Backend(fuse=False)
        keyed = [(w, b, f"{name}.{i}") for i, (w, b) in enumerate(gemms)]
        for rows in (1, 20, 36, 512, 2048):
            x = rnd(rows, hidden)
            for a, b in zip(fused.linear_group(x, keyed), separate.linear_group(x, keyed), strict=True):
                assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
                if not torch.equal(a, b):
                    differ.append((name, rows))
            if (name, rows) in differ:  # each sum's order: fp32 error up to K u sum|x w| a side, then one bf16 step
                xb = x.bfloat16().float().abs()
                for (w, bias), a, b in zip(gemms, fused.linear_group(x, keyed), separate.linear_group(x, keyed),
                                           strict=True):
                    sums = xb @ w.bfloat16().float().abs().t() + (0 if bias is None else bias.bfloat16().float().abs())
                    bound = 2 * hidden * 2.0**-24 * sums + torch.maximum(a.float().abs(), b.float().abs()) * 2.0**-7
                    assert bool(((a.float() - b.float()).abs() <= bound).all()), (shape, name, rows)
    if shape == "0.5b":
        assert not differ, differ  # the 0.5B's: bit for bit (its decode runs fused)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", ["0.5b", "7b"])
def test_fused_attentions_own_causal_mask_gives_the_bits_of_the_explicit_mask(shape):
    """A long prefill's attention with the kernel's causal mask (blocks above the diagonal skipped) against the same
    kernel with the causal mask as an explicit -inf bias (every block computed), as it ran before: bit for bit, on
    the models' head shapes, at lengths that are and are not multiples of the kernel's blocks; and both near fp64."""
    from fp8parity.qwen2 import attention, causal_mask, fused_attention

    heads, kv, hd = {"0.5b": (14, 2, 64), "7b": (28, 4, 128)}[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for T in (1024, 1500, 2048):
        q, k, v = (torch.randn(n, T, hd, device="cuda", generator=gen) for n in (heads, kv, kv))
        own = attention(q, k, v, 0)  # T >= FUSED_ATTENTION_MIN_TOKENS: the fused kernel, its own causal mask
        rep = heads // kv
        explicit = fused_attention(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0),
                                   causal_mask(T, T, 0, q.device), 1 / math.sqrt(hd))
        assert torch.equal(own, explicit), (shape, T)
        exact = attention(q.double(), k.double(), v.double(), 0)  # the textbook form in fp64 (no fused fp64 kernel)
        assert float((own.double() - exact).norm() / exact.norm()) < 1e-5, (shape, T)
