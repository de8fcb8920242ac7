"""Loader: config from metadata, and one clear sentence for each kind of bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from fp8parity.errors import WorkbookError
from fp8parity.gguf_file import GGUFModel
from fp8parity.models import SynthSpec, write_synthetic


def test_config_of_tiny(tiny):
    c = tiny.config
    assert (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.ffn) == (4, 256, 4, 2, 512)
    assert c.head_dim == 64 and c.rope_theta == 1e6 and abs(c.rms_eps - 1e-6) < 1e-12
    assert not c.tied_embeddings and c.eos_id is not None
    assert set(tiny.tensor_type_counts()) == {"Q5_0", "F32", "Q8_0", "Q6_K", "Q4_K"}


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(WorkbookError, match="not a GGUF file"):
        GGUFModel(p)


def test_missing_file(tmp_path):
    with pytest.raises(WorkbookError, match="no model file"):
        GGUFModel(tmp_path / "nope.gguf")


def test_truncated_names_first_tensor_and_bytes(tiny_path, tmp_path):
    data = tiny_path.read_bytes()
    p = tmp_path / "t.gguf"
    p.write_bytes(data[: len(data) - 100_000])
    with pytest.raises(WorkbookError, match=r"truncated: tensor \S+ needs bytes up to [\d,]+ but the file has [\d,]+ bytes"):
        GGUFModel(p)


def _writer(path, arch="qwen2"):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-6)
    return w


def _finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_other_architecture_named(tmp_path):
    w = _writer(tmp_path / "l.gguf", arch="llama")
    w.add_tensor("token_embd.weight", np.ones((4, 256), np.float32))
    _finish(w)
    with pytest.raises(WorkbookError, match="'llama' model; supported architectures: qwen2"):
        GGUFModel(tmp_path / "l.gguf")


def test_unsupported_quant_type_names_tensor(tmp_path):
    w = _writer(tmp_path / "q.gguf")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((256, 84), np.uint8), raw_dtype=GGMLQuantizationType.Q2_K)
    _finish(w)
    with pytest.raises(WorkbookError, match="blk.0.attn_q.weight is quantized as Q2_K"):
        GGUFModel(tmp_path / "q.gguf")


def test_missing_tensor_named(tmp_path):
    w = _writer(tmp_path / "m.gguf")
    w.add_tensor("token_embd.weight", np.ones((4, 256), np.float32))
    _finish(w)
    with pytest.raises(WorkbookError, match="lacks tensor output_norm.weight"):
        GGUFModel(tmp_path / "m.gguf")


def test_cli_inspect_bad_input_is_one_line_exit_2(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"hello")
    r = subprocess.run([sys.executable, "-m", "fp8parity", "inspect", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_cli_inspect_prints_card(tiny_path):
    r = subprocess.run([sys.executable, "-m", "fp8parity", "inspect", str(tiny_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "layers        4" in r.stdout and "sha256" in r.stdout and "Q6_K" in r.stdout


def test_synthetic_is_deterministic(tmp_path):
    a = write_synthetic(tmp_path / "a.gguf", SynthSpec(seed=3)).read_bytes()
    b = write_synthetic(tmp_path / "b.gguf", SynthSpec(seed=3)).read_bytes()
    c = write_synthetic(tmp_path / "c.gguf", SynthSpec(seed=4)).read_bytes()
    assert a == b and a != c


@pytest.mark.slow
def test_default_model_card(default):
    c = default.config
    assert (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.ffn, c.vocab) == (24, 896, 14, 2, 4864, 151936)
    assert default.tensor_type_counts() == {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
    assert default.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_the_fast_field_reader_gives_gguf_pys_fields(which, request):
    """The reader's fast path for arrays (the tokenizer's 455k elements) returns what gguf-py's own reader does: every
    field with the same types, data indices, parts (values and dtypes) and contents."""
    from gguf import GGUFReader

    model = request.getfixturevalue(which)
    ours, theirs = model.reader.fields, GGUFReader(model.path).fields
    assert list(ours) == list(theirs)
    big = 0
    for name, f in theirs.items():
        g = ours[name]
        assert (g.offset, g.types, g.data, len(g.parts)) == (f.offset, f.types, f.data, len(f.parts)), name
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(g.parts, f.parts, strict=True)), name
        assert g.contents() == f.contents(), name
        big = max(big, len(f.data))
    assert big > (100_000 if which == "default" else 100)  # the tokenizer arrays were compared, not only scalars
