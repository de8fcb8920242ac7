"""environment.yml and pyproject.toml list the same packages with the same version bounds."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", req.strip())
    name = re.sub(r"\[.*\]", "", m.group(1)).lower().replace("_", "-")
    return CONDA_NAMES.get(name, name), m.group(2).replace(" ", "")


def test_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_split(r) for r in project["dependencies"])
    gpu = dict(_split(r) for r in project["optional-dependencies"]["gpu"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = {}, []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
        else:
            name, spec = _split(dep.replace("=", "==", 1) if re.match(r"^python=", dep) else dep)
            conda[name] = spec
    conda.pop("python"), conda.pop("pip")
    assert conda == wanted
    pip_specs = dict(_split(p) for p in pip if not p.startswith("-e"))
    assert pip_specs == gpu
    assert any(p.startswith("-e") and "test" in p for p in pip), "environment.yml installs the lib with its test extra"
