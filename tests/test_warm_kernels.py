"""Kernels forked from the warm server run a notebook as a kernel started the usual way does: the same environment,
working directory, matplotlib backend (a figure a cell leaves open is shown) and errors; they are the server's
children, and none outlives it."""

from __future__ import annotations

import json
import os
import time

import nbformat
import papermill as pm
import pytest

from fp8parity import warm_kernels
from fp8parity.warm_kernels import WarmKernelManager, fork_server

PROBE = """import json, os, sys, matplotlib, torch
facts = {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "probe": os.environ.get("WARM_PROBE"),
         "backend": matplotlib.get_backend(), "torch_threads": torch.get_num_threads(),
         "argv0": sys.argv[0], "path0": sys.path[0], "sum": float(torch.arange(10.0).sum())}
print(json.dumps(facts))"""


def notebook(path, *sources) -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)
    return str(path)


FIGURE = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nNone"  # left open: the inline backend shows it


def facts_of(path, out, cwd) -> dict:
    pm.execute_notebook(path, str(out), cwd=str(cwd), kernel_name="python3", progress_bar=False, log_output=False,
                        kernel_manager_class=WarmKernelManager)
    cells = nbformat.read(out, as_version=4).cells
    shown = [sorted(o.get("data", {})) for o in cells[-1].outputs]
    return json.loads(cells[0].outputs[0]["text"]) | {"figure": shown}


def gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_forked_kernel_runs_a_notebook_as_a_usual_one_does(tmp_path, monkeypatch):
    nb = notebook(tmp_path / "probe.ipynb", PROBE, FIGURE)
    monkeypatch.setenv("WARM_PROBE", "cold")
    cold = facts_of(nb, tmp_path / "cold.ipynb", tmp_path)  # no server: started the usual way
    with fork_server() as server:
        monkeypatch.setenv("WARM_PROBE", "warm")  # set after the server started: the kernel still sees it
        warm = facts_of(nb, tmp_path / "warm.ipynb", tmp_path)
        again = facts_of(nb, tmp_path / "again.ipynb", tmp_path)
        assert warm["ppid"] == again["ppid"] == server._proc.pid != cold["ppid"]  # forked, from the one server
    assert warm["pid"] != again["pid"]  # a fresh kernel per notebook
    assert (cold["probe"], warm["probe"]) == ("cold", "warm")
    for key in ("cwd", "backend", "torch_threads", "argv0", "path0", "sum", "figure"):
        assert warm[key] == cold[key], key
    assert warm["figure"] == [["image/png", "text/plain"]]
    assert warm["backend"] == "module://matplotlib_inline.backend_inline"
    assert gone(server._proc.pid) and gone(warm["pid"]) and gone(again["pid"])


def test_an_error_in_a_forked_kernel_is_reported_as_papermill_reports_it(tmp_path):
    nb = notebook(tmp_path / "bad.ipynb", "x = 1", "raise ValueError('the cell says no')")
    with fork_server(), pytest.raises(pm.PapermillExecutionError, match="the cell says no"):
        pm.execute_notebook(nb, str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
                            log_output=False, kernel_manager_class=WarmKernelManager)


def test_kernels_start_the_usual_way_when_asked_to(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8PARITY_WARM_KERNELS", "0")
    nb = notebook(tmp_path / "probe.ipynb", PROBE)
    with fork_server() as server:
        assert server is None and warm_kernels._server is None
        facts = facts_of(nb, tmp_path / "out.ipynb", tmp_path)
    assert facts["ppid"] == os.getpid()  # jupyter_client's own Popen child
