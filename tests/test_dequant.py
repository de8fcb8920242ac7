"""Our dequantizers against gguf-py's, bit for bit: random blocks of every type, and every tensor of
the real default model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from fp8parity import dequant
from fp8parity.dequant import SUPPORTED_TYPES, dequantize
from fp8parity.errors import WorkbookError

# byte offsets of the fp16 scale fields inside each block type (random bytes there could be NaN/inf)
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(qtype: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def assert_bit_identical(ours: torch.Tensor, ref: np.ndarray, what: str) -> None:
    a = ours.numpy().reshape(-1).view(np.uint32)
    b = np.asarray(ref, dtype=np.float32).reshape(-1).view(np.uint32)
    bad = np.nonzero(a != b)[0]
    assert bad.size == 0, f"{what}: {bad.size} elements differ, first at {bad[0]}"


@pytest.mark.parametrize("qtype", [t for t in SUPPORTED_TYPES if t in F16_FIELDS])
def test_random_blocks_bit_identical(qtype):
    rng = np.random.default_rng(1)
    raw = random_blocks(qtype, 3001, rng)  # odd count: the word-wise unpacking falls back to narrower words
    block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
    ref = gguf_dequantize(raw, GGMLQuantizationType[qtype])
    ours = dequantize(raw, qtype, raw.shape[0] * block)
    assert ref.std() > 0
    assert_bit_identical(ours, ref, qtype)


@pytest.mark.parametrize("qtype", [t for t in SUPPORTED_TYPES if t in F16_FIELDS])
def test_many_chunks_and_reused_buffer(qtype):
    rng = np.random.default_rng(2)
    raw = random_blocks(qtype, 2 * dequant._CHUNK_BLOCKS + 3, rng)  # two whole chunks and an odd tail
    block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
    buf = torch.full((raw.shape[0] * block + 100,), float("nan"))
    ours = dequantize(raw, qtype, raw.shape[0] * block, out=buf)
    assert ours.data_ptr() == buf.data_ptr()
    assert_bit_identical(ours, gguf_dequantize(raw, GGMLQuantizationType[qtype]), qtype)
    assert torch.isnan(buf[raw.shape[0] * block:]).all()  # nothing written past the tensor


@pytest.mark.parametrize("qtype", ["Q5_0", "Q4_K", "Q6_K"])
def test_unaligned_input(qtype):
    """A slice that starts at an odd address (not how GGUF lays data out, but a caller's array may)."""
    rng = np.random.default_rng(4)
    raw = random_blocks(qtype, 101, rng)
    shifted = np.empty(raw.size + 1, np.uint8)[1:]
    shifted[:] = raw.reshape(-1)
    block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
    assert_bit_identical(dequantize(shifted, qtype, 101 * block), gguf_dequantize(raw, GGMLQuantizationType[qtype]), qtype)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "F32"])
def test_float_types(qtype):
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    if qtype == "F16":
        raw = x.astype(np.float16)
    elif qtype == "BF16":
        raw = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = x
    ref = gguf_dequantize(raw, GGMLQuantizationType[qtype])
    assert_bit_identical(dequantize(raw, qtype, 1000), ref, qtype)


def test_unsupported_type_is_named():
    with pytest.raises(WorkbookError, match="Q2_K.*blk.0.x"):
        dequantize(np.zeros(84, np.uint8), "Q2_K", 256, tensor_name="blk.0.x")


def test_tiny_model_tensors_bit_identical(tiny):
    for name, t in tiny.tensors.items():
        assert_bit_identical(tiny.tensor(name).reshape(-1), gguf_dequantize(t.data, t.tensor_type), name)


@pytest.mark.slow
def test_default_model_all_291_tensors_bit_identical(default):
    """Every tensor of the real Qwen2.5-Coder-0.5B Q4_K_M: Q5_0, Q8_0, Q4_K, Q6_K, F32."""
    assert len(default.tensors) == 291
    buf = torch.empty(max(int(t.n_elements) for t in default.tensors.values()))
    seen, bad = set(), []
    for name, t in default.tensors.items():
        ours = default.tensor(name, out=buf).reshape(-1).numpy().view(np.uint32)
        ref = np.asarray(gguf_dequantize(t.data, t.tensor_type), np.float32).reshape(-1).view(np.uint32)
        if not np.array_equal(ours, ref):
            bad.append((name, int((ours != ref).sum())))
        seen.add(t.tensor_type.name)
    assert not bad, f"{len(bad)} tensors differ, worst: {max(bad, key=lambda b: b[1])}"
    assert seen == {"Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"}


def test_embedding_rows_match_whole_tensor(tiny):
    ids = [0, 5, 100, tiny.config.vocab - 1]
    whole = tiny.tensor("token_embd.weight")
    assert torch.equal(tiny.rows("token_embd.weight", ids), whole[ids])
