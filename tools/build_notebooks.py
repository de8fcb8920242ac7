"""Writes notebooks/NN_*.ipynb (output-free) from the cell texts below: edit here, run, commit both.

    python tools/build_notebooks.py
"""

from pathlib import Path

import nbformat as nbf

from fp8parity.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]

D = RunConfig()
PARAMS = f'''# Parameters: papermill overrides these; in JupyterLab edit them here. Defaults: fp8parity.config.RunConfig.
MODEL = "../data/models/{Path(D.model).name}"  # any qwen2 GGUF (the user's 7B on a GPU host)
BACKEND = {D.backend!r}  # reference | bf16 | te | torch-fp8 | emulated-fp8 | auto (te > torch-fp8 > emulated-fp8)
RECIPE = {D.recipe!r}  # current | delayed | delayed-calibrated | rowwise | block
ACCUMULATE = {D.accumulate!r}  # emulated-fp8 only: fp32 | fp64 | fast (a model of Hopper's ~14-bit fast accumulation)
PROMPTS = {list(D.judged_prompts())!r}  # chat prompts (template from the GGUF)
THRESHOLD = {D.threshold!r}  # the spec's cosine rule (stage A agreement, stage E, stage B's spec line)
RUN_DIR = "../runs/interactive"  # where verdicts, traces and figures go
FAULT = {D.fault!r}  # inject a catalogued fault into one side (see fp8parity.faults.CATALOGUE)
PATHS = {list(D.paths)!r}  # stage B judges these paths (production engines run batched prefill)
MAX_NEW_TOKENS = {D.max_new_tokens!r}  # stage F generation length
CAPSULE = ""  # notebook 08: a real-weight capsule to replay; empty: build one from MODEL
CANDIDATE_TRACE = ""  # notebook 02: judge this trace folder (.npy per tap, or ours) instead of running a candidate
ARCHIVE = {D.archive!r}  # reviewer | full (full also keeps the reference's traces, which are recomputable)
CORPUS = ""  # notebook 09: a UTF-8 text file; empty: Python standard library sources (offline everywhere)
CORPUS_TOKENS = {D.corpus_tokens!r}  # notebook 09: corpus tokens judged (whole windows of 512)'''

SETUP = '''import pandas as pd
from IPython.display import Markdown, display

from fp8parity import plots, stages
from fp8parity.workbench import Params, Workbench

wb = Workbench(Params(model=MODEL, backend=BACKEND, recipe=RECIPE, accumulate=ACCUMULATE, prompts=PROMPTS,
                      threshold=THRESHOLD, run_dir=RUN_DIR, fault=FAULT))
display(Markdown(wb.provenance_markdown()))'''

VERDICT = '''display(Markdown(verdict.markdown()))
stages.save_verdict(wb, verdict)'''


def md(text: str):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text: str, tags=()):
    c = nbf.v4.new_code_cell(text.strip())
    if tags:
        c.metadata["tags"] = list(tags)
    return c


def notebook(title: str, intro: str, cells: list) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [md(f"# {title}\n\n{intro}"), code(PARAMS, ["parameters"]), code(SETUP)] + cells
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating leaves unchanged notebooks unchanged
    return nb


NOTEBOOKS = {
"01_stage_a_reproducer": notebook(
    "Stage A — a deterministic reproducer",
    """**Hypothesis.** The candidate (FP8) forward disagrees with the CPU reference *deterministically*: the same
input gives bit-identical logits on every run. If it does not, nothing downstream can be bisected (the
investigation's `git bisect` was invalid for exactly this reason).

**Falsifier.** Run the candidate 5 times on the same prompt and hash the last-position logits (FNV-1a-64 over
the little-endian f32 bytes, as the investigation did). **Pass:** all 5 hashes equal. Then compare with the
reference: argmax, cosine, Pearson r, and the ordinary least-squares fit *candidate = a·reference + b* over the
whole vocabulary — the investigation's fit was GPU ≈ 0.96·CPU + 0.12. The reproducer's exit code is 0 when
argmax agrees and cosine ≥ threshold, else 1.""",
    [code("verdict, logits = stages.stage_a(wb, runs=5)\nverdict.numbers['candidate_hashes']"),
     md("The affine drift of the logits: if the candidate were a scaled and shifted copy of the reference, the "
        "points would lie on the red line; the residuals show which vocabulary ids break the pattern."),
     code("fit = verdict.numbers['affine']\nfig = plots.affine_drift(logits['reference'].numpy(), "
          "logits['candidate'].numpy(), fit['slope'], fit['intercept'], fit['pearson_r'])\n"
          "fig.savefig(wb.run_dir / 'affine_drift.png', dpi=110)\n"
          "import torch\ntorch.save(logits, wb.run_dir / 'stage_a_logits.pt')"),
     code("display(Markdown(f\"argmax reference **{verdict.numbers['reference_argmax']}**, candidate "
          "**{verdict.numbers['candidate_argmax']}**; cosine **{verdict.numbers['cosine']:.6f}**; "
          "fit **{fit['slope']:.4f}·ref {fit['intercept']:+.4f}** (r = {fit['pearson_r']:.6f}); top residual ids: "
          "{[i for i, _ in fit['top_residuals'][:8]]}\"))"),
     code(VERDICT)]),

"02_stage_b_per_layer": notebook(
    "Stage B — per-layer, per-op parity",
    """**Hypothesis.** If the candidate is wrong, one op of one layer computes something other than what a correct
implementation of the candidate's own recipe computes; everything after it only carries the damage along.

**Falsifier (the local check).** Record every tap on both sides, at every position of every prompt, on **both**
paths a real engine takes (batched prefill and serial decode with a KV cache). Then recompute every op of the
candidate — embedding, norms, q/k/v, RoPE, attention (on the candidate's own K/V), attn_out, residual adds, gate/up,
SwiGLU, ffn_out, final_norm, lm_head — from the candidate's **own traced inputs**, through a **twin**: a faithful
CPU implementation of the candidate's declared recipe (E4M3 at the same scaling granularity and batching, bf16
rounding, or fp32). The local error (relative L2, candidate vs twin) of a correct op is rounding only; it is judged
against the **noise floor** of its op class, measured between two correct implementations
(`fp8parity.replay.FLOORS`, each with its source). **Pass rule:** no op, on any prompt or path, exceeds
`FLOOR_FACTOR` × its floor. The first op in forward order that does is the verdict.

**The global view stays:** cosine, relative L2 and norm ratio against the reference per (layer, op); both sides
against fp64 (a wrong *reference* is named as the outlier, #3032); the spec's fixed 0.99 cosine rule on a line of
its own; and the candidate's end-to-end drift beside its twin's. A tap present on one side only is **UNMEASURED**.""",
    [md("The pass rule, as a cell you can change: the factor over each op class's measured noise floor."),
     code("from fp8parity import replay\n\nFLOOR_FACTOR = replay.ALARM_FACTOR  # an op diverges beyond this "
          "many times its class's floor\npd.DataFrame({k: {'floor (rel. L2)': f.rel_l2, 'source': f.source} "
          "for k, f in replay.FLOORS.items()}).T"),
     code("if CANDIDATE_TRACE:  # another engine's dump (or one of ours): judged without running a candidate\n"
          "    verdict, local, fingerprint = stages.stage_b_from_trace(wb, CANDIDATE_TRACE, factor=FLOOR_FACTOR)\n"
          "    table = None\nelse:\n"
          "    verdict, table, local, reports = stages.stage_b(wb, paths=PATHS, factor=FLOOR_FACTOR,\n"
          "                                                    reference_traces=ARCHIVE == 'full')\n"
          "    fingerprint = pd.DataFrame(verdict.numbers['fingerprint'])\n"
          "local.sort_values('times_floor', ascending=False).head(10)"),
     md("**Local error per layer** (left of the alarm line is rounding): each op's local error as a multiple of its "
        "floor. A bug shows as one point far above the line at its layer; the ops after it stay low, because each is "
        "replayed on the candidate's own — already damaged — inputs."),
     code("for (prompt, path), t in local.groupby(['prompt', 'path']):\n"
          "    fig = plots.local_error_per_layer(t, FLOOR_FACTOR, f'local error vs twin — prompt {prompt}, {path} path')\n"
          "    fig.savefig(wb.run_dir / f'stage_b_local_prompt{prompt}_{path}.png', dpi=110)"),
     md("**Drift against the reference** (the global view): relative L2 and norm ratio along the residual stream, and "
        "1 − cosine per (layer, op) with the spec's 0.99 line. Correct FP8 drifts; drift alone names no culprit."),
     code("if table is not None:\n    plots.drift_per_layer(table).savefig(wb.run_dir / 'stage_b_drift.png', dpi=110)\n"
          "    for (prompt, path), t in table.groupby(['prompt', 'path']):\n"
          "        fig = plots.cosine_per_layer(t, THRESHOLD, f'cosine vs reference — prompt {prompt}, {path} path')\n"
          "        fig.savefig(wb.run_dir / f'stage_b_prompt{prompt}_{path}.png', dpi=110)"),
     md("**Recipe fingerprint:** which twin explains the candidate's GEMMs best — the first question about an "
        "unknown engine."),
     code("display(Markdown(verdict.numbers['fingerprint_text']))\nfingerprint.drop(columns='spec', errors='ignore')"),
     md("**What-if:** re-judge the same measurements with another factor, without recomputing anything."),
     code("WHAT_IF_FACTOR = 2.0  # try another factor\nbeyond = local[local.times_floor > WHAT_IF_FACTOR]\n"
          "print(f'{len(beyond)} (layer, op) entries beyond {WHAT_IF_FACTOR}x their floor')\n"
          "beyond[['prompt', 'path', 'layer', 'op', 'position', 'rel_l2', 'times_floor', 'norm_ratio']].head(10)"),
     md("The judgment against fp64 (which side is further from the truth?) and the end-to-end drift of candidate and "
        "twin."),
     code("pd.Series(verdict.numbers.get('oracle', {})), verdict.numbers.get('drift')"),
     md("One JSON per prompt and path lies under `stage_b/` of the run folder: `parity.json` (the spec's schema, "
        "cosine per (layer, op)) and `local.json` (local error, floor, multiple of the floor)."),
     code(VERDICT)]),

"03_stage_c_embedding": notebook(
    "Stage C — embedding lookup parity",
    """**Hypothesis.** The candidate reads the same embedding rows as the reference.

**Falsifier.** A lookup does no arithmetic, so the rows must be **bit-exact**: token 791 (the investigation's
probe) and every token of the prompt, first 16 values and the whole row. Any difference means the wrong row
(an off-by-one, a wrong vocabulary offset) or a different dequantization of the Q4_K/Q5_0 embedding table.""",
    [code("verdict, rows = stages.stage_c(wb)\nrows"),
     code("display(Markdown('probe token first 16 values — reference: `' + str([round(v, 5) for v in "
          "verdict.numbers['probe_first16_ref']]) + '`'))"),
     code(VERDICT)]),

"04_stage_d_rmsnorm": notebook(
    "Stage D — pre-attention RMSNorm parity",
    """**Hypothesis.** The candidate's RMSNorm matches the reference to the last bit or so.

**Falsifier.** Feed every layer's `attn_norm` on the candidate the *reference's own* input (so upstream drift cannot
leak in) and count fp32 ULPs between outputs on every dim. **Pass:** within 1 ULP everywhere. A known bug class
is eps 1e-5 instead of the file's 1e-6 — measured below on the same inputs.""",
    [code("verdict, per_layer, ulps = stages.stage_d(wb)\nper_layer"),
     code("import numpy as np\nfig = plots.per_dim({'candidate vs reference (max over positions)': "
          "ulps['layer0_ulp'].max(0) + 1, 'eps 1e-5 vs file eps': ulps['eps_ulp'].max(0) + 1}, "
          "'ULP distance + 1', limit=2, title='layer-0 attn_norm: fp32 ULPs per dim')\n"
          "fig.savefig(wb.run_dir / 'stage_d_ulp.png', dpi=110)"),
     code("e = verdict.numbers['eps_1e-5_effect']\ndisplay(Markdown(f\"eps 1e-5 instead of {e['file_eps']:.0e}: up to "
          "**{e['max_ulp']:,} ULP** (median {e['median_ulp']:.0f}), max abs {e['max_abs']:.2e}, cosine "
          "{e['cosine']:.9f}. It matters most where the input RMS is small (smallest row RMS here: "
          "{e['x_rms_min']:.3g}) — eps is added to the mean square.\"))"),
     code(VERDICT)]),

"05_stage_e_fp8_matmul": notebook(
    "Stage E — Q/K/V FP8 matmul parity",
    """**Hypothesis.** The FP8 GEMM itself is sound: its error is the rounding of its operands to E4M3, nothing more.

**Falsifier.** The Q/K/V projections of every layer on *real activations* captured from the reference (the model's own
shapes), and the investigation's shape (3584, batch, 3584) on Gaussian activations with one channel at 26× (like
Qwen2.5's dim 408), batches 1–128. Each GEMM is compared with fp64, and with the **cast-to-representable
control**: the same GEMM in fp64 on operands already rounded to E4M3 by the same recipe. The control's error is
pure quantization error; whatever the candidate adds on top is accumulation/GEMM error. The spec's rule —
within 1% relative error on every output dim — is reported as well; per-tensor E4M3 (unit roundoff 2⁻⁴) is not
expected to meet it. **Pass (this workbook):** finite outputs, cosine ≥ threshold, and no error beyond the control.""",
    [code("verdict, gemms, per_dim = stages.stage_e(wb)\ncols = ['source', 'layer', 'gemm', 'batch', 'shape', 'cosine', 'rel_l2', "
          "'control_rel_l2', 'candidate_vs_control_rel_l2', 'sqnr_db', 'max_rel_err_per_dim', 'dims_over_1pct', "
          "'output_peak']\ngemms[cols]"),
     code("fig = plots.per_dim(per_dim, "
          "'relative error per output dim', limit=0.01, title='first layer Q/K/V on model activations vs fp64')\n"
          "fig.savefig(wb.run_dir / 'stage_e_per_dim.png', dpi=110)"),
     md("FP8 statistics of each GEMM's operands: amax, scale, and how much was flushed to zero, left subnormal "
        "(1–3 significant bits) or saturated at ±448 — the numbers that explain a bad cosine."),
     code("import pandas as pd\nstats = pd.DataFrame([{'layer': r.layer, 'gemm': r.gemm, 'batch': r.batch, **{f'{side}.{k}': v for side "
          "in ('input', 'weight') for k, v in (r.stats or {}).get(side, {}).items()}} for r in gemms.itertuples()])\n"
          "stats"),
     code("g = gemms.nlargest(12, 'rel_l2')  # the 12 worst GEMMs\n"
          "g = g.assign(name='L' + g.layer.astype(str) + ' ' + g.gemm + ' M=' + g.batch.astype(str))\n"
          "fig = plots.bars(g, 'name', ['rel_l2', 'control_rel_l2', 'well_scaled_rel_l2'], 'candidate error vs the "
          "cast-to-representable control and a well-scaled E4M3 GEMM', 'relative L2 error vs fp64')\nfig.savefig(wb.run_dir / 'stage_e_control.png', dpi=110)"),
     code(VERDICT)]),

"06_stage_f_golden": notebook(
    "Stage F — golden output",
    """**Hypothesis.** With the fix in place the candidate answers like the reference, every time.

**Falsifier.** Each chat prompt generated greedily 5 consecutive times on the candidate, with stop tokens read
from the GGUF (its eos id, plus `<|im_end|>` / `<|endoftext|>` where the vocabulary has them — never a hard-coded
id, #3870). Golden output = the reference's generation. **Pass:** every run equals the golden output. The real
cause of the investigation's gibberish was generation *without* stop tokens (PR #1890): the last cell shows what
that does.""",
    [code("verdict, runs, _ = stages.stage_f(wb, runs=5, max_new_tokens=MAX_NEW_TOKENS)\n"
          "runs[['prompt', 'run', 'output', 'stop_reason', "
          "'matches_golden']]"),
     code("ns = verdict.numbers['without_stop_tokens']\ndisplay(Markdown(f\"**Without stop tokens** "
          "({ns['tokens']} tokens, stop: {ns['stop_reason']}):\\n\\n```\\n{ns['text']}\\n```\"))"),
     code(VERDICT)]),

"07_summary": notebook(
    "Summary — verdicts across the cascade",
    """One table of every stage's verdict in this run (pass / fail / unmeasured and the number behind it), the
logits affine drift picture, and links to each stage's report.""",
    [code("from pathlib import Path\n\nimport pandas as pd\n\nfrom fp8parity.runner import verdict_table\n\n"
          "summary = verdict_table(Path(RUN_DIR))\nwith pd.option_context('display.max_colwidth', None):\n"
          "    display(summary.style.hide(axis='index'))"),
     md("The affine drift of the last-position logits (from stage A): the investigation's symptom was "
        "GPU ≈ 0.96·CPU + 0.12."),
     code("import torch\n\nlogits_file = Path(RUN_DIR) / 'stage_a_logits.pt'\nif logits_file.is_file():\n"
          "    lg = torch.load(logits_file)\n    from fp8parity.metrics import affine_fit\n"
          "    fit = affine_fit(lg['candidate'], lg['reference'])\n"
          "    plots.affine_drift(lg['reference'].numpy(), lg['candidate'].numpy(), fit.slope, fit.intercept, "
          "fit.pearson_r)\nelse:\n    print('stage A did not run: no logits to plot')"),
     md("Which faults produce an affine logits signature like the investigation's GPU ≈ 0.96·CPU + 0.12? From the "
        "newest `make faults` run beside this one: faults that scale or shift every logit (per-tensor FP8 rounding, "
        "fp16 storage, flushed subnormals) sit near the red star with r close to 1; faults that scramble the "
        "computation (a stale activation cache, an off-by-one embedding) have r far below 1 and are no affine drift."),
     code("from fp8parity.fault_bench import latest_localization\n\nfound = latest_localization(Path(RUN_DIR).parent)\n"
          "if found is None:\n    print('no fault bench yet: run `make faults`')\nelse:\n"
          "    folder, loc = found\n    measured = loc[loc.slope.notna()]\n    plots.affine_signatures(measured)\n"
          "    display(measured[['fault', 'candidate', 'expected_stage', 'new_alarms', 'localized', 'slope', "
          "'intercept', 'pearson_r']])"),
     md("Stage B's detection limit, from the newest `make faults` run beside this one: planted scale and offset "
        "errors at random (layer, GEMM) placements, the fraction localized to their exact (layer, op, path) per size."),
     code("from fp8parity.fault_bench import latest_sweep\n\nsweep = latest_sweep(Path(RUN_DIR).parent)\n"
          "if sweep is None:\n    print('no detection sweep yet: run `make faults`')\nelse:\n"
          "    from fp8parity.detection import detection_limits\n\n    plots.detection_curves(sweep)\n"
          "    display(detection_limits(sweep))"),
     md("Distribution parity over the corpus (notebook 09, which runs before this summary): mean KLD and "
        "same-top-p of the candidate, beside the fp64 oracle's floor."),
     code("from fp8parity.runner import distribution_line\n\ndisplay(Markdown(distribution_line(Path(RUN_DIR))))"),
     code("links = ' · '.join(f'[{p.stem}]({p.name})' for p in sorted(Path(RUN_DIR).glob('0*.html')))\n"
          "display(Markdown('Reports: ' + (links or '(rendered by `make run-all`)')))\n"
          "wb.save_json('summary.json', {'verdicts': summary.to_dict('records'), 'provenance': wb.provenance()})"),
     ]),

"08_capsule_replay": notebook(
    "Real weights, GEMM by GEMM — the capsule replay",
    """**Why.** A 7B GGUF (or even the 491 MB default model) does not always travel to where the GPU is. A *capsule*
holds the raw GGUF blocks of a few layers plus the GEMM inputs the CPU reference computed there (about 11 MB a
layer for the 0.5B); replayed on any backend it gives stage B/E evidence on **real weights**, layer by layer.

**Falsifier.** Every GEMM of the capsule's layers (q, k, v, attn_out, gate, up, down) through the candidate
backend on the reference's own inputs, compared with fp64 of the same operands. **Pass:** cosine ≥ threshold
everywhere (no verdict file: this notebook is evidence for stages B and E).
Set `CAPSULE` to a capsule built elsewhere (`benchmarks/capsule_replay.py build`), or leave it empty to build one
from `MODEL` (first and last layer).""",
    [code("from pathlib import Path\n\nfrom fp8parity.backends import make_backend\nfrom fp8parity.capsule import "
          "build_capsule, replay\n\n"
          "path = Path(CAPSULE) if CAPSULE else build_capsule(wb.gguf, wb.prompt_ids(), [0, -1], "
          "wb.run_dir / 'capsule.safetensors')\n"
          "table = replay(path, {'reference': make_backend('reference'), wb.backend.name: wb.backend})\ntable"),
     code("import pandas as pd\n\npivot = table.pivot_table(index=['layer', 'gemm', 'quant'], columns='backend', "
          "values='cosine_vs_fp64', sort=False)\nworst = table[table.backend != 'reference'].cosine_vs_fp64.min()\n"
          "display(Markdown(f'worst candidate GEMM cosine vs fp64: **{worst:.6f}** '\n"
          "                 f\"({'≥' if worst >= THRESHOLD else '<'} threshold {THRESHOLD})\"))\npivot"),
     code("fig = plots.bars(table[table.backend != 'reference'].assign(name=lambda d: 'L' + d.layer.astype(str) + ' ' "
          "+ d.gemm), 'name', ['rel_l2_vs_fp64'], 'capsule GEMMs on the candidate', 'relative L2 error vs fp64')\n"
          "fig.savefig(wb.run_dir / 'capsule_replay.png', dpi=110)"),
     ]),

"09_distribution_parity": notebook(
    "Distribution parity over a corpus — KLD, top-token agreement, Δp",
    """**Question.** Over real text, how often does the candidate pick another token than the reference, and how
far apart are the two next-token distributions? Stages A and F look at one prompt's last logits and one greedy
answer; a user deciding whether an FP8 path is acceptable asks this instead, and compares the answer with
llama.cpp's `llama-perplexity --kl-divergence`.

**Measurement.** The corpus (`CORPUS`, default: Python standard library sources, available offline everywhere) is cut
into windows of 512 tokens; each is one prefill on both sides and only its second half is scored, as llama.cpp
does. Per scored position: KL(reference ‖ candidate), whether the top token agrees, Δp (the change in the
probability of the reference's top token) and each side's negative log-likelihood. Statistics are accumulated
window by window: no logits are kept. **The floor:** the same statistics for the fp64 oracle against the
reference, over the first window. No pass rule: this notebook measures how far the candidate is, not whether
an op is wrong (stage B does that).""",
    [code("from fp8parity import distribution\n\nresult = distribution.distribution_parity(wb.reference, wb.candidate, "
          "wb.oracle, wb.tok, CORPUS, CORPUS_TOKENS)\n"
          "display(Markdown(f'corpus: {result.corpus}; **{result.tokens} tokens**, sha256 `{result.tokens_sha256[:16]}…`'))\n"
          "result.table()"),
     md("KLD per position on a log scale, Δp against the reference's confidence (a candidate that is merely less "
        "sure sits below zero at high confidence), and KLD along the corpus."),
     code("fig = plots.distribution(result.stats, 'candidate vs reference')\n"
          "fig.savefig(wb.run_dir / 'distribution.png', dpi=110)"),
     md("Where the candidate disagrees most: the positions with the largest KLD, with the text around them (the "
        "scored token in [[brackets]])."),
     code("ids = distribution.corpus_ids(wb.tok, distribution.load_corpus(CORPUS)[0], CORPUS_TOKENS)\n"
          "top = pd.DataFrame(vars(result.stats)).nlargest(10, 'kld')\n"
          "top['text'] = [distribution.context_text(wb.tok, ids, p) for p in top.position]\n"
          "top[['position', 'kld', 'same_top', 'delta_p', 'p_ref_top', 'text']]"),
     md("The sharper companion of stages A and F: where along the corpus does the candidate's greedy choice first "
        "differ from the reference's?"),
     code("first = result.first_greedy_difference\n"
          "display(Markdown('no greedy difference anywhere on the corpus' if first is None else "
          "f'first greedy difference at corpus position **{first}**: `{distribution.context_text(wb.tok, ids, first)}`'))\n"
          "wb.save_json('distribution.json', result.to_dict() | {'provenance': wb.provenance()})"),
     ]),

}


def main() -> None:
    out = ROOT / "notebooks"
    out.mkdir(exist_ok=True)
    for name, nb in NOTEBOOKS.items():
        nbf.write(nb, out / f"{name}.ipynb")
        print(out / f"{name}.ipynb")


if __name__ == "__main__":
    main()
