"""Every bad parameter of run-all and faults gets one line naming it, exit code 2, and writes nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from fp8parity.__main__ import main
from fp8parity.config import DEFAULT_PROMPTS, RunConfig

REPO = Path(__file__).resolve().parents[1]

BAD = [
    (["--backend", "nonsense"], "BACKEND='nonsense' is unknown"),
    (["--recipe", "weird"], "RECIPE='weird' is unknown"),
    (["--backend", "te"], "needs a CUDA GPU"),  # this machine has none (CI's has none either)
    (["--backend", "bf16"], "needs a CUDA GPU"),
    (["--threshold", "1.5"], "THRESHOLD=1.5 is outside (0, 1]"),
    (["--threshold", "0"], "THRESHOLD=0.0 is outside (0, 1]"),
    (["--threshold", "abc"], "THRESHOLD='abc' is not a number"),
    (["--max-prompts", "0"], "MAX_PROMPTS=0 must be at least 1"),
    (["--max-prompts", "two"], "MAX_PROMPTS='two' is not a whole number"),
    (["--paths", "sideways"], "PATHS='sideways' is not a non-empty subset"),
    (["--paths", ""], "is not a non-empty subset"),
    (["--prompt", ""], "PROMPT is empty"),
    (["--prompt", "   "], "PROMPT is empty"),
    (["--max-new-tokens", "0"], "MAX_NEW_TOKENS=0 must be at least 1"),
    (["--jobs", "-1"], "JOBS=-1 must be 0"),
    (["--jobs", "many"], "JOBS='many' is not a whole number"),
    (["--fault", "nofault"], "unknown fault 'nofault'"),
    (["--run-id", "../escape"], "RUN_ID='../escape' may hold only"),
    (["--accumulate", "int8"], "ACCUMULATE='int8' is unknown"),
    (["--archive", "everything"], "ARCHIVE='everything' is unknown"),
    (["--capsule", "no/such.safetensors"], "CAPSULE='no/such.safetensors' is not a file"),
    (["--candidate-trace", "no/such/dir"], "trace folder no/such/dir does not exist"),
    (["--reference-device", "gpu"], "REFERENCE_DEVICE='gpu' is unknown"),
    (["--reference-device", "cuda"], "REFERENCE_DEVICE=cuda needs a CUDA GPU"),  # none here
    (["--backend", "torch-fp8", "--recipe", "block"], ""),  # refused: no GPU here (and torch-fp8 has no block)
]


@pytest.mark.parametrize("args,says", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_a_bad_run_all_parameter_gets_one_line_and_exit_2_and_writes_nothing(tiny_path, tmp_path, capsys, args, says):
    runs = tmp_path / "runs"
    rc = main(["run-all", "--model", str(tiny_path), "--runs-dir", str(runs), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert says in err
    assert not runs.exists()


def test_a_missing_or_bad_model_is_refused_the_same_way(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    for model in (str(tmp_path / "missing.gguf"), str(bad)):
        rc = main(["run-all", "--model", model, "--runs-dir", str(tmp_path / "runs")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and model in err
    assert not (tmp_path / "runs").exists()


def test_bad_fault_bench_parameters_are_refused_before_anything_is_written(tiny_path, tmp_path, capsys):
    for args, says in ((["--backend", "nonsense"], "unknown backend"), (["--sweep", "bogus:current"], "unknown backend"),
                       (["--only", "nofault"], "no fault matches")):
        rc = main(["faults", "--model", str(tiny_path), "--runs-dir", str(tmp_path / "runs"), *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("var,says", [("PROMPT=", "PROMPT is empty"), ("BACKEND=nonsense", "BACKEND='nonsense'"),
                                      ("MAX_PROMPTS=0", "MAX_PROMPTS=0"), ("REFERENCE_DEVICE=tpu", "REFERENCE_DEVICE='tpu'")])
def test_make_passes_what_the_user_set_even_when_empty(tiny_path, tmp_path, var, says):
    """Make distinguishes `PROMPT=` from no PROMPT: the first is a bad value, the second the default."""
    runs = tmp_path / "runs"
    r = subprocess.run(["make", "-s", "--no-print-directory", "run-all", f"RUN={sys.executable}", f"MODEL={tiny_path}",
                        f"RUNS_DIR={runs}", var], cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("make")]
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr
    assert not runs.exists()


def test_the_defaults_are_defined_once():
    cfg = RunConfig()
    assert cfg.prompts == DEFAULT_PROMPTS and cfg.judged_prompts() == list(DEFAULT_PROMPTS)
    assert RunConfig.from_strings(prompts="Hi").prompts == ("Hi", *DEFAULT_PROMPTS)
    makefile = (REPO / "Makefile").read_text()
    for default in ("What is 2+2?", "0.99", "prefill,decode"):
        assert default not in makefile


def test_no_default_of_the_configuration_is_restated_as_a_literal():
    """Every RunConfig default is defined once, in config.py: no other parameter default (`recipe: str = "current"`),
    notebook parameter (`THRESHOLD = 0.99`) or default prompt elsewhere repeats it."""
    cfg = RunConfig()
    names = {f.name: getattr(cfg, f.name) for f in fields(RunConfig) if not isinstance(getattr(cfg, f.name), tuple)}
    names |= {"n_tokens": cfg.corpus_tokens}  # the same quantity under another name
    value = {n: re.escape(repr(v)) + r"(?![\w.])" for n, v in names.items() if v != ""}
    alternatives = "|".join(rf"{n}\s*:\s*[\w| ]+\s*=\s*{v}|{n.upper()}\s*=\s*{v}" for n, v in value.items())
    pattern = re.compile(rf"\b({alternatives})".replace("'", "[\"']"))
    files = [p for p in (REPO / "lib").rglob("*.py") if p.name != "config.py"] + sorted((REPO / "notebooks").glob("*.py"))
    restated = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
                for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    restated += [f"{p.relative_to(REPO)}: a default prompt" for p in files + [REPO / "Makefile"]
                 if any(f'"{q}"' in p.read_text() or f"'{q}'" in p.read_text() for q in DEFAULT_PROMPTS)]
    assert not restated, "\n".join(restated)
