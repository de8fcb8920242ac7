"""llama.cpp as a candidate: its ggml node names mapped onto the workbook's ops (checked against the names the pinned
llama-cpp-python produces), a callback dump of the tiny model judged by stage B against llama.cpp's own twin, and a
tensor corrupted in the GGUF localized to its layer and op. The engine tests need `make engines`; CI requires them."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fp8parity import metrics, stages
from fp8parity.config import RunConfig
from fp8parity.engines.ggml_twin import quantize_activations
from fp8parity.engines.llamacpp import MAPPED_OPS, UNMEASURED_OPS, node_op
from fp8parity.qwen2 import quantize_q8_k
from fp8parity.taps import ALL_OPS, GLOBAL_LAYER, LAYER_OPS
from fp8parity.workbench import Workbench

NODES = Path(__file__).parent / "data" / "llama_cpp_0.3.36_qwen2_nodes.txt"
try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False
needs_llama = pytest.mark.skipif(not HAVE_LLAMA and not os.environ.get("FP8PARITY_REQUIRE_LLAMA"),
                                 reason="llama-cpp-python is not installed (`make engines`; CI requires these tests)")


def test_the_pinned_versions_node_names_map_onto_every_op_once():
    names = [n for n in NODES.read_text().splitlines() if n and not n.startswith("#")]
    seen, mapped = Counter(), []
    for n in names:
        hit = node_op(n, seen[n])
        seen[n] += 1
        if hit is not None:
            mapped.append(hit)
    n_layers = 4
    expected = {(op, L) for L in range(n_layers) for op in LAYER_OPS if op not in UNMEASURED_OPS}
    expected |= {(op, GLOBAL_LAYER) for op in ALL_OPS if op not in LAYER_OPS}
    assert Counter(mapped) == Counter(expected)  # every op once, nothing else
    assert UNMEASURED_OPS == ("attn_out",) and MAPPED_OPS | set(UNMEASURED_OPS) == set(ALL_OPS)
    assert node_op("Qcur-3", 1) == ("q_proj", 3) and node_op("Qcur-3", 3) == ("q_post_rope", 3)
    assert node_op("Qcur-3 (reshaped)", 0) is None and node_op("node_26", 0) is None


def test_the_twin_rounds_activations_as_ggml_does():
    """Q8_K is the reference's own activation rounding (the q8k fault); Q8_0 against gguf-py's quantizer: the same
    codes but where x86 ggml's id = 127 / amax and round-half-even differ from gguf-py's 1 / d and half away."""
    import gguf

    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(quantize_activations(x, "Q8_K"), quantize_q8_k(x))
    ours = quantize_activations(x, "Q8_0").numpy()
    theirs = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                    gguf.GGMLQuantizationType.Q8_0).reshape(8, 512)
    step = np.abs(x.numpy()).reshape(8, 16, 32).max(-1, keepdims=True).repeat(32, -1).reshape(8, 512) / 127
    assert (ours != theirs).mean() < 1e-3 and np.all(np.abs(ours - theirs) <= step * 1.01)
    assert torch.equal(quantize_activations(x, "F32"), x)


def judge(model_path, trace_folder) -> stages.Verdict:
    wb = Workbench(RunConfig(model=str(model_path), backend="reference", max_prompts=1), trace_folder.parent / "wb")
    return stages.judge_b_trace(stages.measure_b_trace(wb, trace_folder), stages.ParityRule())


@needs_llama
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_a_callback_dump_of_the_tiny_model_is_judged_against_llama_cpps_twin(tiny_path, tmp_path, path):
    from fp8parity.engines.llamacpp import write_trace
    from fp8parity.gguf_file import GGUFModel
    from fp8parity.qwen2 import Qwen2Model
    from fp8parity.trace import load_trace

    ids = list(range(3, 40))
    meta, logits = write_trace(str(tiny_path), ids, path, tmp_path / "trace", threads=2)
    taps, _ = load_trace(tmp_path / "trace")
    assert {op for _, _, op in taps} == MAPPED_OPS and {p for p, _, _ in taps} == set(range(len(ids)))
    ref = Qwen2Model(GGUFModel(tiny_path))
    assert torch.equal(taps[(5, -1, "embedding")], ref.embed([ids[5]])[0])  # a lookup: bit-exact
    assert metrics.cosine(logits[-1], ref.prefill(ids, logits_for="last")[-1]) > 0.999
    v = judge(tiny_path, tmp_path / "trace")
    assert v.status == "pass" and v.twin["arithmetic"] == "ggml-q8", v.summary
    assert "ggml-q8" in v.fingerprint_text.split("**")[1]  # the fingerprint names llama.cpp's arithmetic unprompted


@needs_llama
def test_a_tensor_corrupted_in_the_gguf_is_localized_to_its_layer_and_op(tiny_path, tmp_path):
    from gguf import GGUFReader

    from fp8parity.engines.llamacpp import write_trace

    bad = tmp_path / "corrupted.gguf"
    shutil.copy(tiny_path, bad)
    reader = GGUFReader(bad, "r+")
    t = next(t for t in reader.tensors if t.name == "blk.2.ffn_up.weight")
    t.data[0] = t.data[0][::-1].copy()  # output row 0 of layer 2's up projection: its bytes reversed
    reader.data.flush()
    write_trace(str(bad), list(range(3, 40)), "prefill", tmp_path / "trace", threads=2)
    v = judge(tiny_path, tmp_path / "trace")  # the reference and the twin read the intact file
    assert v.status == "fail" and (v.first_beyond_floor["layer"], v.first_beyond_floor["op"]) == (2, "ffn_up"), v.summary


@needs_llama
def test_run_all_with_llama_cpp_as_the_candidate(tiny_path, tmp_path):
    """BACKEND=llama.cpp runs notebook 10 (stages A, B, C, F through the engine; D, E unmeasured) and the summary."""
    import json

    from fp8parity.runner import run_all

    rc = run_all(RunConfig(model=str(tiny_path), backend="llama.cpp", run_id="ll", max_prompts=1, max_new_tokens=8),
                 runs_dir=str(tmp_path), quiet=True)
    run = json.loads((tmp_path / "ll" / "verdicts.json").read_text())
    status = {s: v["status"] for s, v in run["verdicts"].items()}
    assert rc == 0 and status == {"A": "pass", "B": "pass", "C": "pass", "D": "unmeasured", "E": "unmeasured",
                                  "F": "pass"}, status
    assert run["verdicts"]["A"]["provenance"]["backend"]["name"] == "llama.cpp"
    assert "llama_cpp_python" in (tmp_path / "ll" / "index.html").read_text()  # the report names the engine's version


def test_a_bad_llama_cpp_run_is_refused_before_it_starts(tiny_path, tmp_path):
    from fp8parity.errors import WorkbookError
    from fp8parity.runner import run_all

    with pytest.raises(WorkbookError, match="injected into the workbook's own forward"):
        run_all(RunConfig(model=str(tiny_path), backend="llama.cpp", fault="rmsnorm-eps-1e-5"), runs_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_activation_scales_are_true_divisions_as_in_c():
    """torch computes `scalar / tensor` as reciprocal times scalar (two roundings). On the real model that moved one
    activation from 37.499996 to 37.5 steps and one step off llama.cpp's Q8_K code: a false alarm of 139x the floor at
    layer 11 ffn_out. The expected code here is C's arithmetic in numpy float32: nearest_int(x * (-127.f / max))."""
    mx, x = np.float32(-1.2377370595932007), np.float32(0.36547350883483887)
    block = torch.zeros(1, 256)
    block[0, 0], block[0, 1] = float(mx), float(x)
    iscale = np.float32(-127.0) / mx
    code = np.rint(x * iscale)
    assert code == 37 and quantize_q8_k(block)[0, 1].item() == pytest.approx(float(code / iscale), rel=1e-6)
    q0 = quantize_activations(block[:, :32], "Q8_0")[0, 1].item()
    assert round(q0 / float(np.float16(abs(mx) / np.float32(127)))) == int(np.rint(x * (np.float32(127) / abs(mx))))


def test_the_twins_rope_angles_follow_ggmls_recurrence():
    """ggml-cpu's rope_cache_init: theta starts at the position and is multiplied by powf(base, -2/d) once per pair,
    each product rounded to fp32; written here as the C loop, in numpy float32."""
    from fp8parity.engines.ggml_twin import ggml_rope_tables

    d, base = 128, 1_000_000.0
    cos, sin = ggml_rope_tables(torch.arange(40), d, base, torch.float32, "cpu")
    scale = np.float32(base) ** np.float32(-2.0 / d)
    for p in (0, 7, 39):
        theta = np.float32(p)
        for i in range(d // 2):
            assert cos[p, i] == cos[p, i + d // 2] == np.float32(np.cos(np.float64(theta)))
            assert sin[p, i] == np.float32(np.sin(np.float64(theta)))
            theta = np.float32(theta * scale)


def test_the_side_by_side_report_is_readable(tmp_path):
    """compare.json/.md/.html from a table with the reference's empty cells: blanks, not NaN; provenance on top."""
    import json
    import math

    import pandas as pd

    from fp8parity.engines.compare import write_report

    table = pd.DataFrame([{"prompt": 0, "engine": "reference (fp32, CPU)", "cos_vs_reference": 1.0,
                           "decode_ms_per_token": math.nan},
                          {"prompt": 0, "engine": "llama.cpp cuda", "cos_vs_reference": 0.999897,
                           "decode_ms_per_token": 6.43}])
    write_report(table, tmp_path / "r", {"model": "m.gguf", "card": "NVIDIA H200"})
    html, md = (tmp_path / "r" / "compare.html").read_text(), (tmp_path / "r" / "compare.md").read_text()
    assert "NaN" not in html and "nan" not in md and "0.999897" in html and "<b>card</b>: NVIDIA H200" in html
    assert json.loads((tmp_path / "r" / "compare.json").read_text())["provenance"]["model"] == "m.gguf"


@needs_llama
def test_a_llama_cpp_generation_keeps_the_logits_it_decided_from(tiny_path):
    """Stage F measures a divergence on the logits a generation kept (generate(keep_logits=True)): for llama.cpp too,
    they are the ones generation_logits retraces, bit for bit, and each row's argmax is the token emitted."""
    from fp8parity.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(str(tiny_path), threads=2, n_ctx=64)
    try:
        ids = list(range(3, 20))
        kept = engine.generate(ids, 6, None, keep_logits=True)
        steps = [engine.generation_logits(ids, kept.tokens[:k], 6).float() for k in range(len(kept.tokens))]
        assert len(kept.tokens) == 6 and [int(s.argmax()) for s in steps] == kept.tokens
        assert all(torch.equal(kept.logits[k], steps[k].cpu()) for k in range(len(steps)))
        assert engine.generate(ids, 6, None).logits is None  # kept only when asked
    finally:
        engine.close()
