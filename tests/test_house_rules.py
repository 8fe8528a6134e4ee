"""The house rules as tests, so the README's test command enforces them: ruff (lint and format) on the whole
tree, mypy, strict, on the lower layers (core, store, io; the configuration is in pyproject.toml), and one
entry point for DICOM header reads."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STRICT = ("medsam_engine.pipeline.core", "medsam_engine.pipeline.store", "medsam_engine.pipeline.io")
PACKAGES = ("pipeline", "flows", "detectors", "postprocess")
HEADER_READER = "pipeline/io/dicom_header.py"
PYDICOM_READS = {"dcmread", "read_partial"}
HEADER_ONLY = {"stop_before_pixels", "specific_tags"}
# reads of whole files, pixels included, which are not header reads: (file, function) -> why
WHOLE_FILE_READS = {
    ("pipeline/io/dicom.py", "_read_dataset"): "decodes the pixel data of the files it reads",
    ("pipeline/io/dicomweb.py", "stow"): "sends the files whole, pixel data included, to the PACS",
}


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return path


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    run = subprocess.run([_tool("ruff"), *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.mark.slow
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


def test_tests_that_share_a_server_share_a_worker(request):
    """Under pytest-xdist's ``--dist loadgroup`` a test's node id carries its group (tests/conftest.py): the
    scheduler keeps a group on one worker only so."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs in a pytest-xdist worker with --dist loadgroup")
    assert request.node.nodeid.endswith("@tests/test_house_rules.py")


def _pydicom_reads() -> list[tuple[str, str, ast.Call]]:
    """(file, enclosing function, call) for every call of pydicom's file readers in the packages."""
    found: list[tuple[str, str, ast.Call]] = []

    def visit(node: ast.AST, name: str, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            called = getattr(child, "func", None)
            if (
                isinstance(child, ast.Call)
                and getattr(called, "attr", getattr(called, "id", "")) in PYDICOM_READS
            ):
                found.append((name, function, child))
            visit(child, name, inner)

    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            visit(ast.parse(path.read_text()), path.relative_to(ROOT).as_posix(), "")
    return found


def test_dicom_headers_are_read_only_through_read_dicom_header():
    """Header reads go through pipeline/io/dicom_header.py (its rules and errors in one place); elsewhere only
    the whole-file reads listed above call pydicom's readers."""
    strays = [
        f"{name}:{call.lineno} in {function or 'the module'}"
        for name, function, call in _pydicom_reads()
        if name != HEADER_READER
        and ((name, function) not in WHOLE_FILE_READS or {k.arg for k in call.keywords} & HEADER_ONLY)
    ]
    assert strays == [], "read headers with pipeline.io.dicom_header.read_dicom_header: " + ", ".join(strays)


def test_the_whole_file_reads_listed_are_still_there():
    assert {(name, function) for name, function, _ in _pydicom_reads()} >= set(WHOLE_FILE_READS)


def test_one_conftest_for_the_whole_suite():
    """Tests import the shared helpers with ``from conftest import ...`` (pytest's ``pythonpath = tests``): a
    second conftest.py in a sub-folder takes that module name when its folder is collected first, and every
    later ``from conftest import`` of the suite fails to collect."""
    assert sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("conftest.py")) == [
        "tests/conftest.py"
    ]
