"""MedSAM Data Engine: batch pre-annotation of medical image archives with LiteMedSAM and a data-engine loop.

The layer packages live under this namespace (``medsam_engine.pipeline``, ``medsam_engine.flows``,
``medsam_engine.detectors``, ``medsam_engine.postprocess``; docs/architecture.md). The Python API
(:mod:`medsam_engine.pipeline.api`) is re-exported here and imported on first use, so importing a layer module
does not load the model's libraries.
"""

from __future__ import annotations

__all__ = [
    "BoxPrompt",
    "CaseStore",
    "EngineConfig",
    "RunSummary",
    "annotate",
    "open_store",
    "read_case",
    "segment",
]


def __getattr__(name: str):
    if name in __all__:
        from medsam_engine.pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'medsam_engine' has no attribute {name!r}")
