"""First divergence in forward order, UNMEASURED handling, spec JSON schemas, traces on disk."""

import json

import pytest
import torch

from fp8parity import parity
from fp8parity.errors import WorkbookError
from fp8parity.trace import key_str as trace_key
from fp8parity.trace import load_trace, save_trace


def trace(values: dict) -> dict:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def test_first_divergence_is_in_forward_order_not_table_order():
    ref = trace({(0, -1, "embedding"): [1, 2], (0, 0, "attn_norm"): [1, 2], (0, 0, "q_proj"): [1, 2],
                 (0, 1, "attn_norm"): [1, 2], (0, -1, "logits"): [1, 2]})
    cand = dict(ref)
    cand[(0, 1, "attn_norm")] = torch.tensor([2.0, -1.0])  # cosine 0
    cand[(0, 0, "q_proj")] = torch.tensor([1.0, 1.0])  # cosine 0.9487
    table = parity.per_op(parity.compare_traces(ref, cand, 0.99))
    fd = parity.first_divergence(table, 0.99)
    assert (fd.layer, fd.op) == (0, "q_proj")
    assert list(table.op) == ["embedding", "attn_norm", "q_proj", "attn_norm", "logits"]


def test_one_sided_tap_is_unmeasured_never_zero_never_first():
    ref = trace({(0, 0, "attn_norm"): [1, 2], (0, 0, "q_proj"): [1, 2], (0, 0, "k_proj"): [1, 2]})
    cand = trace({(0, 0, "attn_norm"): [1, 2], (0, 0, "k_proj"): [-1, -2]})  # no q_proj on the candidate
    rows = parity.compare_traces(ref, cand)
    q = rows[rows.op == "q_proj"].iloc[0]
    assert q.status == parity.UNMEASURED and q.passed is None and q.missing_on == "candidate"
    table = parity.per_op(rows)
    fd = parity.first_divergence(table)
    assert fd.op == "k_proj"  # q_proj was skipped, not scored as cosine 0
    report = parity.parity_report(table, "m", [0], 0.99)
    assert report["first_divergence"]["op"] == "k_proj"
    assert {r["op"]: r["status"] for r in report["rows"]}["q_proj"] == "UNMEASURED"


def test_min_over_positions_and_min_position():
    ref = trace({(p, 0, "attn_out"): [1, 1] for p in range(3)})
    cand = dict(ref)
    cand[(2, 0, "attn_out")] = torch.tensor([1.0, 0.0])
    t = parity.per_op(parity.compare_traces(ref, cand))
    assert t.iloc[0].min_position == 2 and t.iloc[0].positions == 3
    assert t.iloc[0].min_cosine == pytest.approx(2**-0.5)


def test_layer_jsons_have_the_spec_schema():
    ref = trace({(0, 3, "q_proj"): [1, 2, 3]})
    cand = trace({(0, 3, "q_proj"): [1, 2, 3.5]})
    (rec,) = parity.layer_jsons(parity.compare_traces(ref, cand), ref, cand)
    assert {"layer_idx", "op", "cpu_checksum", "gpu_checksum", "cosine", "max_abs_diff"} <= set(rec)
    assert rec["layer_idx"] == 3 and rec["cpu_checksum"] != rec["gpu_checksum"] and rec["max_abs_diff"] == 0.5


def test_trace_round_trip_and_never_overwrites(tmp_path):
    t = trace({(0, -1, "embedding"): [1, 2], (4, 2, "ffn_out"): [3, 4, 5]})
    save_trace(tmp_path / "tr", t, {"path": "prefill", "backend": "reference"})
    back, meta = load_trace(tmp_path / "tr")
    assert set(back) == set(t) and torch.equal(back[(4, 2, "ffn_out")], t[(4, 2, "ffn_out")])
    assert meta["path"] == "prefill" and "versions" in meta and "machine" in meta
    with pytest.raises(WorkbookError, match="never overwritten"):
        save_trace(tmp_path / "tr", t, {})


def test_a_trace_file_is_what_safetensors_torch_writes(tmp_path):
    """Rows that are views of one batch (as the recorder keeps them) are written through numpy: the same bytes as
    safetensors.torch's own writer of private copies, and they read back equal."""
    from safetensors.torch import save_file as torch_save_file

    batch = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    t = {(i, 1, "q_proj"): batch[i] for i in range(3)} | {(0, -1, "logits"): torch.randn(7)}
    save_trace(tmp_path / "tr", t, {})
    torch_save_file({trace_key(k): v.clone() for k, v in t.items()}, str(tmp_path / "torch.safetensors"))
    assert (tmp_path / "tr" / "tensors.safetensors").read_bytes() == (tmp_path / "torch.safetensors").read_bytes()
    back, _ = load_trace(tmp_path / "tr")
    assert all(torch.equal(back[k], v) for k, v in t.items())


def test_imported_npy_trace_compares_the_same_way(tmp_path):
    import numpy as np

    d = tmp_path / "engine"
    d.mkdir()
    np.save(d / "p0.L0.q_proj.npy", np.array([1.0, 2.0], np.float32))
    np.save(d / "p0.L-1.logits.npy", np.array([[0.5, 0.25]], np.float32))
    (d / "meta.json").write_text(json.dumps({"backend": "my-engine"}))
    t, meta = load_trace(d)
    assert meta["backend"] == "my-engine" and t[(0, -1, "logits")].shape == (2,)
    rows = parity.compare_traces(trace({(0, 0, "q_proj"): [1, 2], (0, -1, "logits"): [0.5, 0.25]}), t)
    assert rows.passed.all()
