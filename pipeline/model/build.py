"""Building a runner: the checkpoint's graphs for the chosen runtime (from the cache, else exported and
parity-checked) handed to :class:`~pipeline.model.runner.LiteMedSAMRunner`, or eager torch.

``auto`` takes the fastest CPU runtime that builds and passes parity, else eager torch (always on CUDA). A
cache hit never imports torch; a miss imports pipeline/model/graph_export.py (torch) to export.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medsam_engine.pipeline.model.checkpoint import LoadedModel
from medsam_engine.pipeline.model.graph_cache import (
    AUTO_ORDER,
    RUNTIMES,
    BackendError,
    Graphs,
    load_cached,
    runtime_version,
)
from medsam_engine.pipeline.model.runner import LiteMedSAMRunner, check_graph_backend

log = logging.getLogger(__name__)


def load_graphs(
    model: LoadedModel, runtime: str, *, cache_root: str | Path | None = None, threads: int | None = None
) -> Graphs:
    """Both graphs of ``model`` compiled by ``runtime``: from the cache when its manifest vouches for them,
    else exported (or copied from another runtime's folder) and parity-checked first."""
    if runtime not in RUNTIMES:
        raise ValueError(f"Argument 'runtime' must be one of {', '.join(RUNTIMES)}; got {runtime!r}.")
    graphs = load_cached(model.sha256, runtime, cache_root=cache_root, threads=threads)
    if graphs is not None:
        return graphs
    from medsam_engine.pipeline.model.graph_export import (
        provide_graphs,
    )  # imports torch: only on a cache miss

    return provide_graphs(model, runtime, cache_root=cache_root, threads=threads)


def auto_candidates(device: str) -> list[str]:
    """Backends ``auto`` tries, in order: eager torch on CUDA; on CPU the installed runtimes, fastest first,
    then eager torch."""
    if device != "cpu":
        return ["torch"]
    installed = []
    for runtime in AUTO_ORDER:
        try:
            runtime_version(runtime)
        except ImportError:
            continue
        installed.append(runtime)
    return [*installed, "torch"]


def _runner(model: LoadedModel, device: str, backend: str, options: dict) -> LiteMedSAMRunner:
    check_graph_backend(model, device, backend)
    if backend == "torch":
        return LiteMedSAMRunner(model, device=device, backend="torch", **options)
    return LiteMedSAMRunner(
        model, device=device, backend=backend, graphs=load_graphs(model, backend), **options
    )


def build_runner(
    model: LoadedModel, *, device: str = "cpu", backend: str = "auto", **options
) -> LiteMedSAMRunner:
    """A runner on ``backend``; ``auto`` takes the first of :func:`auto_candidates` that builds and passes
    parity (a runtime that fails is logged and skipped; eager torch always works). ``options`` go to the
    runner (``cache_bytes``, ``precision``)."""
    if backend == "auto" and model.kind != "lite":
        backend = "torch"  # the exported graphs are LiteMedSAM's; a ViT checkpoint runs in eager torch
    if backend != "auto":
        return _runner(model, device, backend, options)
    for candidate in auto_candidates(device)[:-1]:
        try:
            return _runner(model, device, candidate, options)
        except (BackendError, ImportError) as exc:
            log.warning("backend %s unavailable (%s); trying the next", candidate, exc)
    return _runner(model, device, "torch", options)
