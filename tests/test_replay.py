"""Stage B's local check on the tiny model: every clean candidate stays within its noise floors, every planted fault
is pinned to its exact (layer, op, path), foreign traces go through the same replay, and the fingerprint names
the recipe that made a trace."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fp8parity import replay, stages, twin
from fp8parity.backends.emulated import EmulatedFP8Backend
from fp8parity.config import DEFAULT_PROMPTS, RunConfig
from fp8parity.detection import sweep
from fp8parity.errors import WorkbookError
from fp8parity.fault_bench import on_expected_paths
from fp8parity.fault_results import detection_limits
from fp8parity.faults import CATALOGUE
from fp8parity.qwen2 import Qwen2Model
from fp8parity.taps import Recorder
from fp8parity.trace import key_str
from fp8parity.workbench import Workbench


def bench(tiny_path, tmp_path, backend="reference", fault="none", recipe="current") -> Workbench:
    cfg = RunConfig(model=str(tiny_path), backend=backend, fault=fault, recipe=recipe, max_prompts=1)
    return Workbench(cfg, tmp_path / f"{backend}-{recipe}-{fault.replace('/', '_')}")


def judge_b(wb: Workbench, **measure) -> stages.ParityVerdict:
    return stages.judge_b(stages.measure_b(wb, save_traces=False, **measure), stages.ParityRule())


def judge_trace(wb: Workbench, folder):
    result = stages.measure_b_trace(wb, folder)
    return stages.judge_b_trace(result, stages.ParityRule()), result.local


def trace_of(model: Qwen2Model, ids, path) -> dict:
    rec = Recorder()
    model.run(ids, path, rec)
    return rec.tensors


@pytest.mark.parametrize("recipe", ["current", "rowwise", "block", "delayed-calibrated"])
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_an_emulated_candidate_is_its_own_twin_bit_for_bit(tiny_path, tmp_path, recipe, path):
    wb = bench(tiny_path, tmp_path, "emulated-fp8", recipe=recipe)
    ids = wb.prompt_ids()
    wb.prepare_candidate(ids)
    spec = stages.candidate_twin(wb)
    trace = trace_of(wb.candidate, ids, path)
    replays = {batch: replay.Replayer(wb.reference, twin.make_twin(spec, wb.backend.used_input_scales()),
                                      spec.gemm_class, batch_decode=batch).replay(trace, path, ids)
               for batch in (False, True)}
    exact, batched = replays[False], replays[True]
    assert (exact.status == "measured").all() and len(exact) == len(ids) * (15 * wb.gguf.config.n_layers + 3)
    assert exact.rel_l2.max() == 0.0  # same operands, same scales, same batching: nothing left but the op itself
    # a decode trace replayed in one batch (the default): every op but the GEMMs still bit for bit; a GEMM's rows
    # summed by a batch kernel instead of one row's, a few fp32 roundings apart (never a scale: norm ratio 1)
    gemm = batched.op_class.str.startswith("gemm")
    assert batched[~gemm].rel_l2.max() == 0.0
    assert batched[gemm].rel_l2.max() <= (2e-6 if path == "decode" else 0.0)
    assert (batched[gemm].norm_ratio - 1).abs().max() <= 2e-6


@pytest.mark.parametrize("spec", [twin.TwinSpec("fp32"), twin.TwinSpec("bf16", bias="bf16"),
                                  twin.TwinSpec("fp8", "tensor"), twin.TwinSpec("fp8", "block", bias="bf16")],
                         ids=lambda s: s.label())
def test_a_decode_trace_replayed_in_one_batch_gives_the_one_position_replays_numbers(tiny_path, tmp_path, spec):
    """The batched replay is only faster: each of its rows within fp32 summation noise of the row replayed alone."""
    wb = bench(tiny_path, tmp_path)
    ids = wb.prompt_ids()
    cand = Qwen2Model(wb.gguf, backend=EmulatedFP8Backend("rowwise"), weights=wb.reference.weights)  # not the twin
    trace = trace_of(cand, ids, "decode")
    one, alone = (replay.Replayer(wb.reference, twin.make_twin(spec), spec.gemm_class, batch_decode=b)
                  .replay(trace, "decode", ids) for b in (True, False))
    m = one.merge(alone, on=["position", "layer", "op"], suffixes=("", "_alone"))
    assert len(m) == len(one) == len(alone) and (m.rel_l2 > 0).any()
    noise = (m.rel_l2 - m.rel_l2_alone).abs() / m.floor  # in multiples of the op's floor
    assert noise.max() <= 0.05, m.loc[noise.idxmax()]


def test_the_fp32_reference_replayed_in_fp64_sits_on_a_small_nonzero_floor(tiny_path, tmp_path):
    wb = bench(tiny_path, tmp_path)
    ids = wb.prompt_ids()
    rp = replay.Replayer(wb.reference, twin.make_twin(twin.TwinSpec("fp32")), "gemm-fp32", dtype=torch.float64)
    rows = rp.replay(trace_of(wb.reference, ids, "decode"), "decode", ids)
    worst = rows.groupby("op_class").rel_l2.max()
    assert worst["lookup"] == 0.0
    for cls in ("rmsnorm", "attention", "gemm-fp32", "swiglu"):
        assert 0 < worst[cls] <= replay.FLOORS[cls].rel_l2, cls  # rounding exists, and the floor covers it


def test_a_candidate_off_its_declared_recipe_is_caught_at_its_first_gemm(tiny_path, tmp_path):
    """Declared per-tensor current scaling, but it scales per row: q_proj of layer 0 is the first op to differ."""
    wb = bench(tiny_path, tmp_path, "emulated-fp8")
    wb.backend.granularity = "rowwise"
    v = judge_b(wb, paths=("prefill",))
    fd = v.first_beyond_floor
    assert v.status == "fail" and (fd["layer"], fd["op"]) == (0, "q_proj") and fd["times_floor"] > replay.ALARM_FACTOR


# per-batch-scale-ftz bites at the real model's massive activation (layer 2): tested on the default model below
STAGE_B_FAULTS = [f for f in CATALOGUE if f.expected_stage == "B" and f.side == "candidate"
                  and f.name != "per-batch-scale-ftz"]


@pytest.mark.parametrize("fault", STAGE_B_FAULTS, ids=lambda f: f.name)
def test_every_stage_b_fault_is_localized_to_its_layer_op_and_path(tiny_path, tmp_path, fault):
    backend = "emulated-fp8" if fault.fp8 else "reference"
    v = judge_b(bench(tiny_path, tmp_path, backend, fault.name))
    assert v.status == "fail"
    assert on_expected_paths(fault, v), v.first_by_path


def test_scale_only_fault_is_seen_by_the_norm_ratio_not_the_cosine(tiny_path, tmp_path):
    v = judge_b(bench(tiny_path, tmp_path, fault="gemm-scale-0.96"), paths=("prefill",))
    fd = v.first_beyond_floor
    assert fd["cosine"] == pytest.approx(1.0, abs=1e-9) and fd["norm_ratio"] == pytest.approx(0.96, abs=1e-6)
    assert fd["rel_l2"] == pytest.approx(0.04, rel=1e-4)


@pytest.mark.parametrize("backend,recipe", [("reference", "current"), ("emulated-fp8", "current"),
                                            ("emulated-fp8", "block"), ("emulated-fp8", "delayed-calibrated")])
def test_clean_candidates_pass_stage_b_and_say_why(tiny_path, tmp_path, backend, recipe):
    wb = bench(tiny_path, tmp_path, backend, recipe=recipe)
    wb.prompts = list(DEFAULT_PROMPTS)  # two prompts: calibration moves the scales between them
    result = stages.measure_b(wb, save_traces=False)
    v = stages.judge_b(result, stages.ParityRule())
    assert v.status == "pass", v.summary
    assert "no op beyond its noise floor" in v.summary and ("× its floor" in v.summary or "bit-identical" in v.summary)
    local = stages.b_parity.beyond_floor(result.local, stages.ParityRule().factor)
    assert set(local.path) == {"prefill", "decode"} and not local.beyond.any()
    assert {"max_rel_l2", "norm_ratio", "min_cosine"} <= set(result.table.columns)
    assert v.drift["ratio"] == pytest.approx(1.0)  # the twin run end to end drifts exactly as far


@pytest.mark.parametrize("granularity,bias,expected", [("tensor", "fp32", "fp8 tensor, bias fp32"),
                                                       ("rowwise", "fp32", "fp8 rowwise, bias fp32"),
                                                       ("block", "bf16", "fp8 block, bias bf16")])
def test_the_fingerprint_names_the_recipe_that_made_a_trace(tiny_path, tmp_path, granularity, bias, expected):
    wb = bench(tiny_path, tmp_path)
    cand = Qwen2Model(wb.gguf, backend=EmulatedFP8Backend(granularity, bias_dtype=bias), weights=wb.reference.weights)
    ids = wb.prompt_ids()
    fp = replay.fingerprint(wb.reference, trace_of(cand, ids, "prefill"), "prefill", ids)
    assert fp.recipe.iloc[0] == expected and fp.mean_local_error.iloc[0] == 0.0
    assert fp.mean_local_error.iloc[1] > 0  # the runner-up is told apart
    assert expected in replay.describe_fingerprint(fp)


def dump_npy(trace: dict, folder, meta: dict | None = None) -> None:
    """Another engine's dump: one p<pos>.L<layer>.<op>.npy per tap (float32), optional meta.json."""
    folder.mkdir(parents=True)
    for k, v in trace.items():
        np.save(folder / f"{key_str(k)}.npy", v.numpy())
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))


def test_a_foreign_npy_trace_is_fingerprinted_and_judged_through_the_same_replay(tiny_path, tmp_path):
    wb = bench(tiny_path, tmp_path)
    ids = wb.prompt_ids()
    cand = Qwen2Model(wb.gguf, backend=EmulatedFP8Backend("rowwise"), weights=wb.reference.weights)
    tr = trace_of(cand, ids, "decode")
    dump_npy(tr, tmp_path / "clean", {"path": "decode", "prompt_ids": ids})
    v, local = judge_trace(wb, tmp_path / "clean")
    assert v.status == "pass" and v.twin_from == "fingerprint"
    assert v.twin["granularity"] == "rowwise" and local.times_floor.max() <= 1e-3  # the batch's summation order only
    # the same dump with one op 2% off at one position: pinned there, and nothing before it
    bad = dict(tr)
    bad[(5, 2, "ffn_up")] = tr[(5, 2, "ffn_up")] * 0.98
    dump_npy(bad, tmp_path / "bad", {"path": "decode", "prompt_ids": ids})
    v, local = judge_trace(wb, tmp_path / "bad")
    fd = v.first_beyond_floor
    assert v.status == "fail" and (fd["layer"], fd["op"], fd["position"]) == (2, "ffn_up", 5)
    # without prompt ids the embedding cannot be replayed: UNMEASURED, never scored
    dump_npy(tr, tmp_path / "noids")
    v, local = judge_trace(wb, tmp_path / "noids")
    assert v.status == "pass" and (local[local.op == "embedding"].status == "UNMEASURED").all()
    # a tap of another model's width is refused in one sentence
    dump_npy(tr | {(0, 1, "q_proj"): tr[(0, 1, "q_proj")][:-8]}, tmp_path / "other")
    with pytest.raises(WorkbookError, match="was the trace made with this model"):
        stages.measure_b_trace(wb, tmp_path / "other")


def test_the_detection_sweep_localizes_planted_errors_and_reports_a_limit(tiny_path):
    trials, cleans = sweep(str(tiny_path), candidates=("reference", "emulated-fp8:current"), magnitudes=(0.001, 0.05),
                           n_placements=2)
    assert not cleans.false_alarm.any()
    assert trials[trials.magnitude == 0.05].localized.all()
    ref_small = trials[(trials.candidate == "reference") & (trials.magnitude == 0.001)]
    fp8_small = trials[(trials.candidate == "emulated-fp8:current") & (trials.magnitude == 0.001)]
    assert ref_small.localized.all() and not fp8_small.localized.any()  # 0.1% is under the FP8 floor, not fp32's
    limits = detection_limits(trials).set_index(["candidate", "class"]).detection_limit
    assert limits["reference", "scale"] == 0.001 and limits["emulated-fp8:current", "offset"] == 0.05


def test_a_per_batch_scale_is_pinned_where_the_massive_activation_sets_it(default_path, tmp_path):
    """Real model: layer 2's ffn_down input holds the massive activation (565 at position 0); one scale for the
    whole prefill batch flushes the other rows' small values. Decode (a batch of one row) stays clean."""
    fault = next(f for f in CATALOGUE if f.name == "per-batch-scale-ftz")
    v = judge_b(bench(default_path, tmp_path, "emulated-fp8", fault.name))
    assert v.status == "fail" and on_expected_paths(fault, v), v.first_by_path
