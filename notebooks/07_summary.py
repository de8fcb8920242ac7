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
# # Summary — verdicts across the cascade
#
# One table of every stage's verdict in this run (pass / fail / unmeasured and the number behind it), the logits
# affine drift picture, the fault bench's signatures and detection limits, and links to each stage's report. It
# reads what the other notebooks wrote into `RUN_DIR`; it opens no model.

# %% tags=["parameters"]
# Parameters: papermill overrides them; in JupyterLab change them here.
from fp8parity.config import INTERACTIVE_RUN_DIR

RUN_DIR = INTERACTIVE_RUN_DIR  # the run folder to summarize

# %%
import json
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from fp8parity import plots
from fp8parity.runner import distribution_line, verdict_table

run = Path(RUN_DIR)
summary = verdict_table(run)
display(Markdown(f"**{(summary.status == 'pass').sum()} of {len(summary)}** stages pass, "
                 f"{(summary.status == 'fail').sum()} fail, {(summary.status == 'unmeasured').sum()} did not run."))
with pd.option_context("display.max_colwidth", None):
    display(summary.style.hide(axis="index"))

# %% [markdown]
# The affine drift of the last-position logits (from stage A): the investigation's symptom was GPU ≈ 0.96·CPU + 0.12.

# %%
from safetensors.numpy import load_file

logits_file, stage_a = run / "stage_a_logits.safetensors", run / "verdicts" / "stage_A.json"
if logits_file.is_file() and stage_a.is_file():
    lg, fit = load_file(logits_file), json.loads(stage_a.read_text())["numbers"]["affine"]  # the fit stage A made
    plots.affine_drift(lg["reference"], lg["candidate"], fit["slope"], fit["intercept"], fit["pearson_r"])
else:
    print("stage A did not run: no logits to plot")

# %% [markdown]
# Which faults produce an affine logits signature like the investigation's? From the newest `make faults` run beside
# this one: faults that scale or shift every logit sit near the red star with r close to 1; faults that scramble the
# computation (a stale activation cache, an off-by-one embedding) have r far below 1 and are no affine drift.

# %%
from fp8parity.fault_results import latest_localization

found = latest_localization(run.parent)
if found is None:
    print("no fault bench yet: run `make faults`")
else:
    folder, loc = found
    measured = loc[loc.slope.notna()]
    plots.affine_signatures(measured)
    display(measured[["fault", "candidate", "expected_stage", "new_alarms", "localized", "slope", "intercept",
                      "pearson_r"]])

# %% [markdown]
# Stage B's detection limit, from the newest `make faults` run beside this one: planted scale and offset errors at
# random (layer, GEMM) placements, the fraction localized to their exact (layer, op, path) per size.

# %%
from fp8parity.fault_results import detection_limits, latest_sweep

sweep = latest_sweep(run.parent)
if sweep is None:
    print("no detection sweep yet: run `make faults`")
else:
    plots.detection_curves(sweep)
    display(detection_limits(sweep))

# %% [markdown]
# Distribution parity over the corpus (notebook 09, which runs before this summary): mean KLD and same-top-p of the
# candidate, beside the fp64 oracle's floor.

# %%
display(Markdown(distribution_line(run)))

# %%
# every executed notebook's report (run-all renders them beside the notebooks, while this one runs)
links = " · ".join(f"[{p.stem}]({p.stem}.html)" for p in sorted(run.glob("[0-9][0-9]_*.ipynb")) if "summary" not in p.stem)
display(Markdown("Reports: " + (links or "(rendered by `make run-all`)")))
first = next(iter(sorted((run / "verdicts").glob("stage_*.json"))), None)
provenance = json.loads(first.read_text())["provenance"] if first else {}
(run / "summary.json").write_text(json.dumps({"verdicts": summary.to_dict("records"), "provenance": provenance},
                                             indent=2, default=str))
