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
# # Stage A — a deterministic reproducer
#
# **Hypothesis.** The candidate (FP8) forward disagrees with the CPU reference *deterministically*: the same input
# gives bit-identical logits on every run. If it does not, nothing downstream can be bisected (the investigation's
# `git bisect` was invalid for exactly this reason).
#
# **Falsifier.** Run the candidate `RUNS` times on the same prompt and hash the last-position logits (FNV-1a-64 over
# the little-endian f32 bytes, as the investigation did). **Pass:** all hashes equal. Then compare with the
# reference: argmax, cosine, and the least-squares fit *candidate = a·reference + b* over the whole vocabulary — the
# investigation's fit was GPU ≈ 0.96·CPU + 0.12. The reproducer exits 0 when argmax agrees and cosine ≥ threshold.

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
RUNS = 5  # candidate runs hashed

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
# Five forwards of the candidate and one of the reference, on the first prompt.

# %%
result = stages.measure_a(wb, runs=RUNS)
display(Markdown(f"{len(result.hashes)} runs gave **{len(set(result.hashes))} distinct hash(es)** "
                 f"({', '.join(sorted(set(result.hashes)))}); argmax candidate {result.candidate_argmax}, reference "
                 f"{result.reference_argmax}; cosine {result.cosine:.6f}; fit {result.fit}."))

# %% [markdown]
# ## The rule
# Pass when every run is bit-identical. The threshold decides only the reproducer's exit code (agree / disagree).

# %%
rule = stages.ReproducerRule(threshold=THRESHOLD)
verdict = stages.judge_a(result, rule)
display(Markdown(verdict.markdown()))

# %% [markdown]
# ## The affine drift of the logits
# If the candidate were a scaled and shifted copy of the reference, the points would lie on the red line; the
# residuals show which vocabulary ids break the pattern.

# %%
from safetensors.torch import save_file

fig = plots.affine_drift(result.reference.numpy(), result.candidate.numpy(), result.fit.slope, result.fit.intercept,
                         result.fit.pearson_r)
display(plots.save(fig, wb.run_dir / "affine_drift.png"))
# safetensors, not torch.save: the summary reads the logits with numpy alone
save_file({"reference": result.reference.contiguous(), "candidate": result.candidate.contiguous()},
          wb.run_dir / "stage_a_logits.safetensors")
display(Markdown(f"Slope **{result.fit.slope:.4f}**, intercept **{result.fit.intercept:+.4f}**, r = "
                 f"{result.fit.pearson_r:.6f}; the largest residuals are at ids "
                 f"{[i for i, _ in result.fit.top_residuals[:8]]}."))

# %% [markdown]
# ## Drill down
# The logits at the last position on both sides: their values, the error per vocabulary id, and the ids that differ
# most. Change the op, layer or position to look anywhere in the forward.

# %%
from fp8parity.drill import drill_down

dd = drill_down(wb, layer=-1, op="logits", position=len(wb.prompt_ids()) - 1)
plots.drill_down(dd)
display(Markdown(dd.sentence()))
dd.top_dims()

# %% [markdown]
# ## What if
# The same measurement judged with a stricter agreement threshold: nothing is recomputed.

# %%
stages.judge_a(result, stages.ReproducerRule(threshold=0.9999)).summary

# %%
stages.save_verdict(wb, verdict)
