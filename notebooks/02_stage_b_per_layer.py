# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage B — per-layer, per-op parity
#
# **Hypothesis.** If the candidate is wrong, one op of one layer computes something other than what a correct
# implementation of the candidate's own recipe computes; everything after it only carries the damage along.
#
# **Falsifier (the local check).** Record every tap on both sides, at every position of every prompt, on the paths a
# real engine takes (batched prefill, serial decode with a KV cache). Recompute every op of the candidate —
# embedding, norms, q/k/v, RoPE, attention (on the candidate's own K/V), attn_out, residual adds, gate/up, SwiGLU,
# ffn_out, final_norm, lm_head — from the candidate's **own traced inputs**, through a **twin**: a CPU implementation
# of the candidate's declared recipe (E4M3 at the same scaling granularity and batching, bf16 rounding, or fp32).
# A correct op's local error (relative L2, candidate vs twin) is rounding only; it is judged against the **noise
# floor** of its op class, measured between two correct implementations.
#
# **The global view stays:** cosine, relative L2 and norm ratio against the reference per (layer, op); both sides
# against fp64 (a wrong *reference* is named as the outlier); the spec's fixed 0.99 cosine rule on a line of its
# own; the candidate's end-to-end drift beside its twin's. A tap present on one side only is **UNMEASURED**.

# %% tags=["parameters"]
# Parameters: papermill overrides them; in JupyterLab change them here. Their defaults are defined once, in
# fp8parity.config.RunConfig (D below); the comments say what each takes.
from fp8parity.config import INTERACTIVE_RUN_DIR
from fp8parity.config import RunConfig as D

MODEL = D.model  # any qwen2 GGUF (the user's 7B on a GPU host)
BACKEND = D.backend  # reference | bf16 | te | torch-fp8 | emulated-fp8 | auto (te > torch-fp8 > emulated-fp8)
RECIPE = D.recipe  # current | delayed | delayed-calibrated | rowwise | block
ACCUMULATE = D.accumulate  # emulated-fp8 only: fp32 | fp64 | fast (a model of Hopper's ~14-bit fast accumulation)
PROMPTS = D().judged_prompts()  # chat prompts (template from the GGUF)
THRESHOLD = D.threshold  # the spec's cosine rule, in (0, 1]
FAULT = D.fault  # inject a catalogued fault into one side (fp8parity.faults.CATALOGUE)
REFERENCE_DEVICE = D.reference_device  # auto (the GPU on a GPU host) | cpu | cuda: where reference and fp64 oracle run
RUN_DIR = INTERACTIVE_RUN_DIR  # where verdicts, traces and figures go
PATHS = list(D.paths)  # prefill and/or decode
CANDIDATE_TRACE = D.candidate_trace  # judge this trace folder (.npy per tap, or ours) instead of running a candidate
ARCHIVE = D.archive  # reviewer | full (full also keeps the reference's traces, which are recomputable)
DRILL_LAYER = None  # the drill-down's layer (-1 for embedding, final_norm, logits); None: where the verdict points
DRILL_OP = None  # the drill-down's op (fp8parity.taps.ALL_OPS); None: where the verdict points
DRILL_POSITION = None  # the drill-down's position; None: where the verdict points
DRILL_PATH = None  # prefill | decode; None: where the verdict points

# %%
from IPython.display import Markdown, display

from fp8parity import plots, stages
from fp8parity.workbench import Workbench

cfg = D(model=MODEL, backend=BACKEND, recipe=RECIPE, accumulate=ACCUMULATE, prompts=tuple(PROMPTS),
        max_prompts=len(PROMPTS), threshold=THRESHOLD, fault=FAULT, reference_device=REFERENCE_DEVICE)
wb = Workbench(cfg, RUN_DIR)
display(Markdown(wb.provenance_markdown()))

# %% [markdown]
# ## The noise floors
# Each op class's floor: the largest error measured between two correct implementations (`fp8parity.replay.FLOORS`,
# with where each number was measured).

# %%
import pandas as pd

from fp8parity import replay

pd.DataFrame({k: {"floor (rel. L2)": f.rel_l2, "source": f.source} for k, f in replay.FLOORS.items()}).T

# %% [markdown]
# ## Measure
# Both sides traced, the candidate replayed op by op by its twin; or, with `CANDIDATE_TRACE`, another engine's dump
# replayed without running any candidate.

# %%
if CANDIDATE_TRACE:
    result = stages.measure_b_trace(wb, CANDIDATE_TRACE)
else:
    result = stages.measure_b(wb, paths=PATHS, reference_traces=ARCHIVE == "full")
top = result.local.sort_values("times_floor", ascending=False)
if not CANDIDATE_TRACE:
    display(Markdown("Where the measurement's time went (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items())))
display(Markdown(f"Replayed against the twin **{result.twin.label()}**: {len(result.local)} (prompt, path, layer, op) "
                 f"entries; the op nearest its floor is {top.op.iloc[0]} of layer {top.layer.iloc[0]} at "
                 f"{top.times_floor.iloc[0]:.2f}× its floor."))
top.head(10)

# %% [markdown]
# ## The rule
# An op diverges when its local error is more than `factor` times its class's floor; the first such op in forward
# order, over all prompts and paths, is the verdict. Change the factor (or the spec threshold) here and re-run.

# %%
rule = stages.ParityRule(factor=replay.ALARM_FACTOR, threshold=THRESHOLD)
verdict = (stages.judge_b_trace if CANDIDATE_TRACE else stages.judge_b)(result, rule)
display(Markdown(verdict.markdown()))

# %% [markdown]
# ## Local error per layer
# Each op's local error as a multiple of its floor, left of the alarm line is rounding. A bug shows as one point far
# above the line at its layer; the ops after it stay low, because each is replayed on the candidate's own — already
# damaged — inputs.

# %%
for (prompt, path), t in result.local.groupby(["prompt", "path"]):
    fig = plots.local_error_per_layer(t, rule.factor, f"local error vs twin — prompt {prompt}, {path} path")
    display(plots.save(fig, wb.run_dir / f"stage_b_local_prompt{prompt}_{path}.png"))

# %% [markdown]
# ## Drift against the reference
# Relative L2 and norm ratio along the residual stream, and 1 − cosine per (layer, op) with the spec's line. Correct
# FP8 drifts; drift alone names no culprit.

# %%
if not CANDIDATE_TRACE:
    display(plots.save(plots.drift_per_layer(result.table), wb.run_dir / "stage_b_drift.png"))
    for (prompt, path), t in result.table.groupby(["prompt", "path"]):
        fig = plots.cosine_per_layer(t, THRESHOLD, f"cosine vs reference — prompt {prompt}, {path} path")
        display(plots.save(fig, wb.run_dir / f"stage_b_prompt{prompt}_{path}.png"))
    display(Markdown(f"End to end, the candidate's prefill logits are {verdict.drift['candidate']:.3g} (rel. L2) from "
                     f"the reference; its twin's {verdict.drift['twin']:.3g} ({verdict.drift['ratio']:.2f}×)."))

# %% [markdown]
# ## Recipe fingerprint
# Which twin explains the candidate's GEMMs best: the first question about an unknown engine.

# %%
display(Markdown(verdict.fingerprint_text))
result.fingerprint.drop(columns="spec", errors="ignore")

# %% [markdown]
# ## Drill down
# One op at one position, both sides: the values, the error per dimension, the dimensions that differ most. By
# default where the verdict points: the first op beyond its floor; else where the cosine to the reference first
# drops below the spec's threshold; else the op nearest its floor. Set `DRILL_*` to look elsewhere.

# %%
from fp8parity.drill import drill_down

if CANDIDATE_TRACE:
    print("the drill-down reruns both sides; a foreign trace has no candidate here to rerun")
else:
    at = verdict.first_beyond_floor or verdict.spec_rule["first_divergence"] or verdict.worst
    dd = drill_down(wb, layer=at["layer"] if DRILL_LAYER is None else DRILL_LAYER, op=DRILL_OP or at["op"],
                    position=at.get("position", at.get("min_position")) if DRILL_POSITION is None else DRILL_POSITION,
                    path=DRILL_PATH or at["path"], prompt=at["prompt"])
    plots.drill_down(dd)
    display(Markdown(dd.sentence()))
    display(dd.top_dims())

# %% [markdown]
# ## What if
# The same measurements judged with another factor: nothing is recomputed.

# %%
WHAT_IF_FACTOR = 2.0
what_if = (stages.judge_b_trace if CANDIDATE_TRACE else stages.judge_b)(
    result, stages.ParityRule(factor=WHAT_IF_FACTOR, threshold=THRESHOLD))
display(Markdown(f"At {WHAT_IF_FACTOR}× the floor: **{what_if.status.upper()}** — {what_if.summary}"))

# %% [markdown]
# Both sides against fp64 (which side is further from the truth?). One JSON per prompt and path lies under
# `stage_b/` of the run folder: `parity.json` (the spec's schema, cosine per (layer, op)) and `local.json`.

# %%
pd.Series(getattr(result, "oracle", {}), dtype=object)

# %%
stages.save_verdict(wb, verdict)
