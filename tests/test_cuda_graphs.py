"""CUDA graphs change no number: a repeated prefill and every decode step replayed as a graph give logits
bit-identical to the same forwards run eagerly over the same static K/V cache, for each GPU candidate; and the static
cache itself stays within fp32 rounding of the growing cache the path used before. Runs on a CUDA FP8 GPU only."""

from __future__ import annotations

import pytest
import torch

from fp8parity.backends import ReferenceBackend, make_backend
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import KVCache, Qwen2Model
from fp8parity.workbench import calibrate

pytestmark = pytest.mark.gpu
needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
CANDIDATES = ["reference", "bf16", "te:current", "te:block", "te:delayed-calibrated", "te:delayed", "torch-fp8:current",
              "torch-fp8:rowwise"]
STEPS = 6


def candidate(g: GGUFModel, name: str, graphs: bool, prompt: list[int]) -> Qwen2Model:
    if name.startswith("te"):
        pytest.importorskip("transformer_engine")
    backend, _, recipe = name.partition(":")
    made = ReferenceBackend("cuda") if backend == "reference" else make_backend(backend, recipe or "current")
    model = Qwen2Model(g, backend=made, cuda_graphs=graphs)
    calibrate(model, prompt)
    return model


def generation(model: Qwen2Model, prompt: list[int], cache=None) -> torch.Tensor:
    """Prefill, then STEPS decode steps (teacher-forced from the prompt), logits stacked."""
    cache = cache if cache is not None else model.new_cache(len(prompt) + STEPS)
    out = [model.forward(prompt, cache=cache, logits_for="last")]
    out += [model.forward([t], cache=cache, path="decode") for t in prompt[:STEPS]]
    return torch.cat(out).cpu()


@needs_fp8_gpu
@pytest.mark.parametrize("name", CANDIDATES)
def test_graphs_are_bit_identical_to_eager(tiny_path, name):
    g = GGUFModel(tiny_path)
    prompt = list(range(3, 40))
    runs = {}
    for graphs in (False, True):
        model = candidate(g, name, graphs, prompt)
        # three generations (the second captures what the first saw, the third replays) and three bare prefills
        runs[graphs] = [generation(model, prompt) for _ in range(3)]
        runs[graphs] += [model.prefill(prompt, logits_for="last").cpu() for _ in range(3)]
    assert model.graphs.captures >= 2 and model.graphs.replays >= 2 * STEPS, model.graphs.describe()
    for i, (eager, graphed) in enumerate(zip(runs[False], runs[True], strict=True)):
        assert eager.abs().max() > 0.1, "logits of zeros compare equal whatever the path"
        assert torch.equal(eager, graphed), (name, i, (eager - graphed).abs().max().item())


@needs_fp8_gpu
@pytest.mark.parametrize("name", ["reference", "bf16", "te:current", "te:block", "torch-fp8:rowwise"])
def test_traced_graphs_record_the_eager_taps_bit_for_bit(tiny_path, name):
    """A traced decode step replayed as a graph (taps copied inside it) gives every tap and the logits of the eager
    traced step, bit for bit: decode traces as stage B records them. Traced prefills stay eager (checked alongside,
    whole and filtered: layers, ops, positions, the last row's logits only)."""
    from fp8parity.taps import Recorder

    g = GGUFModel(tiny_path)
    prompt = list(range(3, 40))
    filtered = {"layers": [1], "ops": ["attn_norm", "ffn_out", "final_norm", "logits"], "positions": [0, 5, 36]}
    traces = {}
    for graphs in (False, True):
        model, traces[graphs] = candidate(g, name, graphs, prompt), []
        for _ in range(3):  # the first sees each shape, the second captures, the third replays
            for path, rec in (("decode", Recorder()), ("prefill", Recorder()), ("prefill", Recorder(**filtered))):
                logits = model.run(prompt, path, rec) if rec.layers is None else model.prefill(prompt, rec, "last")
                traces[graphs].append((logits.cpu(), rec.tensors))
    traced = [k for k in model.graphs.graphs if "traced" in k]
    assert len(traced) == 2 and model.graphs.replays >= len(prompt), model.graphs.describe()  # first step, decode
    for i, ((eager_logits, eager), (graph_logits, graphed)) in enumerate(zip(traces[False], traces[True], strict=True)):
        assert torch.equal(eager_logits, graph_logits), (name, i)
        assert set(eager) == set(graphed) and len(eager) >= 8, (name, i, len(eager), len(graphed))
        differ = [k for k in eager if not torch.equal(eager[k], graphed[k])]
        assert not differ, (name, i, differ[:5])
        assert max(float(t.abs().max()) for t in eager.values()) > 0.1, "taps of zeros compare equal whatever the path"


@needs_fp8_gpu
@pytest.mark.parametrize("name", ["bf16", "te:current", "te:block"])
def test_static_cache_stays_within_rounding_of_the_growing_cache(tiny_path, name):
    g = GGUFModel(tiny_path)
    prompt = list(range(3, 40))
    model = candidate(g, name, False, prompt)
    grown, static = generation(model, prompt, KVCache()), generation(model, prompt)
    assert torch.equal(grown[0], static[0])  # the prefill: same sums, same order
    err = ((grown - static).norm() / grown.norm()).item()
    print(f"{name}: decode logits, static vs growing cache, rel. L2 {err:.2e}")
    # an FP8 candidate may round one activation to the next E4M3 step where attention moved an ulp: far below its
    # own error against the reference (a few 1e-2), which is what stage B judges
    assert err < 1e-3, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T, S, start", [(40, 40, 0), (1, 256, 39)])  # a prefill; a decode step over a static cache
def test_gpu_attention_is_a_correct_fp32_attention(T, S, start):
    """Both ways a GPU runs attention, the fused kernel (long prefills) and the textbook form (everything else), have
    the error of a correct fp32 attention against fp64 (the CPU's textbook form), well within stage B's floor."""
    from fp8parity.metrics import rel_l2
    from fp8parity.qwen2 import attention, causal_mask, fused_attention
    from fp8parity.replay import FLOORS

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, t, 64, generator=gen) * sd for n, t, sd in ((14, T, 3.0), (2, S, 3.0), (2, S, 1.0)))
    k[:, start + T:], v[:, start + T:] = 0, 0  # a static cache's unwritten slots
    exact = attention(q.double(), k.double(), v.double(), start)
    cq, ck, cv = q.cuda(), k.repeat_interleave(7, 0).cuda(), v.repeat_interleave(7, 0).cuda()
    errors = {"CPU textbook": rel_l2(attention(q, k, v, start), exact),
              "GPU textbook": rel_l2(attention(q.cuda(), k.cuda(), v.cuda(), start).cpu(), exact),
              "GPU fused": rel_l2(fused_attention(cq, ck, cv, causal_mask(S, T, start, "cuda"), 64**-0.5).cpu(), exact)}
    print(f"T={T} S={S}: rel. L2 to fp64 " + ", ".join(f"{k} {e:.2e}" for k, e in errors.items()))
    assert exact.abs().max() > 0.1
    assert max(errors.values()) <= FLOORS["attention"].rel_l2 / 2, errors
