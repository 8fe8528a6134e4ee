"""The official checkpoint's exported graphs, made once per test run and copied into the caches of the tests
that start from a cache holding them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def exported_graphs(tmp_path_factory, runner) -> Path:
    """A cache root whose ``onnx/`` holds the official checkpoint's ONNX Runtime graphs, exported and
    parity-checked once for the test run (never in the user's cache). Copies keep the modification times
    (``shutil.copytree``), so their manifest vouches for them without hashing: a cache hit."""
    pytest.importorskip("onnxruntime")
    from medsam_engine.pipeline.model.build import load_graphs

    root = tmp_path_factory.mktemp("exported_graphs")
    load_graphs(runner.model, "onnxruntime", cache_root=root)
    return root


@pytest.fixture()
def seeded_graph_cache(exported_graphs, tmp_path, monkeypatch) -> Path:
    """This test's own graph cache (``$MEDSAM_ENGINE_CACHE``), holding a copy of the exported graphs."""
    root = tmp_path / "graph-cache"
    shutil.copytree(exported_graphs / "onnx", root / "onnx")
    monkeypatch.setenv("MEDSAM_ENGINE_CACHE", str(root))
    return root
