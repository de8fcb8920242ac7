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
# # Stage F — golden output
#
# **Hypothesis.** With the fix in place the candidate answers like the reference, every time.
#
# **Falsifier.** Each chat prompt generated greedily `RUNS` consecutive times on the candidate, with stop tokens read
# from the GGUF (its eos id, plus `<|im_end|>` / `<|endoftext|>` where the vocabulary has them — never a hard-coded
# id). Golden output = the reference's generation. **Pass:** every run equals the golden output, or leaves it only at a
# near-tie: where the reference's margin between its token and the candidate's is within 3 σ of what a *correct*
# implementation of the candidate's recipe (stage B's twin, `twin_noise`, measured at that very step) does to a
# margin, whatever the tokens' ranks. The candidate's own noise (`logit_noise`) is shown, not trusted: a broken
# candidate's would excuse its bug. The real cause of the investigation's gibberish was generation *without* stop
# tokens: the cell after the verdict shows what that does.

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
MAX_NEW_TOKENS = D.max_new_tokens  # generation length
RUNS = 5  # generations per prompt

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
result = stages.measure_f(wb, runs=RUNS, max_new_tokens=MAX_NEW_TOKENS)
display(Markdown(f"**{int(result.runs.matches_golden.sum())} of {len(result.runs)}** runs reproduce the golden output; "
                 f"stop tokens {result.stop_ids} ({'used' if result.stop_tokens_used else 'NOT used'})."))
result.runs[["prompt", "run", "output", "stop_reason", "matches_golden", "diverged_at", "ref_margin", "logit_noise",
              "twin_noise", "top_two_swapped"]]

# %% [markdown]
# ## The rule
# At least `min_fraction` of the runs equal the golden output (the spec: all of them), counting a run that leaves it
# at a near-tie (`tie_sigmas`; stopping early or running on past the golden end never is one).

# %%
rule = stages.GoldenRule(min_fraction=1.0, tie_sigmas=3.0)
verdict = stages.judge_f(result, rule)
display(Markdown(verdict.markdown()))

# %%
ns = result.without_stop_tokens
display(Markdown(f"**Without stop tokens** ({ns['tokens']} tokens, stop: {ns['stop_reason']}):\n\n```\n{ns['text']}\n```"))

# %% [markdown]
# ## Drill down
# The logits that chose the first generated token (last prompt position), both sides.

# %%
from fp8parity.drill import drill_down

dd = drill_down(wb, layer=-1, op="logits", position=len(wb.prompt_ids()) - 1)
plots.drill_down(dd)
display(Markdown(dd.sentence()))
dd.top_dims()

# %% [markdown]
# ## What if
# Judged with half the runs allowed to differ, and with no near-tie forgiven: nothing is regenerated.

# %%
half, strict = stages.GoldenRule(min_fraction=0.5), stages.GoldenRule(tie_sigmas=0)
stages.judge_f(result, half).summary, stages.judge_f(result, strict).summary

# %%
stages.save_verdict(wb, verdict)
