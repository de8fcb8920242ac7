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
# # Stage C — embedding lookup parity
#
# **Hypothesis.** The candidate reads the same embedding rows as the reference.
#
# **Falsifier.** A lookup does no arithmetic, so the rows must be **bit-exact**: token 791 (the investigation's probe)
# and every token of the prompt, first 16 values and the whole row. Any difference means the wrong row (an
# off-by-one, a wrong vocabulary offset) or a different dequantization of the Q4_K/Q5_0 embedding table.

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
DRILL_POSITION = 0  # the prompt position the drill-down looks at

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
result = stages.measure_c(wb)
exact = int(result.rows.row_bit_exact.sum())
display(Markdown(f"**{exact} of {len(result.rows)}** embedding rows are bit-exact; the probe's first values: reference "
                 f"`{[round(v, 5) for v in result.probe_first16_reference[:8]]}`, candidate "
                 f"`{[round(v, 5) for v in result.probe_first16_candidate[:8]]}`."))
result.rows

# %% [markdown]
# ## The rule
# Every row within `max_abs` of the reference (0: bit-exact, the spec's rule).

# %%
rule = stages.EmbeddingRule(max_abs=0.0)
verdict = stages.judge_c(result, rule)
display(Markdown(verdict.markdown()))

# %% [markdown]
# ## Drill down
# The embedding row of one prompt position on both sides (a lookup reads no activation).

# %%
from fp8parity.drill import drill_down

dd = drill_down(wb, layer=-1, op="embedding", position=DRILL_POSITION)
plots.drill_down(dd)
display(Markdown(dd.sentence()))
dd.top_dims()

# %% [markdown]
# ## What if
# The same rows judged with a tolerance, without recomputing: a dequantization that differs only in the last bits
# would pass here and fail above.

# %%
stages.judge_c(result, stages.EmbeddingRule(max_abs=1e-6)).summary

# %%
stages.save_verdict(wb, verdict)
