"""The dequantized-weight cache: bit-identical to dequantizing the file, written once and then only read, rebuilt when
damaged, off when asked."""

from __future__ import annotations

import pytest
import torch

from fp8parity import weight_cache
from fp8parity.qwen2 import WeightStore


@pytest.fixture
def cache_here(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8PARITY_CACHE", str(tmp_path))
    monkeypatch.setattr(weight_cache, "MIN_BYTES", 0)  # the tiny model is below the size worth caching
    return tmp_path


def matrices(gguf):
    return [t.name for t in gguf.reader.tensors if len(t.shape) == 2 and t.name != "token_embd.weight"]


def test_cached_weights_equal_the_dequantized_file_and_are_written_once(tiny, cache_here):
    names = matrices(tiny)
    first = WeightStore(tiny, torch.float32, keep=True)
    got = {n: first.get(n) for n in names}
    path = weight_cache.cache_path(tiny)
    assert path.is_file() and path.parent == cache_here
    stamp = path.stat().st_mtime_ns
    second = WeightStore(tiny, torch.float32, keep=True)
    for n in names:
        assert torch.equal(second.get(n), got[n]) and torch.equal(got[n], tiny.tensor(n))
    assert path.stat().st_mtime_ns == stamp  # read, not written again


def test_a_damaged_cache_is_rebuilt(tiny, cache_here):
    name = matrices(tiny)[0]
    WeightStore(tiny, torch.float32, keep=True).get(name)
    path = weight_cache.cache_path(tiny)
    path.write_bytes(path.read_bytes()[:100])
    assert torch.equal(WeightStore(tiny, torch.float32, keep=True).get(name), tiny.tensor(name))
    assert path.stat().st_size > 100


def test_the_cache_can_be_turned_off(tiny, cache_here, monkeypatch):
    monkeypatch.setenv("FP8PARITY_WEIGHT_CACHE", "0")
    name = matrices(tiny)[0]
    assert torch.equal(WeightStore(tiny, torch.float32, keep=True).get(name), tiny.tensor(name))
    assert not weight_cache.cache_path(tiny).exists()


def test_run_all_writes_the_cache_once_before_notebooks_start_together(tiny, tiny_path, cache_here, capsys):
    from fp8parity.runner import warm_weight_cache

    warm_weight_cache(tiny)
    path = weight_cache.cache_path(tiny)
    assert path.is_file() and "once for every notebook" in capsys.readouterr().out
    stamp = path.stat().st_mtime_ns
    warm_weight_cache(tiny)  # already there: read by the notebooks, not written again
    assert path.stat().st_mtime_ns == stamp and capsys.readouterr().out == ""


def test_every_cached_tensor_starts_on_a_64_byte_boundary(tmp_path):
    """Memory-mapped weights must be aligned as fresh ones are: MKL sums a misaligned row in another order (the real
    0.5B's reference decode logits moved by 3.5e-5 with the old cache). Odd sizes and a scalar-like scale included."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fp8parity import aligned_safetensors

    gen = torch.Generator().manual_seed(5)
    tensors = {"a.q": torch.randn(16, 40, generator=gen), "a.scale": torch.tensor([[0.37]]),
               "b.q": torch.randn(7, 3, generator=gen), "c": torch.randn(128, 64, generator=gen).double(),
               "d": torch.arange(5, dtype=torch.int64)}
    path = tmp_path / "w.safetensors"
    aligned_safetensors.save(tensors, path, {"what": "test"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"what": "test"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert torch.equal(got, t) and got.dtype == t.dtype
            if t.nbytes % 64 == 0:  # stored first, each from a multiple of 64 bytes into the file
                assert got.data_ptr() % 64 == 0, name
    assert load_file(str(path)).keys() == tensors.keys()  # safetensors' own reader validates the layout
    assert not list(tmp_path.glob("*.partial"))


def test_the_dequantized_cache_is_aligned(tiny, cache_here):
    store = WeightStore(tiny, torch.float32, keep=True)
    assert all(store.get(n).data_ptr() % 64 == 0 for n in matrices(tiny))
