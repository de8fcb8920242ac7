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
