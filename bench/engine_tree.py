"""Which engine a bench's child process imports: this tree's, or an older checkout's under ``--baseline`` /
``--before``.

An installed engine maps the layer folders of its checkout into ``medsam_engine.*`` (an editable install
through an import hook that comes after ``PYTHONPATH``), so a child given only ``PYTHONPATH=<older
checkout>`` would still import this tree's layers under that checkout's ``medsam_engine/__init__.py``.
:func:`engine_env` gives the child a folder whose ``medsam_engine`` package links the checkout's own layer
folders; a checkout from before the namespace has top-level ``pipeline`` instead, named by
``BENCH_ENGINE_PACKAGE`` for :func:`engine`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

# the engine's package in this process: a child's environment names it (`pipeline` before the namespace)
ENGINE_PACKAGE = os.environ.get("BENCH_ENGINE_PACKAGE", "medsam_engine.pipeline")
LAYERS = ("pipeline", "flows", "detectors", "postprocess")


def engine(module: str = "") -> ModuleType:
    """The engine's module ``module`` (e.g. ``"annotate.job"``; the package itself when empty)."""
    return importlib.import_module(f"{ENGINE_PACKAGE}.{module}" if module else ENGINE_PACKAGE)


def engine_env(checkout: Path, links: Path) -> dict[str, str]:
    """The environment of a child that imports the engine of ``checkout`` (a git worktree or this tree);
    ``links`` is an empty folder for the package of links, kept while the child runs."""
    checkout = checkout.resolve()
    if not (checkout / "medsam_engine").is_dir():  # before the namespace: `pipeline` at the top
        return dict(os.environ, PYTHONPATH=str(checkout), BENCH_ENGINE_PACKAGE="pipeline")
    package = links / "medsam_engine"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (checkout / "medsam_engine").iterdir():
        if entry.suffix == ".py":
            (package / entry.name).symlink_to(entry)
    for layer in LAYERS:
        if (checkout / layer).is_dir():
            (package / layer).symlink_to(checkout / layer, target_is_directory=True)
    return dict(os.environ, PYTHONPATH=str(links), BENCH_ENGINE_PACKAGE="medsam_engine.pipeline")
