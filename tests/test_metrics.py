"""Metric functions on inputs with known answers."""

import math

import numpy as np
import pytest
import torch

from fp8parity import metrics


def test_cosine_known_values():
    a = torch.tensor([1.0, 0.0])
    assert metrics.cosine(a, a) == 1.0
    assert metrics.cosine(a, torch.tensor([0.0, 2.0])) == 0.0
    assert metrics.cosine(a, -a) == -1.0
    assert metrics.cosine(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2), abs=1e-15)


def test_cosine_is_accumulated_in_fp64():
    # fp32 accumulation of 1e6 terms loses digits; fp64 gives the exact 1 - 1/(2 n) style answer
    n = 1_000_000
    a = torch.ones(n)
    b = torch.ones(n)
    b[0] = 0.0
    assert metrics.cosine(a, b) == pytest.approx(math.sqrt((n - 1) / n), rel=1e-12)


def test_nan_never_passes():
    a = torch.tensor([1.0, float("nan")])
    assert math.isnan(metrics.cosine(a, torch.ones(2)))
    assert not (metrics.cosine(a, torch.ones(2)) >= 0.99)


def test_affine_fit_recovers_exact_line():
    ref = torch.linspace(-5, 12, 1000, dtype=torch.float64)
    cand = 0.96 * ref + 0.12
    fit = metrics.affine_fit(cand, ref)
    assert fit.slope == pytest.approx(0.96, abs=1e-12)
    assert fit.intercept == pytest.approx(0.12, abs=1e-12)
    assert fit.pearson_r == pytest.approx(1.0, abs=1e-12)
    assert fit.residual_rms < 1e-12


def test_affine_fit_top_residuals_point_at_the_perturbed_ids():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(5000, generator=g, dtype=torch.float64)
    cand = 0.96 * ref + 0.12
    cand[15:23] += 3.0  # "top residuals concentrated at vocab positions 15-22"
    fit = metrics.affine_fit(cand, ref, top=8)
    assert sorted(i for i, _ in fit.top_residuals) == list(range(15, 23))


def test_rel_l2_sqnr_max_abs():
    ref = torch.tensor([3.0, 4.0])
    cand = torch.tensor([3.0, 4.5])
    assert metrics.rel_l2(cand, ref) == pytest.approx(0.1)
    assert metrics.sqnr_db(cand, ref) == pytest.approx(20.0)
    assert metrics.max_abs_diff(cand, ref) == pytest.approx(0.5)
    assert metrics.sqnr_db(ref, ref) == math.inf


def test_ulp_distance_counts_representable_floats_across_zero():
    x = torch.tensor([1.0, 1.0, -0.0, 2.0**-149], dtype=torch.float32)
    y = torch.tensor([np.nextafter(np.float32(1.0), np.float32(2.0)), 1.0, 0.0, -(2.0**-149)], dtype=torch.float32)
    assert metrics.ulp_distance(x, y).tolist() == [1, 0, 0, 2]


def test_fnv1a64_reference_vectors():
    # FNV-1a 64 of the empty input is the offset basis; of b"a" the published 0xaf63dc4c8601ec8c.
    assert metrics.fnv1a64(torch.tensor([], dtype=torch.float32)) == "cbf29ce484222325"
    one = torch.tensor([1.0])  # bytes 00 00 80 3f
    h = 0xCBF29CE484222325
    for byte in (0x00, 0x00, 0x80, 0x3F):
        h = ((h ^ byte) * 0x100000001B3) & (2**64 - 1)
    assert metrics.fnv1a64(one) == f"{h:016x}"
    assert metrics.fnv1a64(torch.tensor([1.0])) != metrics.fnv1a64(torch.tensor([1.0000001]))


def test_the_batched_row_metrics_equal_the_row_by_row_ones():
    import math

    import torch

    from fp8parity.metrics import row_metrics, row_metrics_batch

    g = torch.Generator().manual_seed(3)
    ref = torch.randn(7, 40, generator=g)
    cand = ref + 1e-3 * torch.randn(7, 40, generator=g)
    cand[1] = ref[1]  # identical row: sqnr inf
    cand[2] = 0.0  # zero candidate: cosine 0
    cand[3, 5] = float("nan")  # NaN: cosine NaN
    ref[4], cand[4] = 0.0, 0.0  # both zero
    cand[6, 7] = -float("inf")  # inf: cosine NaN, SQNR -inf dB (no signal left), one number each way
    batch = row_metrics_batch(cand, ref)
    for i in range(7):
        one = row_metrics(cand[i], ref[i])
        for name, value in one.items():
            got = batch[name][i]
            assert (math.isnan(value) and math.isnan(got)) or got == pytest.approx(value, rel=1e-12, abs=1e-300), (i, name)


def test_fnv1a64_rows_hashes_each_row_as_fnv1a64_does():
    """Rows of one length are hashed side by side (numpy, wrapping uint64); each must equal the sequential hash."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(896, generator=g) for _ in range(12)] + [torch.randn(40, generator=g) for _ in range(3)]
    rows.append(torch.tensor([1.0, -0.0, float("inf")]))
    got = metrics.fnv1a64_rows(rows)
    assert got == [metrics.fnv1a64(r) for r in rows]
    assert len(set(got)) == len(rows)


@pytest.mark.parametrize("width", [40, 41])  # an even width: np.median's mean of the two middle values
def test_the_ulp_statistics_in_torch_equal_numpys(width):
    """The device path's ULP maximum and median (torch: sort, the two middle values) against numpy's, run on the CPU:
    signs crossing zero, -0.0, infinities and identical rows included."""
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(9, width, generator=g)
    cand = ref * (1 + 1e-3 * torch.randn(9, width, generator=g))
    cand[1] = ref[1]
    cand[2] = -1e6 * ref[2]  # every sign flipped: distances across zero, beyond int32
    ref[3, :4], cand[3, :4] = 0.0, -0.0
    cand[4, 0], ref[5, 1] = float("inf"), -float("inf")
    ulp_max, ulp_median = metrics._ulp_stats(cand, ref)
    t_max, t_median = metrics._ulp_stats_torch(cand, ref)
    assert np.array_equal(ulp_max, t_max) and np.array_equal(ulp_median, t_median)
    assert t_median.dtype == np.float64 and ulp_max.max() > 2**31


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_row_metrics_on_the_gpu_equal_the_cpus():
    """Same ULP integers and maxima; float64 sums within a few ulps of the CPU's (another summation order)."""
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(33, 4864, generator=g)
    cand = ref * (1 + 1e-3 * torch.randn(33, 4864, generator=g))
    cand[1] = ref[1]
    cpu, gpu = metrics.row_metrics_batch(cand, ref), metrics.row_metrics_batch(cand, ref, "cuda")
    for name in ("ulp_max", "ulp_median", "max_abs"):
        assert np.array_equal(cpu[name], gpu[name]), name
    for name in ("cosine", "rel_l2", "norm_ratio", "sqnr_db"):
        assert np.allclose(cpu[name], gpu[name], rtol=1e-13, atol=0), name
