"""The twin of llama.cpp's CUDA kernels, checked against what llama.cpp 0.3.36 computed on an NVIDIA H200 (layer 0 and
the embedding of 6 positions of the real default model, both paths, cut from a trace the GPU host wrote; no GPU here):
every op within its floor, a 2 % fault planted in that trace pinned to its (position, layer, op), the CPU twin unable
to explain the CUDA GEMMs, and the Q8_1 and Q4_K pieces of the twin against independent arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fp8parity import replay, twin
from fp8parity.engines.ggml_twin import MMVQ_MAX_BATCH, q4_k_mmq_parts, q8_1
from fp8parity.qwen2 import Qwen2Model
from fp8parity.trace import load_trace

DATA = Path(__file__).parent / "data"


def replay_table(model, taps, meta, arithmetic="ggml-cuda"):
    return replay.local_check(model, taps, meta["path"], meta["prompt_ids"], twin.TwinSpec(arithmetic), layers=[0])[0]


@pytest.fixture(scope="module")
def reference(default):
    return Qwen2Model(default)


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_the_h200_trace_replays_within_its_floors(reference, path):
    taps, meta = load_trace(DATA / f"h200_llama_cuda_{path}")
    table = replay_table(reference, taps, meta)
    measured = table[table.status == "measured"]
    assert len(measured) >= 12 and not measured.beyond.any(), measured[["op", "times_floor"]]
    gemms = measured[measured.op_class == "gemm-ggml-cuda"]
    assert set(gemms.op) >= {"q_proj", "k_proj", "v_proj", "ffn_gate", "ffn_up", "ffn_out"}
    assert gemms.times_floor.max() < 1.0  # the twin's rounding is llama.cpp's, to fp32 summation
    if path == "prefill":  # the TF32 attention is what the prefill's floor allows for, the decode row is fp32
        assert measured.set_index("op").loc["attention", "rel_l2"] > replay.FLOORS["attention"].rel_l2


@pytest.mark.parametrize("path,op,position,factor", [("prefill", "ffn_up", 3, 1.02), ("decode", "v_proj", 4, 1.02),
                                                      ("decode", "k_post_rope", 2, 1.001)])
def test_a_small_fault_in_the_h200_trace_is_pinned(reference, path, op, position, factor):
    taps, meta = load_trace(DATA / f"h200_llama_cuda_{path}")
    taps[(position, 0, op)] = taps[(position, 0, op)] * factor
    first = replay.first_beyond(replay_table(reference, taps, meta))
    assert (first["layer"], first["op"], first["position"]) == (0, op, position)


def test_the_cpu_twin_cannot_explain_the_cuda_gemms(reference):
    taps, meta = load_trace(DATA / "h200_llama_cuda_decode")
    table = replay_table(reference, taps, meta, arithmetic="ggml-q8")
    gemms = table[(table.status == "measured") & (table.op_class == "gemm-fp32")]
    assert gemms.beyond.any()


def test_q8_1_rounds_per_block_of_32_as_the_cuda_kernels():
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)) * 4
    x[0, 5] = 0.0
    for kernel in ("mmvq", "mmq"):
        q, d, other = q8_1(x, kernel, scale_fp16=True)
        b = x.reshape(3, 8, 32)
        assert q.abs().max() <= 127 and torch.equal(q.abs().amax(-1), torch.full((3, 8), 127.0))
        assert torch.all((b - q * d).abs() <= d * (0.5 + 127 * 2**-11))  # half a step, plus the fp16 scale's rounding
        assert other.abs().max() <= 1
    assert MMVQ_MAX_BATCH == 8


def test_q4_k_parts_reassemble_the_weight_within_fp16_rounding(default):
    name = next(n for n in default.tensors if default.qtype(n) == "Q4_K")
    w = default.tensor(name)
    raw = torch.from_numpy(np.ascontiguousarray(default.tensors[name].data)).view(torch.uint8)
    w1, m = q4_k_mmq_parts(raw, *w.shape)
    rebuilt = (w1.view(w.shape[0], -1, 32) - m.unsqueeze(-1)).reshape(w.shape)
    assert not torch.equal(rebuilt, w)  # MMQ's fp16 products are not the file's fp32 scales
    assert float((rebuilt - w).abs().max()) <= 2**-10 * float(w.abs().max())


def test_a_block_sum_near_an_fp16_tie_may_round_either_way():
    """The other fp16 rounding is admitted only where another fp32 summation order could reach the tie."""
    from fp8parity.engines.ggml_twin import fp16_sums

    x = torch.full((2, 32), 0.5)
    x[0, 0] += 1024.5 + 2**-10 - 16.0  # the first block sums to 1024.5 + 2^-10: one fp32 ulp from an fp16 tie
    x[1, 0] += 3.3  # an ordinary sum
    h, step = fp16_sums(x)
    assert h[0, 0] == 1024.0 + 1.0 or h[0, 0] == 1024.0  # fp16's spacing at 1024 is 1
    assert step[0, 0].abs() == 1.0 and step[1, 0] == 0


def test_ties_admitted_in_the_h200_traces_are_few(reference):
    for path in ("prefill", "decode"):
        taps, meta = load_trace(DATA / f"h200_llama_cuda_{path}")
        _, tw = replay.local_check(reference, taps, path, meta["prompt_ids"], twin.TwinSpec("ggml-cuda"), layers=[0])
        assert tw.admitted <= 3  # of ~1,400 block sums and ~40,000 activations rounded in layer 0
