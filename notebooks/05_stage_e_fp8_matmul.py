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
# # Stage E — Q/K/V FP8 matmul parity
#
# **Hypothesis.** The FP8 GEMM itself is sound: its error is the rounding of its operands to E4M3, nothing more.
#
# **Falsifier.** The Q/K/V projections of every layer on *real activations* captured from the reference, and the
# investigation's shape (3584, batch, 3584) on Gaussian activations with one channel at 26× (like Qwen2.5's dim 408),
# batches 1–128. Each GEMM is compared with fp64, and with the **cast-to-representable control**: the same GEMM in
# fp64 on operands already rounded to E4M3 by the same recipe. The control's error is pure quantization error;
# whatever the candidate adds on top is accumulation. The spec's rule — within 1% on every output dim — is reported
# too; per-tensor E4M3 (unit roundoff 2⁻⁴) is not expected to meet it.

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
DRILL_LAYER = 0  # the drill-down's layer
DRILL_OP = "q_proj"  # q_proj | k_proj | v_proj
DRILL_POSITION = 0  # the drill-down's position

# %%
from IPython.display import Markdown, display

from fp8parity import plots, stages
from fp8parity.workbench import Workbench

cfg = D(model=MODEL, backend=BACKEND, recipe=RECIPE, accumulate=ACCUMULATE, prompts=tuple(PROMPTS),
        max_prompts=len(PROMPTS), threshold=THRESHOLD, fault=FAULT, reference_device=REFERENCE_DEVICE)
wb = Workbench(cfg, RUN_DIR)
display(Markdown(wb.provenance_markdown()))

# %% [markdown]
# ## Measure

# %%
result = stages.measure_e(wb)
m = result.model_rows
display(Markdown(f"{len(m)} GEMMs on model activations: cosine to fp64 at least **{m.cosine.min():.5f}**, relative "
                 f"error at most {m.rel_l2.max():.4f} (cast-to-representable control at most "
                 f"{m.control_rel_l2.max():.4f})."))
cols = ["source", "layer", "gemm", "batch", "shape", "cosine", "rel_l2", "control_rel_l2", "well_scaled_rel_l2",
        "candidate_vs_control_rel_l2", "sqnr_db", "max_rel_err_per_dim", "dims_over_1pct", "output_peak"]
result.gemms[cols]

# %% [markdown]
# ## The rule
# Finite, cosine ≥ threshold, and no worse than a well-scaled E4M3 GEMM of the same operands (`headroom` × its error
# plus `slack`, for accumulation).

# %%
rule = stages.MatmulRule(threshold=THRESHOLD, headroom=1.25, slack=1e-3)
verdict = stages.judge_e(result, rule)
display(Markdown(verdict.markdown()))

# %%
fig = plots.per_dim(result.per_dim, "relative error per output dim", limit=0.01,
                    title="first layer Q/K/V on model activations vs fp64")
display(plots.save(fig, wb.run_dir / "stage_e_per_dim.png"))

# %% [markdown]
# FP8 statistics of each GEMM's operands: amax, scale, and how much was flushed to zero, left subnormal (1–3
# significant bits) or saturated at ±448 — the numbers that explain a bad cosine.

# %%
import pandas as pd

pd.DataFrame([{"layer": r.layer, "gemm": r.gemm, "batch": r.batch,
               **{f"{side}.{k}": v for side in ("input", "weight") for k, v in (r.stats or {}).get(side, {}).items()}}
              for r in result.gemms.itertuples()])

# %%
g = result.gemms.nlargest(12, "rel_l2")  # the 12 worst GEMMs
g = g.assign(name="L" + g.layer.astype(str) + " " + g.gemm + " M=" + g.batch.astype(str))
fig = plots.bars(g, "name", ["rel_l2", "control_rel_l2", "well_scaled_rel_l2"],
                 "candidate error vs the cast-to-representable control and a well-scaled E4M3 GEMM",
                 "relative L2 error vs fp64")
display(plots.save(fig, wb.run_dir / "stage_e_control.png"))

# %% [markdown]
# ## Drill down
# One projection at one position inside the forward, both sides: its input (attn_norm) and output.

# %%
from fp8parity.drill import drill_down

dd = drill_down(wb, layer=DRILL_LAYER, op=DRILL_OP, position=DRILL_POSITION)
plots.drill_down(dd)
display(Markdown(dd.sentence()))
dd.top_dims()

# %% [markdown]
# ## What if
# The same GEMMs judged with a stricter cosine: nothing is recomputed.

# %%
stages.judge_e(result, stages.MatmulRule(threshold=0.9999)).summary

# %%
stages.save_verdict(wb, verdict)
