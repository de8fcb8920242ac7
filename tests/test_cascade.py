"""Stage functions and the fault catalogue on the tiny model: each instrument catches the bug classes it
claims. Model-path faults ride on a bit-exact candidate (the reference backend), so the clean run is silent
and every alarm is the fault's."""

from __future__ import annotations

import pytest
import torch

from fp8parity import stages
from fp8parity.config import RunConfig
from fp8parity.errors import WorkbookError
from fp8parity.fault_bench import new_alarms
from fp8parity.faults import CATALOGUE, get_fault
from fp8parity.workbench import Workbench


def bench(tiny_path, tmp_path, fault: str, backend: str = "reference") -> Workbench:
    return Workbench(RunConfig(model=str(tiny_path), backend=backend, fault=fault, max_prompts=1), tmp_path / fault)


def cascade(wb: Workbench) -> dict[str, stages.Verdict]:
    """Every stage measured and judged with its default rule, as the notebooks and the fault bench do."""
    return {"A": stages.judge_a(stages.measure_a(wb, runs=2), stages.ReproducerRule()),
            "B": judge_b(wb),
            "C": stages.judge_c(stages.measure_c(wb), stages.EmbeddingRule()),
            "D": stages.judge_d(stages.measure_d(wb), stages.RMSNormRule()),
            "E": stages.judge_e(stages.measure_e(wb, layers=[0, 1], synthetic_batches=(16,)), stages.MatmulRule()),
            "F": stages.judge_f(stages.measure_f(wb, runs=2, max_new_tokens=6), stages.GoldenRule())}


def judge_b(wb: Workbench, **measure) -> stages.ParityVerdict:
    return stages.judge_b(stages.measure_b(wb, save_traces=False, **measure), stages.ParityRule())


@pytest.fixture(scope="module")
def clean(tiny_path, tmp_path_factory):
    return cascade(bench(tiny_path, tmp_path_factory.mktemp("clean"), "none"))


def test_clean_bit_exact_candidate_raises_no_alarm(clean):
    assert {s: v.status for s, v in clean.items()} == dict.fromkeys("ABCDEF", "pass")
    assert clean["A"].exit_code == 0 and clean["A"].deterministic
    assert clean["A"].affine["slope"] == pytest.approx(1.0)


@pytest.mark.parametrize("fault,stage,where", [
    ("rmsnorm-eps-1e-5", "D", None),
    ("embedding-off-by-one", "C", (-1, "embedding")),
    ("rope-theta-1e4", "B", (0, "q_post_rope")),
    ("transposed-q-weight", "E", (0, "q_proj")),
])
def test_model_path_faults_are_localized(tiny_path, tmp_path, clean, fault, stage, where):
    v = cascade(bench(tiny_path, tmp_path, fault))
    alarms = new_alarms(v, clean)
    assert stage in alarms, (fault, alarms)
    if where is not None:
        fd = v["B"].first_beyond_floor
        assert (fd["layer"], fd["op"]) == where


def test_corrupted_reference_is_named_the_outlier(tiny_path, tmp_path):
    wb = bench(tiny_path, tmp_path, "reference-q8k-activations")
    v = judge_b(wb, paths=("prefill",))
    assert v.status == "fail" and v.reference_is_outlier
    assert "REFERENCE is the outlier" in v.summary


def test_stale_activation_cache_is_pinned_to_layer0_attn_out(tiny_path, tmp_path):
    wb = bench(tiny_path, tmp_path, "stale-activation-cache", backend="emulated-fp8")
    v = judge_b(wb)
    for path in ("prefill", "decode"):
        fd = v.first_by_path[path]
        assert (fd["layer"], fd["op"]) == (0, "attn_out") and fd["cosine"] < 0.5, path


def test_delayed_scaling_at_scale_one_fails_stage_e(tiny_path, tmp_path):
    wb = bench(tiny_path, tmp_path, "delayed-scaling-uncalibrated", backend="emulated-fp8")
    rule = stages.MatmulRule()
    clean_fp8 = stages.judge_e(stages.measure_e(bench(tiny_path, tmp_path / "c", "none", "emulated-fp8"), layers=[0]), rule)
    v = stages.judge_e(stages.measure_e(wb, layers=[0], synthetic_batches=()), rule)
    assert clean_fp8.status == "pass"
    assert v.candidate_rel_l2 > clean_fp8.candidate_rel_l2


def test_stage_f_without_stop_tokens_runs_to_the_limit(tiny_path, tmp_path):
    wb = bench(tiny_path, tmp_path, "missing-stop-tokens")
    v = stages.judge_f(stages.measure_f(wb, runs=1, max_new_tokens=5), stages.GoldenRule())
    assert v.stop_tokens_used is False
    assert v.without_stop_tokens["stop_reason"] == "max_new_tokens"


def test_every_fault_names_its_class_stage_and_reference():
    for f in CATALOGUE:
        assert f.bug_class and f.reference and f.expected_stage in ("A", "B", "C", "D", "E", "F", "none")
    with pytest.raises(WorkbookError, match="unknown fault 'nope'"):
        get_fault("nope")


def test_fp8_fault_on_a_non_emulated_backend_is_refused(tiny_path, tmp_path):
    with pytest.raises(WorkbookError, match="emulated-fp8"):
        bench(tiny_path, tmp_path, "stale-activation-cache", backend="reference")


def test_capsule_round_trip_replays_the_reference_exactly(tiny, tmp_path):
    """A capsule carries raw GGUF blocks and GEMM inputs; replayed on the reference it reproduces fp32 exactly."""
    from fp8parity.backends import make_backend
    from fp8parity.capsule import build_capsule, load_capsule, replay
    from fp8parity.tokenizer import GGUFTokenizer

    path = build_capsule(tiny, GGUFTokenizer(tiny).chat_ids("hi"), [0, -1], tmp_path / "c.safetensors")
    tensors, meta = load_capsule(path)
    assert meta["layers"] == [0, tiny.config.n_layers - 1]
    assert tensors["raw.blk.0.ffn_down.weight"].dtype.is_floating_point is False  # raw quantized bytes travel
    table = replay(path, {"reference": make_backend("reference"), "fp8": make_backend("emulated-fp8")})
    assert len(table) == 2 * 7 * 2
    ref = table[table.backend == "reference"]
    assert (ref.max_abs_vs_reference == 0).all() and (ref.rel_l2_vs_fp64 < 1e-6).all()
    fp8 = table[table.backend == "fp8"]
    assert (fp8.cosine_vs_fp64 > 0.99).all() and (fp8.rel_l2_vs_fp64 > 1e-3).all()
    with pytest.raises(WorkbookError, match="no capsule"):
        load_capsule(tmp_path / "missing.safetensors")


def test_stage_f_forgives_a_near_tie_and_nothing_else():
    """A run that leaves the golden output where the reference's margin is within 3 σ of the candidate's logit noise
    counts as reproducing it (llama.cpp on CUDA: " simple" vs " Python", margin 0.021); a clear margin, or a run that
    stops early or goes on past the golden end (missing stop tokens), does not."""
    import math

    import pandas as pd

    from fp8parity.stages.f_golden import GoldenResult

    base = {"prompt": "p", "golden": "g", "stop_reason": "stop_token 1", "golden_stop_reason": "stop_token 1",
            "tokens": 5, "im_start_count": 0}
    match = base | {"run": 1, "output": "g", "matches_golden": True, "diverged_at": -1, "divergence": "",
                    "ref_margin": math.nan, "logit_noise": math.nan, "top_two_swapped": False}
    tie = base | {"run": 2, "output": "t", "matches_golden": False, "diverged_at": 3, "divergence": "token",
                  "ref_margin": 0.021, "logit_noise": 0.05, "top_two_swapped": True}
    clear = tie | {"run": 3, "output": "c", "ref_margin": 5.0}
    length = base | {"run": 4, "output": "g and more", "matches_golden": False, "diverged_at": 5, "divergence": "length",
                     "ref_margin": math.nan, "logit_noise": math.nan, "top_two_swapped": False}

    def judge(*rows):
        return stages.judge_f(GoldenResult(pd.DataFrame(rows), [1], True, {}), stages.GoldenRule())

    v = judge(match, tie)
    assert v.status == stages.PASS and v.runs_near_tie == 1 and "near-tie" in v.summary
    assert judge(match, tie, clear).status == stages.FAIL
    assert judge(match, length).status == stages.FAIL
    assert judge(match, tie | {"logit_noise": 0.001}).status == stages.FAIL  # the same margin on a quiet candidate
    assert judge(match, tie | {"top_two_swapped": False}).status == stages.FAIL  # not the runner-up: not a tie
    # With a twin (the workbook's own candidates) its noise decides, whatever the ranks; the candidate's own does not
    twin = tie | {"top_two_swapped": False, "twin_noise": 0.05}
    assert judge(match, twin).status == stages.PASS and "correct implementation's logit noise 0.050" in judge(match, twin).summary
    assert judge(match, twin | {"twin_noise": 0.001}).status == stages.FAIL  # a quiet recipe: 0.021 is no tie for it
    broken = twin | {"ref_margin": 11.0, "logit_noise": 2.9, "twin_noise": 0.15}  # attention 1/d's numbers
    assert judge(match, broken).status == stages.FAIL and judge(match, broken | {"twin_noise": math.nan}).status == stages.FAIL


def test_stage_f_does_not_excuse_a_broken_candidates_divergence(default_path, tmp_path):
    """Attention scaled by 1/d leaves the golden output at the first token with margins of 11-17 logits, inside 3 σ of
    its own (large) logit noise but far outside its twin's (a correct FP8 forward): no tie, so it still fails."""
    wb = Workbench(RunConfig(model=str(default_path), backend="emulated-fp8", fault="attention-scale-1/d",
                             prompts=("Write a Python function that reverses a string.",), max_prompts=1), tmp_path)
    v = stages.judge_f(stages.measure_f(wb, runs=1, max_new_tokens=4), stages.GoldenRule())
    assert v.status == stages.FAIL and v.runs_near_tie == 0


def test_stage_f_measures_the_twins_noise_where_a_run_leaves_the_golden_output(tiny_path, tmp_path):
    """A forced divergence at step 2: the twin of an emulated-fp8 candidate computes what the candidate computes (the
    same noise); with attention scaled by 1/d the candidate is far noisier than its twin, which stays a correct FP8."""
    from fp8parity.stages.f_golden import first_divergence, twin_model

    noise = {}
    for fault in ("none", "attention-scale-1/d"):
        wb = Workbench(RunConfig(model=str(tiny_path), backend="emulated-fp8", fault=fault), tmp_path / fault.replace("/", ""))
        ids = wb.prompt_ids(0)
        golden = wb.reference.generate(ids, 4, None).tokens
        runner_up = int(wb.reference.generation_logits(ids, golden[:2], 4).topk(2).indices[1])
        d = first_divergence(wb, ids, golden, golden[:2] + [runner_up], 4, twin_model(wb))
        assert d["diverged_at"] == 2 and d["divergence"] == "token" and d["ref_margin"] > 0
        noise[fault] = d
    assert noise["none"]["twin_noise"] == noise["none"]["logit_noise"] > 0
    assert noise["attention-scale-1/d"]["logit_noise"] > 3 * noise["attention-scale-1/d"]["twin_noise"] > 0  # 1.11 vs 0.16


def test_stage_f_measures_a_divergence_on_the_logits_the_generation_decided_from(tiny_path, tmp_path):
    """generation_logits retraces generate (prefill, then one decode step per token): at every step its argmax is the
    token generate emitted, for the reference and for an FP8 candidate (whose prefill of the same prefix would round
    differently: its activation scales change with the batch); and the logits a generation keeps (what stage F
    measures a divergence on) are those very numbers, bit for bit."""
    wb = Workbench(RunConfig(model=str(tiny_path), backend="emulated-fp8"), tmp_path)
    ids = wb.prompt_ids(0)
    apart = {}
    for name, model in (("reference", wb.reference), ("candidate", wb.candidate)):
        kept = model.generate(ids, 8, None, keep_logits=True)
        out = kept.tokens
        steps = [model.generation_logits(ids, out[:k], 8) for k in range(len(out))]
        assert [int(s.argmax()) for s in steps] == out
        assert kept.logits.shape == (len(out), steps[0].shape[-1])
        assert all(torch.equal(kept.logits[k], steps[k]) for k in range(len(out)))
        assert model.generate(ids, 8, None).logits is None  # kept only when asked
        prefilled = model.prefill(ids + out[:5], logits_for="last")[-1]
        apart[name] = float((prefilled - steps[5]).norm() / steps[5].norm())
    # measured: 8.3e-7 (fp32 summation order) and 0.13 (the candidate's E4M3 roundings follow its batch's scale)
    assert apart["reference"] < 1e-5 and apart["candidate"] > 1e-2, apart
