"""The CPU's faster paths compute what the paths they replace computed: emulated-fp8's one-row GEMMs through fbgemm's
fp16 copies of its E4M3 weights (exact values, exact products, fp32 sums: within fp32 summation's bound of the exact sum,
as sgemm's; the very bits of sgemm on the CPU VM's AMD EPYC, not on the GPU host's Xeon, so no test asks for bits), and
a long CPU prefill's fused attention (a correct fp32 attention's error against fp64; the cascade's prompts keep the
textbook form)."""

from __future__ import annotations

import pytest
import torch

from fp8parity import fp8, weight_cache
from fp8parity.backends import emulated
from fp8parity.backends.emulated import EmulatedFP8Backend, fp16_copy, one_row_gemm
from fp8parity.config import RunConfig
from fp8parity.metrics import rel_l2
from fp8parity.qwen2 import CPU_FUSED_ATTENTION_MIN_TOKENS, attention, causal_mask, textbook_attention
from fp8parity.replay import FLOORS
from fp8parity.taps import Recorder
from fp8parity.workbench import Workbench

needs_fbgemm = pytest.mark.skipif(not emulated.fbgemm_fp16(), reason="this torch or CPU has no fbgemm fp16 GEMM")


def e4m3(shape, sd: float, gen) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen) * sd
    return fp8.quantize(t, fp8.scale_from_amax(fp8.amax_tensor(t))).to(torch.float32)


@needs_fbgemm
def test_the_fp16_copy_holds_every_finite_e4m3_value_exactly():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    values = codes[torch.isfinite(codes)]  # 254: both zeros, the subnormals, 448
    got = one_row_gemm(torch.ones(1, 1), fp16_copy(values[:, None]))[0]  # y = 1 * w: the copy's values, exactly
    assert torch.equal(got, values) and values.abs().min() == 0 and values.abs().max() == 448


@needs_fbgemm
@pytest.mark.parametrize("k, n", [(896, 4864), (4864, 896), (896, 2048)])
def test_a_one_row_gemm_of_e4m3_values_sums_exact_products_in_fp32(k, n):
    gen = torch.Generator().manual_seed(k + n)
    x, w = e4m3((1, k), 3.0, gen), e4m3((n, k), 0.02, gen)
    assert_fp32_sum_of_exact_products(one_row_gemm(x, fp16_copy(w)), x, w)


def assert_fp32_sum_of_exact_products(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x w^T summed in fp32 from exact products: within k u sum|x||w| of the exact sum (u = 2^-24)."""
    exact = x.double() @ w.double().t()
    bound = x.shape[1] * 2.0**-24 * (x.double().abs() @ w.double().abs().t())
    assert ((y.double() - exact).abs() <= bound).all()


def traced_decode(wb: Workbench) -> dict:
    rec = Recorder()
    out = {"logits": wb.candidate.run(list(range(3, 30)), "decode", rec)}
    return out | rec.tensors


@needs_fbgemm
@pytest.mark.parametrize("recipe", ["current", "rowwise"])
def test_a_decode_with_fp16_copies_sums_every_gemm_in_fp32_and_a_twin_shares_them(tiny_path, tmp_path, monkeypatch,
                                                                                  recipe):
    monkeypatch.setenv("FP8PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weight_cache, "MIN_BYTES", 0)  # the weight file (what a candidate and its twin share) on
    cfg = RunConfig(model=str(tiny_path), backend="emulated-fp8", recipe=recipe)
    with monkeypatch.context() as m:
        m.setattr(emulated, "fbgemm_fp16", lambda: False)
        plain = traced_decode(Workbench(cfg, tmp_path / "plain"))
    monkeypatch.setattr(emulated, "COPY_AFTER_ONE_ROW_GEMMS", 5)  # copies made within the 27 steps
    monkeypatch.setattr(emulated, "SHARED_FP16_COPIES", {})
    checked = []

    def checking(a, packed):  # every GEMM through a copy: an fp32 sum of exact products of its real activations
        y = one_row_gemm(a, packed)
        assert_fp32_sum_of_exact_products(y, a, torch.ops.quantized.linear_unpack_fp16(packed)[0])
        checked.append(1)
        return y

    monkeypatch.setattr(emulated, "one_row_gemm", checking)
    wb = Workbench(cfg, tmp_path / "copies")
    fast = traced_decode(wb)
    (copies,) = emulated.SHARED_FP16_COPIES.values()
    assert copies.copies.keys() == wb.backend._weights.keys()  # every weight's copy made, after 5 one-row GEMMs each
    assert set(copies.one_row_gemms.values()) == {5} and len(checked) == (27 - 4) * len(copies.copies)  # from the 5th
    # the same decode within summation-order noise (an FP8 candidate may round an activation to the next E4M3 step
    # where a sum moved an ulp; far below its own error against the reference, a few 1e-2)
    assert fast.keys() == plain.keys() and rel_l2(fast["logits"], plain["logits"]) < 1e-3
    twin = EmulatedFP8Backend(wb.backend.granularity)
    twin.weight_file = wb.backend.weight_file
    key = "0.q_proj"
    assert twin._fp16_copy(key, wb.backend._weights[key][0], rows=1) is copies.copies[key]  # shared, not made again


def test_copies_serve_one_row_gemms_of_exact_e4m3_products_only(monkeypatch):
    monkeypatch.setattr(emulated, "COPY_AFTER_ONE_ROW_GEMMS", 1)
    monkeypatch.setattr(emulated, "fbgemm_fp16", lambda: True)
    monkeypatch.setattr(emulated, "fp16_copy", lambda wq: "copy")
    w = torch.ones(4, 4)
    assert EmulatedFP8Backend("tensor")._fp16_copy("k", w, rows=1) == "copy"
    assert EmulatedFP8Backend("tensor")._fp16_copy("k", w, rows=2) is None  # a prefill's rows: sgemm, its bits
    assert EmulatedFP8Backend("tensor")._fp16_copy(None, w, rows=1) is None  # stage E's unnamed GEMMs
    assert EmulatedFP8Backend("block")._fp16_copy("k", w, rows=1) is None  # scaled values: not fp16's
    for acc in ("fp64", "fast"):
        assert EmulatedFP8Backend("tensor", accumulate=acc)._fp16_copy("k", w, rows=1) is None
    monkeypatch.setattr(emulated, "COPY_AFTER_ONE_ROW_GEMMS", 3)
    b = EmulatedFP8Backend("tensor")
    assert [b._fp16_copy("k", w, rows=1) for _ in range(4)] == [None, None, "copy", "copy"]
    b = EmulatedFP8Backend("tensor")
    b.expect_one_row_gemms(480)  # stage F's decode steps to come: made at the first
    assert b._fp16_copy("k", w, rows=1) == "copy"
    monkeypatch.setattr(emulated, "FP16_COPIES_MAX_BYTES", 2 * w.numel() - 1)
    b = EmulatedFP8Backend("tensor")
    assert [b._fp16_copy("k", w, rows=1) for _ in range(4)] == [None] * 4  # over the budget: the fp32 path


def qkv(H: int, KV: int, T: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(T)
    return tuple((torch.randn(n, T, 64, generator=gen) * sd).to(dtype)
                 for n, sd in ((H, 3.0), (KV, 3.0), (KV, 1.0)))


def test_a_long_cpu_prefill_runs_the_fused_kernel_with_a_correct_fp32_attentions_error():
    T = CPU_FUSED_ATTENTION_MIN_TOKENS
    q, k, v = qkv(14, 2, T)
    mask = causal_mask(T, T, 0, "cpu")
    ke, ve = k.repeat_interleave(7, 0), v.repeat_interleave(7, 0)
    exact = textbook_attention(q.double(), ke.double(), ve.double(), mask)
    fused, textbook = attention(q, k, v, 0, mask=mask), textbook_attention(q, ke, ve, mask)
    assert not torch.equal(fused, textbook)  # the other kernel did run
    assert exact.abs().max() > 0.1
    assert rel_l2(fused, exact) <= 1.5 * rel_l2(textbook, exact) and rel_l2(fused, exact) <= FLOORS["attention"].rel_l2 / 2
    # the fp64 oracle keeps the textbook form
    assert torch.equal(attention(q.double(), k.double(), v.double(), 0, mask=mask), exact)


@pytest.mark.parametrize("T, S, start", [(CPU_FUSED_ATTENTION_MIN_TOKENS - 1, CPU_FUSED_ATTENTION_MIN_TOKENS - 1, 0),
                                         (1, 300, 299), (300, 600, 300)])
def test_the_cascades_prompts_decode_steps_and_continued_prefills_keep_the_textbook_form(T, S, start):
    q, _, _ = qkv(14, 2, T)
    _, k, v = qkv(14, 2, S)
    mask = causal_mask(S, T, start, "cpu")
    assert torch.equal(attention(q, k, v, start, mask=mask),
                       textbook_attention(q, k.repeat_interleave(7, 0), v.repeat_interleave(7, 0), mask))
