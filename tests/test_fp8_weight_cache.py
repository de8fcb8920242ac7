"""emulated-fp8's quantized weights on disk: a second candidate reads them instead of quantizing again, with logits and
every tap bit-identical to a candidate that quantizes; kept out of runs whose weights are not the file's own."""

from __future__ import annotations

import pytest
import torch

from fp8parity import fp8_weight_cache, weight_cache
from fp8parity.backends.emulated import EmulatedFP8Backend
from fp8parity.config import RunConfig
from fp8parity.taps import Recorder
from fp8parity.workbench import Workbench


@pytest.fixture
def cache_here(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weight_cache, "MIN_BYTES", 0)  # the tiny model is below the size worth caching
    return tmp_path / "cache"


def traced(wb: Workbench) -> dict:
    out = {}
    for path in ("prefill", "decode"):
        rec = Recorder()
        out[(path, "logits")] = wb.candidate.run(list(range(3, 30)), path, rec)
        out |= {(path, *k): v for k, v in rec.tensors.items()}
    return out


def counting_quantizations(monkeypatch) -> list:
    calls = []
    original = EmulatedFP8Backend._weight_scale
    monkeypatch.setattr(EmulatedFP8Backend, "_weight_scale", lambda self, w: calls.append(1) or original(self, w))
    return calls


@pytest.mark.parametrize("recipe", ["current", "rowwise"])
def test_a_second_candidate_reads_the_quantized_weights_and_computes_the_same_bits(tiny_path, tmp_path, cache_here,
                                                                                  monkeypatch, recipe):
    cfg = RunConfig(model=str(tiny_path), backend="emulated-fp8", recipe=recipe)
    monkeypatch.setenv("FP8PARITY_WEIGHT_CACHE", "0")
    plain = traced(Workbench(cfg, tmp_path / "plain"))  # no cache at all: quantized here
    monkeypatch.delenv("FP8PARITY_WEIGHT_CACHE")
    calls = counting_quantizations(monkeypatch)
    first = Workbench(cfg, tmp_path / "first")
    writes = traced(first)
    path = first.backend.weight_file.path
    assert path.is_file() and path.parent == cache_here and calls  # quantized, then written whole
    calls.clear()
    second = Workbench(cfg, tmp_path / "second")
    reads = traced(second)
    assert not calls  # not one weight quantized again
    for got in (writes, reads):
        different = [k for k in plain if not torch.equal(plain[k], got[k])]
        assert got.keys() == plain.keys() and not different, different[:5]
    # quantized or read back, every weight is held in the decode-friendly layout (emulated.column_major)
    for wb in (first, second):
        assert all(wq.stride() == (1, wq.shape[0]) for wq, *_ in wb.backend._weights.values())


def test_only_runs_on_the_files_own_weights_use_it(tiny_path, tmp_path, cache_here):
    transposed = Workbench(RunConfig(model=str(tiny_path), backend="emulated-fp8", fault="transposed-q-weight"), tmp_path)
    assert transposed.backend.weight_file is None
    block = Workbench(RunConfig(model=str(tiny_path), backend="emulated-fp8", recipe="block"), tmp_path)
    assert block.backend.weight_file is None  # its scales come expanded to the weights' shape: not worth a file
    plain = Workbench(RunConfig(model=str(tiny_path), backend="emulated-fp8"), tmp_path)
    assert plain.backend.weight_file is not None and plain.backend.weight_file.path.name.endswith(
        f"-tensor-{fp8_weight_cache.code_version()}.safetensors")


def test_a_damaged_file_is_quantized_again_and_rewritten(tiny_path, tmp_path, cache_here, monkeypatch):
    cfg = RunConfig(model=str(tiny_path), backend="emulated-fp8")
    calls = counting_quantizations(monkeypatch)  # before the first: the file's name hashes the code it wraps
    first = Workbench(cfg, tmp_path / "a")
    good = traced(first)
    path = first.backend.weight_file.path
    path.write_bytes(path.read_bytes()[:100])
    calls.clear()
    again = traced(Workbench(cfg, tmp_path / "b"))
    assert calls and path.stat().st_size > 100
    assert all(torch.equal(good[k], again[k]) for k in good)


def test_large_models_and_a_nearly_full_disk_get_no_file(tiny_path, tmp_path, cache_here, monkeypatch):
    cfg = RunConfig(model=str(tiny_path), backend="emulated-fp8")
    monkeypatch.setattr(fp8_weight_cache, "MAX_BYTES", 1000)  # the tiny model's weights take more
    assert Workbench(cfg, tmp_path / "a").backend.weight_file is None
    monkeypatch.setattr(fp8_weight_cache, "MAX_BYTES", 8 << 30)
    monkeypatch.setattr(fp8_weight_cache, "FREE_MARGIN", 1 << 62)  # no disk has that much left
    wb = Workbench(cfg, tmp_path / "b")
    traced(wb)
    assert wb.backend.weight_file is not None and not wb.backend.weight_file.path.exists()
