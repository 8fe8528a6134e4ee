"""The environment table (pipeline/core/environment.py) against the code: every variable the code names or
reads is listed, every MEDSAM_ENGINE_* entry is used, and the defaults are the ones the code applies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medsam_engine.pipeline.core import limits
from medsam_engine.pipeline.core.environment import VARIABLES, engine_defaults, variable

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "pipeline" / "core" / "environment.py"
ENGINE_NAME = re.compile(r"MEDSAM_ENGINE_[A-Z0-9_]*")
# os.environ.get("X"), os.environ.setdefault("X", ...), os.environ["X"], "X" in os.environ
READ_BY_NAME = re.compile(
    r"environ(?:\.get|\.setdefault|\.pop)?\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']"
    r"|environ\[\s*[\"']([A-Z][A-Z0-9_]*)[\"']\s*\]"
    r"|[\"']([A-Z][A-Z0-9_]*)[\"']\s+(?:not\s+)?in\s+os\.environ"
)
NOT_SETTINGS = {"PYTHONPATH"}  # passed on to the reader child processes, the package root prepended
NAMES = {entry.name for entry in VARIABLES}


def _sources() -> dict[Path, str]:
    """The engine's Python files (the layer packages and the namespace package), the table left out."""
    folders = ("pipeline", "flows", "detectors", "postprocess", "medsam_engine")
    return {
        path: path.read_text()
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != TABLE
    }


def test_every_medsam_engine_name_in_the_code_is_in_the_table():
    missing = set()
    for path, text in _sources().items():
        for name in ENGINE_NAME.findall(text):
            # a prefix such as f"MEDSAM_ENGINE_DICOMWEB_{name}" must start some entry
            known = any(n.startswith(name) for n in NAMES) if name.endswith("_") else name in NAMES
            if not known:
                missing.add(f"{name} ({path.relative_to(ROOT)})")
    assert missing == set()


def test_every_variable_the_code_reads_by_name_is_in_the_table():
    read = {
        next(filter(None, groups)): path
        for path, text in _sources().items()
        for groups in READ_BY_NAME.findall(text)
    }
    assert {
        "MEDSAM_ENGINE_ID_KEY",
        "RAY_ADDRESS",
        "OMP_NUM_THREADS",
    } <= read.keys()  # the pattern finds reads
    unlisted = sorted(
        f"{name} ({path.relative_to(ROOT)})" for name, path in read.items() if name not in NAMES
    )
    assert unlisted == [f"{name} (pipeline/io/isolate.py)" for name in sorted(NOT_SETTINGS)]


def test_every_engine_variable_of_the_table_is_used_by_the_code():
    used = {name for text in _sources().values() for name in ENGINE_NAME.findall(text)}
    unused = [
        entry.name
        for entry in VARIABLES
        if entry.name.startswith("MEDSAM_ENGINE_")
        and entry.name not in used
        and not any(entry.name.startswith(prefix) for prefix in used if prefix.endswith("_"))
    ]
    assert unused == []


def test_names_are_unique_and_every_entry_has_a_meaning():
    assert len(NAMES) == len(VARIABLES)
    assert all(entry.meaning.strip() for entry in VARIABLES)
    assert all(entry.default is not None for entry in VARIABLES if entry.engine_sets)


def test_lookup_names_a_variable_the_table_lacks():
    assert variable("MEDSAM_ENGINE_PROGRESS_S").default == "30"
    with pytest.raises(KeyError, match="MEDSAM_ENGINE_NOPE"):
        variable("MEDSAM_ENGINE_NOPE")


@pytest.fixture
def clean_environment(monkeypatch):
    for entry in VARIABLES:
        monkeypatch.delenv(entry.name, raising=False)
    return monkeypatch


def test_numeric_defaults_are_what_the_code_applies_while_unset(clean_environment):
    from medsam_engine.pipeline.annotate.progress import EVERY_S, progress_interval
    from medsam_engine.pipeline.io.dicomweb import TIMEOUT_S, dicomweb_session
    from medsam_engine.pipeline.io.readers import READ_TIMEOUT_S
    from medsam_engine.pipeline.model.devices import gpu_share

    def default(name: str) -> float:
        return float(variable(name).default)

    assert progress_interval() == EVERY_S == default("MEDSAM_ENGINE_PROGRESS_S")
    assert limits.max_voxels() == limits.DEFAULT_MAX_VOXELS == default("MEDSAM_ENGINE_MAX_VOXELS")
    assert default("MEDSAM_ENGINE_READ_TIMEOUT_S") == READ_TIMEOUT_S
    assert default("MEDSAM_ENGINE_DICOMWEB_TIMEOUT_S") == TIMEOUT_S
    assert gpu_share() == default("MEDSAM_ENGINE_GPU_SHARE")
    retry = dicomweb_session("http://pacs.invalid/dicom-web").get_adapter("http://pacs.invalid").max_retries
    assert retry.total == default("MEDSAM_ENGINE_DICOMWEB_RETRIES")
    assert retry.backoff_factor == default("MEDSAM_ENGINE_DICOMWEB_BACKOFF_S")


def test_a_set_variable_overrides_the_default(clean_environment):
    from medsam_engine.pipeline.annotate.progress import progress_interval

    clean_environment.setenv("MEDSAM_ENGINE_PROGRESS_S", "300")
    clean_environment.setenv("MEDSAM_ENGINE_MAX_VOXELS", "1000")
    assert progress_interval() == 300.0
    assert limits.max_voxels() == 1000


def test_ray_runs_set_the_table_values_only_where_the_environment_has_none(clean_environment):
    import os

    from medsam_engine.pipeline.cli.ray import _quiet_defaults

    clean_environment.setenv("DO_NOT_TRACK", "0")
    _quiet_defaults()
    expected = {**engine_defaults(), "DO_NOT_TRACK": "0"}
    assert {name: os.environ[name] for name in expected} == expected
    assert set(engine_defaults()) == {
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
        "PREFECT_SERVER_ANALYTICS_ENABLED",
        "DO_NOT_TRACK",
        "RAY_USAGE_STATS_ENABLED",
    }
