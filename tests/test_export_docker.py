"""The Docker image installs what `sf2dist-export --format onnx` imports."""
import re
from pathlib import Path

import pytest

from sf2dist.export import ONNX_PACKAGES

ROOT = Path(__file__).resolve().parents[1]


def test_the_image_installs_an_extra_with_every_onnx_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (installed,) = re.findall(r'pip install [^\n]*-e "\.\[([\w,]+)\]"', (ROOT / "docker" / "Dockerfile").read_text())
    requirements = [req for extra in installed.split(",") for req in extras[extra]]
    names = {re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() for req in requirements}
    assert set(ONNX_PACKAGES) <= names, f"docker/Dockerfile installs the extras {installed}, which lack some of {ONNX_PACKAGES}"
