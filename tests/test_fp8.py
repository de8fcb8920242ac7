"""E4M3 emulation: exact against torch's float8 casts and the scale formula, statistics, GEMM error sizes,
and the backends' refusals on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch

from fp8parity import fp8, metrics
from fp8parity.backends import make_backend
from fp8parity.backends.emulated import EmulatedFP8Backend
from fp8parity.backends.gpu import _pad_out_features, _pad_rows
from fp8parity.errors import WorkbookError

ALL_CODES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
FINITE = ALL_CODES[torch.isfinite(ALL_CODES)]


def test_every_finite_e4m3_value_round_trips():
    q = fp8.cast_e4m3(FINITE)
    assert torch.equal(q.float(), FINITE)
    assert float(FINITE.abs().max()) == fp8.E4M3_MAX
    assert float(FINITE[FINITE > 0].min()) == fp8.E4M3_MIN_SUBNORMAL


def test_round_to_nearest_even_between_neighbours():
    # 1.0 and 1.125 are neighbours: the midpoint 1.0625 goes to the even mantissa (1.0); just above goes up
    x = torch.tensor([1.0625, 1.0626, 1.1875, -1.0625])
    assert fp8.cast_e4m3(x).float().tolist() == [1.0, 1.125, 1.25, -1.0]


def test_saturates_instead_of_nan():
    x = torch.tensor([500.0, -1e6, 448.0, 463.9])
    assert fp8.cast_e4m3(x).float().tolist() == [448.0, -448.0, 448.0, 448.0]


def test_scale_formula_matches_te():
    amax = torch.tensor([[3.0]])
    s = fp8.scale_from_amax(amax)
    assert s.dtype == torch.float32 and float(s) == float(torch.tensor(448.0) / torch.tensor(3.0))
    assert float(fp8.scale_from_amax(torch.tensor([[0.0]]))) == 1.0
    assert float(fp8.scale_from_amax(torch.tensor([[float("inf")]]))) == 1.0
    assert float(fp8.scale_from_amax(torch.tensor([[1e-45]]))) == fp8.FP32_MAX  # 448/1e-45 overflows fp32
    p2 = fp8.scale_from_amax(torch.tensor([[3.0]]), pow2=True)
    assert float(p2) == 128.0  # 149.33 rounded down to a power of two


def test_quantize_uses_the_full_range_and_keeps_subnormals():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    s = fp8.scale_from_amax(fp8.amax_tensor(x.view(1, -1)))
    q = fp8.quantize(x, s.reshape(()))
    assert float(q.float().abs().max()) == 448.0
    tiny = torch.tensor([0.003])  # 0.003 * 1 lands in the subnormal range (2^-9 .. 2^-6)
    assert float(fp8.quantize(tiny, torch.tensor(1.0)).float()) == pytest.approx(0.00390625)
    assert float(fp8.quantize(tiny, torch.tensor(1.0), flush_subnormals=True).float()) == 0.0


def test_statistics_count_what_was_lost():
    x = torch.tensor([1e-4, 0.003, 0.5, 1.0, 1000.0])
    s = torch.tensor(1.0)
    st = fp8.quant_stats(x, s, fp8.quantize(x, s))
    assert st.frac_zeroed == pytest.approx(1 / 5)  # 1e-4 < half the smallest subnormal
    assert st.frac_subnormal == pytest.approx(1 / 5)  # 0.003 -> 0.0039
    assert st.frac_saturated == pytest.approx(1 / 5)  # 1000 clipped to 448
    assert st.amax == 1000.0


def test_block_scales_cover_partial_tiles():
    w = torch.randn(300, 200)
    a = fp8.amax_blocks(w, 128, 128)
    assert a.shape == (3, 2)
    assert float(a[2, 1]) == float(w[256:, 128:].abs().max())
    assert fp8.expand_blocks(a, 128, 128, (300, 200)).shape == (300, 200)


def test_round_mantissa():
    x = torch.tensor([1.0 + 2**-10, 1.0 + 3 * 2**-11])
    assert fp8.round_mantissa(x, 9).tolist() == [1.0, 1.0 + 2**-9]
    assert fp8.round_mantissa(x, 9, truncate=True).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("granularity,lo", [("tensor", 0.9990), ("rowwise", 0.9990), ("block", 0.9990),
                                            ("delayed", 0.995)])
def test_emulated_gemm_error_is_e4m3_sized(granularity, lo):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(16, 512, generator=g), torch.randn(256, 512, generator=g) * 0.05
    y = EmulatedFP8Backend(granularity).linear(x, w, None, "k")
    exact = x.double() @ w.double().t()
    assert lo < metrics.cosine(y, exact) < 0.99999  # clearly FP8, clearly not broken
    assert 0.01 < metrics.rel_l2(y, exact) < 0.1


def test_fp64_accumulation_is_the_cast_to_representable_control():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 256, generator=g), torch.randn(64, 256, generator=g)
    e32 = EmulatedFP8Backend("tensor", "fp32").linear(x, w, None, "k")
    e64 = EmulatedFP8Backend("tensor", "fp64").linear(x.double(), w, None, "k")
    assert metrics.rel_l2(e32, e64) < 1e-6  # fp32 sums of exact E4M3 products: tiny accumulation error
    fast = EmulatedFP8Backend("tensor", "fast").linear(x, w, None, "k")
    assert 1e-5 < metrics.rel_l2(fast, e64) < 1e-2


def test_faulty_variants_behave_as_their_bugs():
    x = torch.randn(4, 64) * 1e5  # GEMM outputs far beyond fp16's 65504
    w = torch.randn(32, 64)
    y = EmulatedFP8Backend("tensor", output_dtype="fp16").linear(x, w, None, "k")
    assert torch.isinf(y).any()
    stale = EmulatedFP8Backend("tensor", stale_activation_cache=True)
    a = stale.linear(torch.randn(4, 64), w, None, "a")
    b_in = torch.randn(4, 64)
    b = stale.linear(b_in, w, None, "b")  # same element count: gets a's quantized activations
    assert torch.allclose(a, b)
    assert not torch.allclose(b, EmulatedFP8Backend("tensor").linear(b_in, w, None, "b"))


def test_padding_for_gpu_gemms():
    xp, t = _pad_rows(torch.ones(5, 32))
    assert xp.shape == (16, 32) and t == 5 and float(xp[5:].abs().sum()) == 0
    w, b = _pad_out_features(torch.ones(445, 256), torch.ones(445))
    assert w.shape == (448, 256) and b.shape == (448,) and float(w[445:].abs().sum()) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("name", ["te", "torch-fp8", "bf16"])
def test_gpu_backends_refuse_clearly_without_a_gpu(name):
    with pytest.raises(WorkbookError, match="needs a CUDA GPU and none is visible") as e:
        make_backend(name)
    assert "\n" not in str(e.value)


def test_auto_says_what_it_chose(capsys):
    b = make_backend("auto")
    assert b.name in ("emulated-fp8", "te", "torch-fp8")
    assert f"backend auto chose {b.name}" in capsys.readouterr().out


def test_unknown_names_are_refused():
    with pytest.raises(WorkbookError, match="unknown backend 'fp4'"):
        make_backend("fp4")
    with pytest.raises(WorkbookError, match="unknown recipe 'mxfp8'"):
        make_backend("emulated-fp8", recipe="mxfp8")
