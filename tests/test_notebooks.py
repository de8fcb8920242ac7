"""Notebooks: jupytext sources paired with output-free .ipynb files, each declaring its own parameters; the whole
workbook runs headless under papermill (tiny model) with its defaults and with other values; reports open in a real
browser."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import jupytext
import nbformat
import papermill as pm
import pytest

from fp8parity.config import RunConfig
from fp8parity.errors import WorkbookError
from fp8parity.runner import NOTEBOOK_DIR, declared, run_all

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
WORKBENCH_PARAMS = {"MODEL", "BACKEND", "RECIPE", "ACCUMULATE", "PROMPTS", "THRESHOLD", "FAULT", "RUN_DIR"}


def test_the_numbered_notebooks_each_with_its_jupytext_source():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07", "08", "09", "10"]
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py")) == [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert nb.cells[0].cell_type == "markdown" and len(nb.cells[0].source) > 100  # says what is tested and why


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_pair_is_in_sync(path):
    """The .ipynb holds exactly the cells of its .py source (`make notebooks` re-pairs them after an editor edit)."""
    source = jupytext.read(path.with_suffix(".py"))
    stored = nbformat.read(path, as_version=4)
    assert stored.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in source.cells], (
        f"{path.name} is out of sync with its .py: run `make notebooks`")
    assert [c.metadata.get("tags", []) for c in stored.cells] == [c.metadata.get("tags", []) for c in source.cells]


def test_a_jupyterlab_edit_of_the_pass_rule_lands_in_the_py_source(tmp_path):
    """The round trip `make lab` makes: JupyterLab saves through jupytext's contents manager, which writes the pair."""
    for p in NOTEBOOK_DIR.glob("02_*"):
        shutil.copy(p, tmp_path / p.name)
    cm = jupytext.TextFileContentsManager(root_dir=str(tmp_path))
    model = cm.get("02_stage_b_per_layer.ipynb")
    rule = [c for c in model["content"].cells if "stages.ParityRule(factor=replay.ALARM_FACTOR" in c.source]
    assert len(rule) == 1  # the pass rule is one cell a reader can change
    rule[0].source = rule[0].source.replace("factor=replay.ALARM_FACTOR", "factor=3.0")
    cm.save(model, "02_stage_b_per_layer.ipynb")
    py = (tmp_path / "02_stage_b_per_layer.py").read_text()
    assert "rule = stages.ParityRule(factor=3.0, threshold=THRESHOLD)" in py
    assert "factor=replay.ALARM_FACTOR" not in py


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_declares_what_it_uses_and_gets_only_that(path):
    names = set(pm.inspect_notebook(str(path)))
    everything = {k: "x" for k in (*WORKBENCH_PARAMS, "PATHS", "CAPSULE", "CORPUS", "CORPUS_TOKENS", "MAX_NEW_TOKENS",
                                   "CANDIDATE_TRACE", "ARCHIVE")}
    sent = declared(path, everything)
    assert set(sent) <= names
    if path.stem == "07_summary":
        assert names == {"RUN_DIR"}  # it reads the run folder and opens no model
    elif path.stem.startswith("10"):  # llama.cpp: no recipe, accumulation or fault of the workbook's own forward
        assert {"MODEL", "PROMPTS", "THRESHOLD", "RUN_DIR", "PATHS", "MAX_NEW_TOKENS"} <= names
        assert not {"RECIPE", "ACCUMULATE", "FAULT"} & names
    else:
        assert WORKBENCH_PARAMS <= names
    assert ("PATHS" in sent) == path.stem.startswith(("02", "10")) and ("CORPUS" in sent) == path.stem.startswith("09")


@pytest.fixture(scope="module")
def tiny_run(tiny_path, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    rc = run_all(RunConfig(model=str(tiny_path), backend="emulated-fp8", run_id="ci", max_prompts=1,
                           max_new_tokens=8, jobs=2), runs_dir=str(runs), quiet=True)  # two notebooks at a time
    return rc, runs


def test_run_all_executes_every_notebook_and_writes_the_report(tiny_path, tiny_run):
    rc, tmp_path = tiny_run
    run = tmp_path / "ci"
    assert rc == 0
    verdicts = json.loads((run / "verdicts.json").read_text())
    assert verdicts["failed_notebooks"] == [] and set(verdicts["verdicts"]) == set("ABCDEF")
    for v in verdicts["verdicts"].values():
        assert v["status"] in ("pass", "fail", "unmeasured") and v["summary"]
        assert v["provenance"]["backend"]["name"] == "emulated-fp8"
    index = (run / "index.html").read_text()
    assert index.count("<tr><td>") >= 6 and "data:image/png;base64," in index  # images embedded, opens from disk
    htmls = sorted(p.name for p in run.glob("0*.html"))
    assert len(htmls) == 9 and all(h in index for h in htmls) and not list(run.glob("10_*"))  # 10 is llama.cpp's
    assert "mean KLD" in index  # notebook 09's headline numbers reach the index
    assert (run / "capsule_replay.png").is_file()
    assert list(run.glob("stage_b/*/layer_*_q_proj.json"))
    with tarfile.open(tmp_path / "ci.tar.gz") as tar:  # the reviewer archive: reports, figures, verdicts, JSON
        names = tar.getnames()
    assert "ci/index.html" in names and "ci/verdicts.json" in names and "ci/parameters.json" in names
    assert any(n.startswith("ci/stage_b/") for n in names) and any(n.endswith(".png") for n in names)
    assert not any("/traces/" in n or n.endswith((".safetensors", ".pt", ".ipynb")) for n in names)
    assert list(run.glob("traces/*/candidate/tensors.safetensors"))  # the candidate's traces stay in the run folder
    assert not list(run.glob("traces/*/reference"))  # the reference's are recomputable: kept only with ARCHIVE=full
    assert "run folder on disk" in index
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings) == {p.stem for p in NOTEBOOKS if not p.stem.startswith("10")} | {"total wall"}
    assert timings["total wall"] < sum(v for k, v in timings.items() if k != "total wall")  # they overlapped
    with pytest.raises(WorkbookError, match="never overwrite"):
        run_all(RunConfig(model=str(tiny_path), run_id="ci"), runs_dir=str(tmp_path))


OTHER_VALUES = {"BACKEND": "emulated-fp8", "RECIPE": "rowwise", "THRESHOLD": 0.995, "PROMPTS": ["Say hi."],
                "PATHS": ["decode"], "DRILL_LAYER": 1, "DRILL_POSITION": 2, "DRILL_PATH": "decode", "RUNS": 2,
                "MAX_NEW_TOKENS": 6, "CORPUS_TOKENS": 512}


def test_every_notebook_runs_with_other_values_than_its_defaults(tiny_path, tmp_path):
    """Another recipe, threshold, prompt and a single path; the drill-downs at another layer, position and op."""
    run = tmp_path / "run"
    own_forward = [nb for nb in NOTEBOOKS if not nb.stem.startswith("10")]  # 10: llama.cpp (tests/test_llamacpp.py)
    for nb in sorted(own_forward, key=lambda p: "summary" in p.stem):  # the summary reads what the others wrote
        params = OTHER_VALUES | {"MODEL": str(tiny_path), "RUN_DIR": str(run),
                                 "DRILL_OP": "v_proj" if nb.stem.startswith("05") else "ffn_up"}
        pm.execute_notebook(str(nb), str(tmp_path / nb.name), parameters=declared(nb, params), cwd=str(NOTEBOOK_DIR),
                            kernel_name="python3", progress_bar=False)
    b = json.loads((run / "verdicts" / "stage_B.json").read_text())
    assert b["numbers"]["paths"] == ["decode"] and b["numbers"]["spec_rule"]["threshold"] == 0.995
    assert b["provenance"]["backend"]["granularity"] == "rowwise" and b["provenance"]["prompts"] == ["Say hi."]
    assert json.loads((run / "verdicts" / "stage_E.json").read_text())["numbers"]["threshold"] == 0.995
    out = {nb.stem[:2]: nbformat.read(tmp_path / nb.name, as_version=4) for nb in own_forward}
    text = {k: json.dumps([c.get("outputs", []) for c in v.cells]) for k, v in out.items()}
    assert "ffn_up of layer 1 at position 2 (decode)" in text["02"]
    assert "attn_norm of layer 1 at position 2 (prefill)" in text["04"]
    assert "v_proj of layer 1 at position 2 (prefill)" in text["05"]
    assert (run / "summary.json").is_file()


def test_the_summary_draws_stage_as_logits_without_importing_torch(tiny_run, tmp_path):
    """The summary is the last notebook, on the critical path: torch's import (3.6 s on the GPU host) is not paid
    there. Its code cells, run as a script on a finished run folder, plot stage A's logits and never import torch."""
    import subprocess
    import sys

    run = tiny_run[1] / "ci"
    assert (run / "stage_a_logits.safetensors").is_file()
    cells = [c.source for c in jupytext.read(NOTEBOOK_DIR / "07_summary.py").cells if c.cell_type == "code"]
    script = "\n".join(cells).replace("RUN_DIR = INTERACTIVE_RUN_DIR", f"RUN_DIR = {str(run)!r}")
    script += "\nimport sys\nassert 'torch' not in sys.modules, 'the summary imported torch'\nprint('plotted', fit)"
    env = os.environ | {"MPLBACKEND": "Agg", "PYTHONPATH": str(NOTEBOOK_DIR.parent / "lib")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plotted {" in done.stdout and "slope" in done.stdout


def test_bad_model_fails_before_a_run_folder_exists(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(WorkbookError, match="not a GGUF"):
        run_all(RunConfig(model=str(bad)), runs_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_missing_report_template_fails_before_a_run_folder_exists(tiny_path, tmp_path, monkeypatch):
    """Without nbconvert's 'lab' template where nbconvert looks (JUPYTER_PATH not pointing at it), one sentence before
    any notebook runs; the lookup agrees with nbconvert's own, which finds the template here."""
    import jupyter_core.paths
    from nbconvert import HTMLExporter

    from fp8parity.runner import check_html_template

    check_html_template()
    assert any(p.rstrip("/").endswith("templates/lab") for p in HTMLExporter(template_name="lab").template_paths)
    monkeypatch.setattr(jupyter_core.paths, "jupyter_path", lambda *sub: [str(tmp_path / "empty")])
    with pytest.raises(WorkbookError, match="no 'lab' HTML template"):
        run_all(RunConfig(model=str(tiny_path)), runs_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("FP8PARITY_REQUIRE_BROWSER"),
                    reason="no Chromium here (.ci/run installs the Debian package and requires this test)")
def test_every_report_renders_in_a_real_browser(tiny_run):
    """index.html and every report of the tiny run, opened from disk in headless Chromium: every image decodes,
    every link resolves inside the run folder, the verdict table is visible, and no verdict mark is an emoji."""
    from playwright.sync_api import sync_playwright

    run = tiny_run[1] / "ci"
    pages = [run / "index.html", *sorted(run.glob("0*.html"))]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        for html_file in pages:
            page.goto(html_file.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            assert all(ok and width > 0 for ok, width in images), (html_file.name, images)
            for href in page.evaluate("Array.from(document.links).map(a => a.getAttribute('href'))"):
                if href.startswith(("http://", "https://", "#", "mailto:")):
                    continue
                target = (html_file.parent / href.split("#")[0]).resolve()
                assert target.is_file() and run.resolve() in target.parents, (html_file.name, href)
            text = page.inner_text("body")
            assert not set("✅❌⚪") & set(text), html_file.name
        page.goto((run / "index.html").as_uri())
        table = page.locator("table:has(th:text-is(\"verdict\"))")
        assert table.is_visible() and table.locator("tr").count() == 7  # a header and stages A-F
        assert page.locator("img").count() >= 2  # the affine drift and stage B's per-layer figure
        browser.close()


def test_the_reviewer_archive_leaves_out_traces_and_the_full_one_keeps_everything(tmp_path):
    from fp8parity.runner import write_archive

    run = tmp_path / "r"
    for rel, size in (("index.html", 10), ("02_stage_b_per_layer.html", 10), ("02_stage_b_per_layer.ipynb", 10),
                      ("verdicts/stage_B.json", 5), ("stage_b/prompt0-prefill/local.json", 5), ("affine_drift.png", 5),
                      ("traces/prompt0-prefill/candidate/tensors.safetensors", 1000), ("capsule.safetensors", 500),
                      ("stage_a_logits.safetensors", 50)):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"x" * size)
    with tarfile.open(write_archive(run, tmp_path / "r.tar.gz", reviewer=True)) as tar:
        small = set(tar.getnames())
    with tarfile.open(write_archive(run, tmp_path / "r-full.tar.gz", reviewer=False)) as tar:
        full = set(tar.getnames())
    assert small == {"r/index.html", "r/02_stage_b_per_layer.html", "r/verdicts/stage_B.json",
                     "r/stage_b/prompt0-prefill/local.json", "r/affine_drift.png"}
    assert len(full) == 9 and small < full


def test_notebooks_started_together_go_longest_first():
    from fp8parity.runner import list_notebooks, start_order

    books = sorted((p for p in list_notebooks() if "summary" not in p.stem), key=start_order)
    assert [p.name[:2] for p in books][:3] == ["02", "09", "06"] and len(books) == 8


def test_kernels_get_their_share_of_the_cores_and_keep_freed_memory(monkeypatch):
    """A kernel started by run-all gets cores/jobs threads and glibc settings under which a 100 MB block comes from the
    heap, not a mapping of its own, and stays there once freed, for the next (asked of glibc in the child: mallinfo2)."""
    import os
    import platform
    import subprocess
    import sys

    from fp8parity.runner import kernel_environment

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc tunables")
    child = ("import ctypes, os, numpy as np\n"
             "class M(ctypes.Structure):\n"
             "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',"
             " 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
             "libc = ctypes.CDLL('libc.so.6'); libc.mallinfo2.restype = M\n"
             "b = np.ones(25_000_000, np.float32); held = libc.mallinfo2(); del b; freed = libc.mallinfo2()\n"
             "print(held.hblkhd >> 20, freed.arena >> 20, os.environ.get('OMP_NUM_THREADS'))")

    def run() -> list[str]:
        return subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout.split()

    for name in ("OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    mapped, kept, threads = run()
    assert int(mapped) >= 95 and int(kept) < 95 and threads == "None"  # glibc's defaults: mapped, then unmapped
    with kernel_environment(2):
        mapped, kept, threads = run()
    assert int(mapped) == 0 and int(kept) >= 95 and threads == str(max(1, (os.cpu_count() or 1) // 2))
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ and "OMP_NUM_THREADS" not in os.environ  # restored
    with kernel_environment(2, keep_freed_memory=False):  # a model streamed through a small machine: glibc's defaults
        mapped, kept, threads = run()
    assert int(mapped) >= 95 and int(kept) < 95 and threads == str(max(1, (os.cpu_count() or 1) // 2))
