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
# # llama.cpp as the candidate — the cascade asked of a real engine
#
# **Question.** The investigation's engine disagreed with its CPU path on a Q4_K_M Qwen2 model. Here the candidate is
# llama.cpp itself (llama-cpp-python, `make engines`), running the same GGUF: does it agree with the fp32 reference,
# and where it does not, is that its intended arithmetic or a bug?
#
# **How.** Every op's output is read through llama.cpp's graph-evaluation callback and stored under the workbook's
# (position, layer, op) keys (`fp8parity.engines.llamacpp`); stage B replays each op on llama.cpp's own inputs through
# llama.cpp's twin: its CPU GEMMs quantize the activations (Q8_K for K-quant weights, Q8_0 for Q5_0/Q8_0) before their
# integer dot products, and the twin rounds them the same way. Stages A, C and F are the same measurements and rules
# as for any candidate (the engine answers what a candidate model answers); D and E need operands fed in, which an
# engine does not offer.

# %% tags=["parameters"]
# Parameters: papermill overrides them; in JupyterLab change them here. Defaults: fp8parity.config.RunConfig (D).
from fp8parity.config import INTERACTIVE_RUN_DIR
from fp8parity.config import RunConfig as D

MODEL = D.model  # any qwen2 GGUF llama.cpp reads
PROMPTS = D().judged_prompts()  # chat prompts (template from the GGUF)
THRESHOLD = D.threshold  # the spec's cosine rule, in (0, 1]
PATHS = list(D.paths)  # prefill and/or decode
MAX_NEW_TOKENS = D.max_new_tokens  # stage F generation length
RUN_DIR = INTERACTIVE_RUN_DIR  # where verdicts, traces and figures go
RUNS = 5  # stage A's repeated runs, stage F's generations per prompt
LLAMA_DEVICE = D.llama_device  # cpu, or cuda: every layer offloaded (a CUDA build of llama-cpp-python)

# %%
from IPython.display import Markdown, display

from fp8parity import stages
from fp8parity.engines import cascade
from fp8parity.engines.llamacpp import LlamaCppEngine
from fp8parity.workbench import Workbench

wb = Workbench(D(model=MODEL, backend="reference", prompts=tuple(PROMPTS), max_prompts=len(PROMPTS),
                 threshold=THRESHOLD), RUN_DIR)
engine = LlamaCppEngine(MODEL, device=LLAMA_DEVICE)
wb.use_engine(engine)  # the stages call llama.cpp where they call the candidate model; the reports name it
display(Markdown(wb.provenance_markdown()))

# %% [markdown]
# ## Stage A — deterministic, and how far from the reference?

# %%
result_a = stages.measure_a(wb, runs=RUNS)
verdict_a = stages.judge_a(result_a, stages.ReproducerRule(threshold=THRESHOLD))
display(Markdown(verdict_a.markdown()))

# %% [markdown]
# ## Stage B — every op replayed against llama.cpp's own twin
# One trace per prompt and path (batched prefill; decode one token a step through the KV cache).

# %%
results_b = cascade.measure_b(engine, wb, PATHS)
rule_b = stages.ParityRule(threshold=THRESHOLD)
verdict_b = cascade.judge_b(results_b, rule_b)
display(Markdown(verdict_b.markdown()))
display(Markdown(verdict_b.fingerprint_text))

# %%
import pandas as pd

local = pd.concat([r.local.assign(path=r.path, trace=r.trace) for r in results_b])
local.sort_values("times_floor", ascending=False).head(10)[["path", "layer", "op", "position", "rel_l2", "times_floor"]]

# %% [markdown]
# ## Stage C — the embedding rows

# %%
verdict_c = stages.judge_c(stages.measure_c(wb), stages.EmbeddingRule())
display(Markdown(verdict_c.markdown()))

# %% [markdown]
# ## Stage F — golden output, with the GGUF's stop tokens
# A run may leave the golden output only at a near-tie (llama.cpp's CUDA build did, at a reference margin of 0.021
# logits); the table says where each run diverged, the reference's margin there and the candidate's logit noise.

# %%
result_f = stages.measure_f(wb, runs=RUNS, max_new_tokens=MAX_NEW_TOKENS)
verdict_f = stages.judge_f(result_f, stages.GoldenRule())
display(Markdown(verdict_f.markdown()))
result_f.runs[["prompt", "run", "output", "stop_reason", "matches_golden", "diverged_at", "ref_margin", "logit_noise",
              "twin_noise", "top_two_swapped"]]

# %%
for verdict in (verdict_a, verdict_b, verdict_c, cascade.unmeasured("D"), cascade.unmeasured("E"), verdict_f):
    stages.save_verdict(wb, verdict)
engine.close()
