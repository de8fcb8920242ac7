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
# # Real weights, GEMM by GEMM — the capsule replay
#
# **Why.** A 7B GGUF (or even the 491 MB default model) does not always travel to where the GPU is. A *capsule* holds
# the raw GGUF blocks of a few layers plus the GEMM inputs the CPU reference computed there (about 11 MB a layer for
# the 0.5B); replayed on any backend it gives stage B/E evidence on **real weights**, layer by layer.
#
# **Falsifier.** Every GEMM of the capsule's layers (q, k, v, attn_out, gate, up, down) through the candidate backend
# on the reference's own inputs, compared with fp64 of the same operands. **Pass:** cosine ≥ threshold everywhere (no
# verdict file: this notebook is evidence for stages B and E). Set `CAPSULE` to a capsule built elsewhere
# (`benchmarks/capsule_replay.py build`), or leave it empty to build one from `MODEL` (first and last layer).

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
CAPSULE = D.capsule  # a capsule file; empty: build one from MODEL

# %%
from IPython.display import Markdown, display

from fp8parity import plots
from fp8parity.workbench import Workbench

cfg = D(model=MODEL, backend=BACKEND, recipe=RECIPE, accumulate=ACCUMULATE, prompts=tuple(PROMPTS),
        max_prompts=len(PROMPTS), threshold=THRESHOLD, fault=FAULT, reference_device=REFERENCE_DEVICE)
wb = Workbench(cfg, RUN_DIR)
display(Markdown(wb.provenance_markdown()))

# %%
from pathlib import Path

from fp8parity.backends import make_backend
from fp8parity.capsule import build_capsule, replay

path = Path(CAPSULE) if CAPSULE else build_capsule(wb.gguf, wb.prompt_ids(), [0, -1], wb.run_dir / "capsule.safetensors")
table = replay(path, {"reference": make_backend("reference"), wb.backend.name: wb.backend})
worst = table[table.backend != "reference"].cosine_vs_fp64.min()
display(Markdown(f"worst candidate GEMM cosine vs fp64: **{worst:.6f}** "
                 f"({'≥' if worst >= THRESHOLD else '<'} threshold {THRESHOLD})"))
table.pivot_table(index=["layer", "gemm", "quant"], columns="backend", values="cosine_vs_fp64", sort=False)

# %%
fig = plots.bars(table[table.backend != "reference"].assign(name=lambda d: "L" + d.layer.astype(str) + " " + d.gemm),
                 "name", ["rel_l2_vs_fp64"], "capsule GEMMs on the candidate", "relative L2 error vs fp64")
display(plots.save(fig, wb.run_dir / "capsule_replay.png"))
