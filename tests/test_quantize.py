"""The K-quant writers used for synthetic models: valid blocks, checked through gguf-py's dequantizer."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from fp8parity.quantize import quantize

# relative L2 error of a simple min/max quantizer on Gaussian data (measured bounds, with margin)
BOUNDS = {"Q4_K": 0.10, "Q6_K": 0.03, "Q5_0": 0.06, "Q8_0": 0.01}


@pytest.mark.parametrize("qtype", sorted(BOUNDS))
def test_round_trip_through_gguf(qtype):
    x = (np.random.default_rng(0).standard_normal((32, 512)) * 0.05).astype(np.float32)
    q = quantize(x, qtype)
    y = gguf_dequantize(q, GGMLQuantizationType[qtype]).reshape(x.shape)
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert 0 < rel < BOUNDS[qtype]


def test_q4_k_keeps_an_outlier_block_finite():
    x = (np.random.default_rng(1).standard_normal((4, 256)) * 0.02).astype(np.float32)
    x[:, 7] = 0.5
    y = gguf_dequantize(quantize(x, "Q4_K"), GGMLQuantizationType.Q4_K).reshape(x.shape)
    assert np.isfinite(y).all()
    assert np.allclose(y[:, 7], 0.5, rtol=0.1)
