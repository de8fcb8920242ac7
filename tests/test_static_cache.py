"""The static K/V cache (the GPU path's, which CUDA graphs replay over) computes what the growing cache computes: a
prefill bit for bit, a decode step within fp32 rounding (its attention sums over the whole capacity, masked slots
adding exact zeros in another order). Checked here on the CPU, where both run eagerly."""

from __future__ import annotations

import pytest
import torch

from fp8parity.errors import WorkbookError
from fp8parity.qwen2 import KVCache, Qwen2Model, StaticKVCache


def steps(model: Qwen2Model, ids: list[int], cache) -> torch.Tensor:
    """Prefill the first half, then decode the rest one token a step."""
    half = len(ids) // 2
    out = [model.forward(ids[:half], cache=cache)]
    out += [model.forward([i], cache=cache, path="decode") for i in ids[half:]]
    return torch.cat(out)


def test_static_cache_matches_the_growing_cache(tiny):
    model = Qwen2Model(tiny)
    ids = list(range(5, 45))
    grown = steps(model, ids, KVCache())
    static = steps(model, ids, StaticKVCache(model.cfg, 300, model.device, model.dtype))
    half = len(ids) // 2
    assert torch.equal(grown[:half], static[:half])  # the prefill: the same sums in the same order
    err = (grown[half:] - static[half:]).abs().max() / grown[half:].abs().max()
    assert 0 <= err < 1e-5, err  # the decode steps: fp32 rounding (6.3e-7 measured here)
    assert grown[half:].abs().max() > 1  # not comparing zeros
    assert grown.argmax(-1).tolist() == static.argmax(-1).tolist()


def test_static_cache_refuses_to_overflow(tiny):
    model = Qwen2Model(tiny)
    cache = StaticKVCache(model.cfg, 8, model.device, model.dtype)
    model.forward(list(range(5, 11)), cache=cache)
    with pytest.raises(WorkbookError, match="holds 8 positions"):
        model.forward(list(range(3)), cache=cache)
    assert cache.length == 6  # the refused forward wrote nothing


def test_cpu_runs_keep_the_growing_cache(tiny):
    assert isinstance(Qwen2Model(tiny).new_cache(10), KVCache)


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_the_gpu_gather_reads_what_the_row_lookup_reads(which, request):
    """A graphed forward gathers its embeddings from the whole table (`embedding_table`, on the GPU); the eager forward
    asks gguf for the rows. Every row must be the same bits both ways (stage C checks them)."""
    g = request.getfixturevalue(which)
    model = Qwen2Model(g)
    table = model.embedding_table()
    rows = torch.randint(0, model.cfg.vocab, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    rows += [0, min(791, model.cfg.vocab - 1), model.cfg.vocab - 1]
    looked_up = model.embed(rows)
    assert looked_up.abs().max() > 0
    assert torch.equal(table.index_select(0, torch.tensor(rows)), looked_up)
