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
# # Distribution parity over a corpus — KLD, top-token agreement, Δp
#
# **Question.** Over real text, how often does the candidate pick another token than the reference, and how far apart
# are the two next-token distributions? Stages A and F look at one prompt's last logits and one greedy answer; a user
# deciding whether an FP8 path is acceptable asks this instead, and compares the answer with llama.cpp's
# `llama-perplexity --kl-divergence`.
#
# **Measurement.** The corpus (`CORPUS`, default: Python standard library sources, available offline everywhere) is
# cut into windows of 512 tokens; each is one prefill on both sides and only its second half is scored, as llama.cpp
# does. Per scored position: KL(reference ‖ candidate), whether the top token agrees, Δp (the change in the
# probability of the reference's top token) and each side's negative log-likelihood. **The floor:** the same
# statistics for the fp64 oracle against the reference, over the first window. No pass rule: this notebook measures
# how far the candidate is, not whether an op is wrong (stage B does that).

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
CORPUS = D.corpus  # a UTF-8 text file; empty: Python standard library sources (offline everywhere)
CORPUS_TOKENS = D.corpus_tokens  # corpus tokens judged (whole windows of 512)

# %%
from IPython.display import Markdown, display

from fp8parity import plots
from fp8parity.workbench import Workbench

cfg = D(model=MODEL, backend=BACKEND, recipe=RECIPE, accumulate=ACCUMULATE, prompts=tuple(PROMPTS),
        max_prompts=len(PROMPTS), threshold=THRESHOLD, fault=FAULT, reference_device=REFERENCE_DEVICE)
wb = Workbench(cfg, RUN_DIR)
display(Markdown(wb.provenance_markdown()))

# %%
import pandas as pd

from fp8parity import distribution

result = distribution.distribution_parity(wb.reference, wb.candidate, wb.oracle, wb.tok, CORPUS, CORPUS_TOKENS)
c = result.candidate
display(Markdown(f"corpus: {result.corpus}; **{result.tokens} tokens**, sha256 `{result.tokens_sha256[:16]}…`: mean KLD "
                 f"**{c['mean_kld']:.3g}** nats, same top token at {c['same_top_p']:.2%} of scored positions."))
result.table()

# %% [markdown]
# KLD per position on a log scale, Δp against the reference's confidence (a candidate that is merely less sure sits
# below zero at high confidence), and KLD along the corpus.

# %%
fig = plots.distribution(result.stats, "candidate vs reference")
display(plots.save(fig, wb.run_dir / "distribution.png"))

# %% [markdown]
# Where the candidate disagrees most: the positions with the largest KLD, with the text around them (the scored token
# in [[brackets]]).

# %%
ids = distribution.corpus_ids(wb.tok, distribution.load_corpus(CORPUS)[0], CORPUS_TOKENS)
top = pd.DataFrame(vars(result.stats)).nlargest(10, "kld")
top["text"] = [distribution.context_text(wb.tok, ids, p) for p in top.position]
top[["position", "kld", "same_top", "delta_p", "p_ref_top", "text"]]

# %% [markdown]
# The sharper companion of stages A and F: where along the corpus does the candidate's greedy choice first differ
# from the reference's?

# %%
first = result.first_greedy_difference
display(Markdown("no greedy difference anywhere on the corpus" if first is None else
                 f"first greedy difference at corpus position **{first}**: "
                 f"`{distribution.context_text(wb.tok, ids, first)}`"))
wb.save_json("distribution.json", result.to_dict() | {"provenance": wb.provenance()})
