"""What every export shares: its errors, its report, and the per-case loop.

Every export writes each file under a temporary name, re-reads it, compares it with the store and only then
gives it its final name. Cases an export cannot represent (a SEG for a NIfTI input, COCO for a 3D volume) are
skipped with a reason per case; everything else that goes wrong is a bug and propagates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.core.errors import CaseError
from medsam_engine.pipeline.core.geometry import to_source_grid
from medsam_engine.pipeline.core.types import Geometry
from medsam_engine.pipeline.store.case_store import CaseStore


class ExportError(CaseError):
    """This case cannot be written in the asked format (the reason says why and what to use instead)."""

    stage = "export"


class ExportTargetError(ValueError):
    """The output folder cannot take the export (it holds files this engine did not write there)."""


class ExportCheckError(RuntimeError):
    """A written file did not read back identically to the store: a bug, never a per-case condition."""


@dataclass
class ExportReport:
    """What an export wrote (paths or URLs); the cases it could not write (``skipped``) and those it left out
    by design, e.g. not accepted in review (``excluded``), each with its reason."""

    format: str
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


def label_map_on_source(labels_zyx: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The store's (z, y, x) label map in the input file's own (i, j, k) voxel order."""
    return to_source_grid(labels_zyx, geometry)


def per_case(write: Callable[[CaseStore, str, Path], Path]) -> Callable[[CaseStore, Path], ExportReport]:
    """An exporter that runs ``write`` per committed case and records ExportErrors as skipped cases."""

    def run(store: CaseStore, out: Path) -> ExportReport:
        report = ExportReport(format="")
        for case_id in store.committed_cases():
            try:
                report.written.append(str(write(store, case_id, out)))
            except ExportError as exc:
                report.skipped[case_id] = exc.reason
        return report

    return run
