"""The house rules as tests, so the README's test command enforces them: ruff (lint and format) on the whole
tree and mypy, strict, on the lower layers (core, store, io; the configuration is in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STRICT = ("medsam_engine.pipeline.core", "medsam_engine.pipeline.store", "medsam_engine.pipeline.io")


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return path


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    run = subprocess.run([_tool("ruff"), *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_mypy_strict_on_core_store_and_io_finds_nothing(tmp_path):
    """mypy reads packages from folders, so it runs on the layout a wheel installs (links to the checkout's
    folders under medsam_engine/), with its cache kept in the checkout between runs."""
    mypy = _tool("mypy")
    staged = tmp_path / "medsam_engine"
    staged.mkdir()
    shutil.copy(ROOT / "medsam_engine" / "__init__.py", staged)
    for package in ("pipeline", "flows", "detectors", "postprocess"):
        (staged / package).symlink_to(ROOT / package, target_is_directory=True)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    packages = [arg for module in STRICT for arg in ("-p", module)]
    run = subprocess.run(
        [mypy, "--cache-dir", str(ROOT / ".mypy_cache"), *packages],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
