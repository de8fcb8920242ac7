"""`make run-all`: every notebook headless with papermill into runs/<run-id>/, HTML reports, verdicts, index.html.

Keeps going when a notebook fails and exits non-zero naming what failed. A run folder is never reused.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import sys
import tarfile
import time
from datetime import datetime
from pathlib import Path

from fp8parity.config import ENGINES, RunConfig, validate
from fp8parity.errors import WorkbookError
from fp8parity.models import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


ENGINE_NOTEBOOKS = ("10", "07")  # another engine as the candidate: its cascade, then the summary


def list_notebooks(select: str = "", backend: str = "") -> list[Path]:
    """In execution order: by number, the summary last (it reads what every other notebook wrote). Notebook 10 judges
    another engine (BACKEND=llama.cpp) and runs instead of the others, which drive the workbook's own forward."""
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"), key=lambda p: ("summary" in p.stem, p.name))
    engine = backend in ENGINES
    found = [p for p in found if (p.name[:2] in ENGINE_NOTEBOOKS) == engine or (not engine and "summary" in p.stem)]
    if select:
        wanted = {s.strip().zfill(2) for s in select.split(",") if s.strip()}
        found = [p for p in found if p.name[:2] in wanted]
    if not found:
        raise WorkbookError(f"no notebooks to run in {NOTEBOOK_DIR} (selection {select!r}).")
    return found


# Notebooks started together go longest first, so that no long one starts last (measured on the H200, real model
# with four and five at once and the 7B-shaped one with three, and on the 2-core VM with two: stage B, 09 and F are
# the longest, then E; C and D the shortest).
LONGEST_FIRST = ("02", "09", "06", "05", "01", "08", "04", "03")


def start_order(notebook: Path) -> int:
    n = notebook.name[:2]
    return LONGEST_FIRST.index(n) if n in LONGEST_FIRST else len(LONGEST_FIRST)


def new_run_dir(runs_dir: Path, run_id: str, backend: str, fault: str) -> Path:
    if run_id:
        run = runs_dir / run_id
        if run.exists():
            raise WorkbookError(f"run folder {run} already exists; runs never overwrite each other: pick another RUN_ID.")
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run = runs_dir / f"{stamp}-{backend}-{fault}"
        n = 1
        while run.exists():
            n += 1
            run = runs_dir / f"{stamp}-{backend}-{fault}-{n}"
    run.mkdir(parents=True)
    return run


def check_html_template() -> None:
    """The HTML reports' template (JupyterLab's 'lab', under share/jupyter/nbconvert/templates) is found, before any
    notebook runs: without it every report would fail after its notebook, with nbconvert's traceback. Looked up where
    nbconvert looks (jupyter_core's paths, JUPYTER_PATH first), without importing nbconvert (1.6-1.8 s)."""
    from jupyter_core.paths import jupyter_path

    if not any((Path(p) / "lab" / "conf.json").is_file() for p in jupyter_path("nbconvert", "templates")):
        raise WorkbookError("nbconvert finds no 'lab' HTML template for the reports: run `make setup` (it installs "
                            "nbconvert's templates into .venv/share/jupyter), or point JUPYTER_PATH at the "
                            "share/jupyter folder that holds nbconvert/templates/lab.")


def write_reports(notebooks: list[Path]) -> None:
    """The HTML report of each executed notebook that exists (a notebook that failed early may have written none)."""
    for ipynb in notebooks:
        if ipynb.is_file():
            to_html(ipynb)


def to_html(ipynb: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(ipynb, as_version=4))
    out = ipynb.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


def notebook_parameters(cfg: RunConfig, run: Path) -> dict:
    """The notebooks' parameters cell, filled from a checked configuration."""
    return {"MODEL": str(Path(cfg.model).resolve()), "BACKEND": cfg.backend, "RECIPE": cfg.recipe,
            "ACCUMULATE": cfg.accumulate, "PROMPTS": cfg.judged_prompts(), "THRESHOLD": cfg.threshold,
            "RUN_DIR": str(run), "FAULT": cfg.fault, "PATHS": list(cfg.paths), "MAX_NEW_TOKENS": cfg.max_new_tokens,
            "CAPSULE": str(Path(cfg.capsule).resolve()) if cfg.capsule else "",
            "CANDIDATE_TRACE": str(Path(cfg.candidate_trace).resolve()) if cfg.candidate_trace else "",
            "ARCHIVE": cfg.archive, "CORPUS": str(Path(cfg.corpus).resolve()) if cfg.corpus else "",
            "CORPUS_TOKENS": cfg.corpus_tokens, "LLAMA_DEVICE": cfg.llama_device,
            "REFERENCE_DEVICE": cfg.reference_device}


def declared(notebook: Path, params: dict) -> dict:
    """The parameters a notebook declares in its parameters cell (as papermill's inspection reports them): each
    notebook gets only those, so none is handed a value it would silently ignore."""
    import papermill as pm

    names = pm.inspect_notebook(str(notebook))
    return {k: v for k, v in params.items() if k in names}


def execute(nb: Path, run: Path, params: dict, quiet: bool) -> tuple[float, str | None]:
    """One notebook into the run folder: (seconds, None) or (seconds, why it failed). Its HTML report comes after
    (`write_reports`)."""
    import papermill as pm

    from fp8parity.warm_kernels import WarmKernelManager

    out, t0, error = run / nb.name, time.perf_counter(), None
    if not quiet:
        print(f"[{nb.stem}] running ...", flush=True)
    try:
        pm.execute_notebook(str(nb), str(out), parameters=declared(nb, params), cwd=str(NOTEBOOK_DIR),
                            kernel_name="python3", progress_bar=False, log_output=False,
                            kernel_manager_class=WarmKernelManager)  # forked from a warm server where one runs
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
        last = str(exc).strip().splitlines()
        error = last[-1] if last else type(exc).__name__
        print(f"[{nb.stem}] FAILED: {error}", file=sys.stderr, flush=True)
    seconds = round(time.perf_counter() - t0, 1)
    if not quiet:
        print(f"[{nb.stem}] {seconds} s", flush=True)
    return seconds, error


# What one notebook holds on the GPU, per byte of the model's fp32 weights: the reference's fp32 copy (when it runs
# there) and the candidate's (te keeps an fp32 parameter beside its FP8 copy, the reference's own where that is on
# the GPU; torch-fp8 an E4M3 copy; bf16 half).
CANDIDATE_GPU_SHARE = {"te": 1.25, "torch-fp8": 0.25, "bf16": 0.5}
FP32_BORROWED = {"te": 1.0}  # what the candidate borrows from a GPU reference instead of holding
GPU_HEADROOM = 0.8  # of the card's memory: activations, the K/V caches, CUDA graphs' pools, the allocator's slack


def gpu_bytes_per_notebook(cfg: RunConfig, fp32_weight_bytes: int) -> int:
    from fp8parity.config import reference_device

    # auto picks te where it runs: counted as te rather than asking (that would import Transformer Engine, 8 s)
    backend = "te" if cfg.backend == "auto" else cfg.backend
    on_gpu = reference_device(cfg.reference_device) == "cuda"
    share = CANDIDATE_GPU_SHARE.get(backend, 0.0) + on_gpu * (1.0 - FP32_BORROWED.get(backend, 0.0))
    return int(share * fp32_weight_bytes) + 2**30


# What one notebook holds in host memory of its own on a CPU-only machine, per byte of the model's fp32 weights (those
# are memory-mapped from the weight cache: shared by every notebook): emulated-fp8's FP8 weights kept as fp32, and
# stage B's twin's; the reference and its fp32 twin hold no copy.
CANDIDATE_HOST_SHARE = {"emulated-fp8": 2.0, "auto": 2.0}
HOST_HEADROOM = 0.8  # of the machine's memory


def host_jobs(cfg: RunConfig, fp32_weight_bytes: int, cores: int, memory_bytes: int) -> int:
    """Notebooks at once on a CPU-only machine: one per core, as many as its memory holds beside the shared weights.
    On the 2-core VM two at once, longest first, took the default run-all's notebooks from 303 to 208 s (one
    notebook's Python, startup and single-threaded work overlaps another's GEMMs)."""
    per_notebook = CANDIDATE_HOST_SHARE.get(cfg.backend, 0.0) * fp32_weight_bytes + 2**30
    fit = int((HOST_HEADROOM * memory_bytes - fp32_weight_bytes) // per_notebook)
    return max(1, min(cores, fit))


# A GPU host's notebooks at once: at most GPU_JOBS, one per CORES_PER_GPU_JOB cores. With stage B's traced forwards as
# CUDA graphs, eight notebooks on four slots left C (16 s) to start at 41 s, after stage B's 42 s; five slots start
# the short ones beside B. Real model, H200, 16 cores, the same lease each: 91.3 s (four) vs 85.2 s (five); another
# lease 70.1 s (five) vs 73.5 s (six).
GPU_JOBS, CORES_PER_GPU_JOB = 5, 3


def jobs_here(cfg: RunConfig, gguf=None) -> int:
    """How many notebooks run at once: JOBS, or by default on a CPU-only machine one per core as memory allows
    (`host_jobs`), and on a GPU host up to GPU_JOBS, one per CORES_PER_GPU_JOB cores, as many as the card holds (a
    7B's fp32 reference and te candidate took 68 GB a notebook with a copy each; sharing the fp32 weights, 39 GB).
    `gguf`: the model's GGUFModel where the caller has it open."""
    if cfg.jobs:
        return cfg.jobs
    import os

    import torch

    from fp8parity.gguf_file import GGUFModel

    fp32_bytes = (gguf or GGUFModel(cfg.model)).fp32_bytes()
    if not torch.cuda.is_available():
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): memory unknown, one at a time
            return 1
        return host_jobs(cfg, fp32_bytes, os.cpu_count() or 1, memory)
    per_notebook = gpu_bytes_per_notebook(cfg, fp32_bytes)
    fit = int(GPU_HEADROOM * torch.cuda.get_device_properties(0).total_memory // per_notebook)
    return max(1, min(GPU_JOBS, (os.cpu_count() or 1) // CORES_PER_GPU_JOB, fit))


def warm_weight_cache(gguf) -> None:
    """The model's (a GGUFModel's) dequantized-weight cache written once before notebooks start together: each would
    otherwise find none and dequantize the whole model at the same time (a 7B: 30 GB of host memory each)."""
    from fp8parity import weight_cache

    if weight_cache.enabled(gguf) and not weight_cache.cache_path(gguf).is_file():
        print(f"dequantizing {gguf.path.name} once for every notebook: {weight_cache.cache_path(gguf)}", flush=True)
        weight_cache.open_cache(gguf)


# glibc hands a freed block over its threshold (128 KB, rising to 32 MB) back to the kernel and maps fresh zeroed pages
# for the next: each large temporary of a forward (a 512-token window's logits: 155 MB) faulted its pages in anew.
# A notebook's kernel keeps freed memory for reuse instead (glibc's tunables, read when the kernel starts) where the
# model's weights are kept in memory; a model streamed through a small machine (a 7B on 24 GB) keeps glibc's defaults.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


@contextlib.contextmanager
def kernel_environment(jobs: int, keep_freed_memory: bool = True):
    """Kernels started inside get cores/jobs threads each (four notebooks with a thread per core each left a 16-core
    GPU host at a load of 41 and every notebook several times slower) and, with `keep_freed_memory`, keep their freed
    memory (`KEEP_FREED_MEMORY`); the environment is restored after."""
    import os

    updates = dict(KEEP_FREED_MEMORY) if keep_freed_memory else {}
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        updates |= dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), threads)
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_all(cfg: RunConfig, runs_dir: str = "runs", notebooks: str = "", quiet: bool = False) -> int:
    """Execute the notebooks into a new run folder; 0 when every notebook ran (verdicts may still fail).

    The notebooks are independent of one another and run `jobs_here` at a time; the summary runs last, it reads what
    they wrote. Every parameter is checked before the run folder exists: a bad one raises a WorkbookError and writes
    nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from fp8parity.gguf_file import GGUFModel
    from fp8parity.qwen2 import weights_fit
    from fp8parity.warm_kernels import fork_server

    validate(cfg)
    check_html_template()
    books = list_notebooks(notebooks, cfg.backend)
    run = new_run_dir(Path(runs_dir).resolve(), cfg.run_id, cfg.backend, cfg.fault)
    params = notebook_parameters(cfg, run)
    (run / "parameters.json").write_text(json.dumps(params, indent=2))
    t0 = time.perf_counter()
    first, last = [nb for nb in books if "summary" not in nb.stem], [nb for nb in books if "summary" in nb.stem]
    gguf = GGUFModel(cfg.model)  # opened once for the notebook count and the weight cache (0.5 s a time)
    jobs = jobs_here(cfg, gguf)
    if jobs > 1:
        first.sort(key=start_order)
        warm_weight_cache(gguf)
    with kernel_environment(jobs, keep_freed_memory=weights_fit(gguf)), fork_server():
        with ThreadPoolExecutor(jobs) as pool:
            results = dict(zip(first, pool.map(lambda nb: execute(nb, run, params, quiet), first), strict=True))
            # their reports rendered while the summary runs, on a core that would otherwise wait beside it
            reports = pool.submit(write_reports, [run / nb.name for nb in first])
            results |= {nb: execute(nb, run, params, quiet) for nb in last}
            reports.result()
        write_reports([run / nb.name for nb in last])
    failed = [nb.stem for nb in books if results[nb][1] is not None]
    timings = {nb.stem: results[nb][0] for nb in books} | {"total wall": round(time.perf_counter() - t0, 1)}
    (run / "timings.json").write_text(json.dumps(timings, indent=2))
    write_index(run, failed)
    archive = write_archive(run, run.parent / f"{run.name}.tar.gz", reviewer=True)
    full = write_archive(run, run.parent / f"{run.name}-full.tar.gz", reviewer=False) if cfg.archive == "full" else None
    print(f"report: {run / 'index.html'}\narchive for reviewers: {archive} ({archive.stat().st_size / 1e6:.1f} MB)"
          + (f"\nfull archive (traces too): {full} ({full.stat().st_size / 1e6:.0f} MB)" if full else ""))
    if failed:
        print(f"notebooks that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# What a reviewer opens: reports, figures, verdicts, per-layer JSON, parameters. Traces, capsules, logits and the
# executed notebooks (the HTML reports render them) stay in the run folder, or go into the full archive.
_NOT_FOR_REVIEWERS = ("traces", ".safetensors", ".pt", ".ipynb")


def for_reviewers(path: Path, run: Path) -> bool:
    rel = path.relative_to(run)
    return rel.parts[0] != "traces" and path.suffix not in _NOT_FOR_REVIEWERS


def write_archive(run: Path, archive: Path, reviewer: bool) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(run.rglob("*")):
            if path.is_file() and (not reviewer or for_reviewers(path, run)):
                tar.add(path, arcname=str(Path(run.name) / path.relative_to(run)))
    return archive


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def distribution_line(run: Path) -> str:
    """Mean KLD and same-top-p of the run's candidate, from notebook 09's distribution.json."""
    f = run / "distribution.json"
    if not f.is_file():
        return "not run"
    d = json.loads(f.read_text())
    c, o = d["candidate"], d["oracle"] or {"mean_kld": float("nan"), "same_top_p": float("nan")}
    return (f"mean KLD {c['mean_kld']:.3g} ± {c['mean_kld_err']:.2g} nats, same top p {c['same_top_p']:.2%} over "
            f"{c['positions']} scored positions of {d['tokens']} corpus tokens (fp64 oracle floor: mean KLD "
            f"{o['mean_kld']:.2g}, same top p {o['same_top_p']:.2%})")


def _stage_of(notebook: str) -> str:
    from fp8parity.stage_names import STAGES

    if not notebook[:2].isdigit():  # "total wall"
        return ""
    i = int(notebook[:2]) - 1
    return list(STAGES)[i] if 0 <= i < len(STAGES) else ""


def _fmt(v) -> str:
    return "" if v is None else f"{v:.1f}"


def verdict_table(run: Path):
    """One row per stage A-F from the run's verdict files; a stage with no verdict is 'unmeasured'."""
    import pandas as pd

    from fp8parity.stage_names import STAGES

    found = _read_verdicts(Path(run))
    return pd.DataFrame([{"stage": s, "title": found[s]["title"] if s in found else title,
                          "status": found[s]["status"] if s in found else "unmeasured",
                          "summary": found[s]["summary"] if s in found else "this stage did not run (see its report)"}
                         for s, title in STAGES.items()])


def _read_verdicts(run: Path) -> dict[str, dict]:
    return {v["stage"]: v for v in (json.loads(p.read_text()) for p in sorted((run / "verdicts").glob("stage_*.json")))}


def _verdict_rows(verdicts: dict[str, dict], reports: dict[str, str]) -> str:
    from fp8parity.stage_names import MARK_COLORS, STAGES

    rows = []
    for i, (stage, title) in enumerate(STAGES.items(), start=1):
        v = verdicts.get(stage)
        status = v["status"] if v else "unmeasured"
        summary = v["summary"] if v else "did not run (see its report)"
        link = reports.get(f"{i:02d}") or reports.get(ENGINE_NOTEBOOKS[0])  # an engine's stages: all in notebook 10
        name = f'<a href="{link}">{html.escape(title)}</a>' if link else html.escape(title)
        rows.append(f'<tr><td>{stage}</td><td>{name}</td><td style="color:{MARK_COLORS[status]};font-weight:bold">'
                    f'{status.upper()}</td><td>{html.escape(summary)}</td></tr>')
    return "".join(rows)


def _cost_table(run: Path, verdicts: dict[str, dict]) -> str:
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    res_rows = "".join(
        f"<tr><td>{html.escape(nb)}</td><td>{sec}</td>"
        f"<td>{_fmt((verdicts.get(st) or {}).get('provenance', {}).get('resources', {}).get('host_peak_rss_gb'))}</td>"
        f"<td>{_fmt((verdicts.get(st) or {}).get('provenance', {}).get('resources', {}).get('gpu_peak_gb'))}</td></tr>"
        for nb, sec in timings.items() for st in [_stage_of(nb)])
    return ("<h2>Cost</h2><table><tr><th>notebook</th><th>wall s</th><th>host peak RSS GB</th>"
            f"<th>GPU peak GB</th></tr>{res_rows}</table>") if res_rows else ""


def _figures(run: Path) -> str:
    """The headline figures, embedded: the page opens from disk or from the archive with nothing beside it."""
    figures = [("Logits affine drift (stage A)", run / "affine_drift.png"),
               ("Stage B: local error of every op against the twin, per layer (prompt 0, prefill)",
                run / "stage_b_local_prompt0_prefill.png"),
               ("Stage B: drift against the reference along the residual stream", run / "stage_b_drift.png")]
    return "".join(f'<h2>{html.escape(title)}</h2><img style="max-width:100%" src="data:image/png;base64,'
                   f'{base64.b64encode(fig.read_bytes()).decode()}">' for title, fig in figures if fig.is_file())


def _provenance_rows(run: Path, prov: dict) -> list[tuple[str, object]]:
    backend = prov.get("backend", {})
    return [("model", f"{prov.get('model')} ({Path(prov.get('model_file', '?')).name}, sha256 "
                      f"{prov.get('model_sha256', '?')[:16]}…)"),
            ("candidate backend", f"{backend.get('name')} " + ", ".join(
                f"{k}={v}" for k, v in backend.items() if k not in ("name", "recipe_repr", "card"))),
            ("recipe", prov.get("recipe")), ("fault", prov.get("fault")), ("threshold", prov.get("threshold")),
            ("card", (prov.get("machine") or {}).get("card") or "none (CPU only)"),
            ("run folder on disk", f"{folder_size(run) / 1e6:.0f} MB (traces included; the reviewer archive leaves "
                                   f"them out)"),
            ("distribution parity (notebook 09)", distribution_line(run)),
            ("versions", json.dumps(prov.get("versions", {})))]


def write_index(run: Path, failed: list[str]) -> Path:
    """index.html: a verdict per stage linking each report, provenance, cost, the headline figures embedded."""
    verdicts = _read_verdicts(run)
    prov = next(iter(verdicts.values()))["provenance"] if verdicts else {}
    reports = {p.name[:2]: p.name for p in sorted(run.glob("[0-9][0-9]_*.html"))}
    info = _provenance_rows(run, prov)
    rows, resources_html, img = _verdict_rows(verdicts, reports), _cost_table(run, verdicts), _figures(run)
    others = "".join(f'<li><a href="{name}">{name}</a></li>' for name in reports.values())
    fails = f'<p style="color:#cf222e">Notebooks that failed to execute: {", ".join(failed)}</p>' if failed else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>FP8 parity run {run.name}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;width:100%}}td,th{{border:1px solid #d0d7de;padding:6px;vertical-align:top}}
th{{background:#f6f8fa;text-align:left}}</style></head><body>
<h1>FP8 parity cascade — run {html.escape(run.name)}</h1>{fails}
<table>{''.join(f'<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>' for k, v in info)}</table>
<h2>Verdicts</h2><table><tr><th>stage</th><th>what</th><th>verdict</th><th>the number behind it</th></tr>
{rows}</table>{img}{resources_html}<h2>Reports</h2><ul>{others}</ul></body></html>"""
    out = run / "index.html"
    out.write_text(page, encoding="utf-8")
    (run / "verdicts.json").write_text(json.dumps({"run": run.name, "failed_notebooks": failed,
                                                   "verdicts": verdicts}, indent=2, default=str))
    return out
