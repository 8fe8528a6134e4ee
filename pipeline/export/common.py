"""What every export shares: its errors, its report, and the per-case loop.

Every export writes each file under a temporary name, re-reads it, compares it with the store and only then
gives it its final name. Cases an export cannot represent (a SEG for a NIfTI input, COCO for a 3D volume) are
skipped with a reason per case; everything else that goes wrong is a bug and propagates. Every export folder
gets cases.csv, which maps each file to its case and input (pipeline/export/traceable.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from medsam_engine.pipeline.core.errors import CaseError
from medsam_engine.pipeline.core.geometry import to_source_grid
from medsam_engine.pipeline.core.types import CaseAttributes, Geometry
from medsam_engine.pipeline.export.traceable import CaseSource, case_sources, export_names, write_cases_csv
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.labels_meta import LabelMeaning, describe_labels, meanings_from_properties


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
    by design, e.g. not accepted in review (``excluded``), each with its reason; ``outputs`` the files of
    each written case relative to the export folder, and ``cases_csv`` the path (or URL) of its cases.csv."""

    format: str
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    cases_csv: str | None = None

    def write_cases_csv(self, out: Path, sources: dict[str, CaseSource]) -> None:
        """Write OUT/cases.csv for the cases of ``sources`` this report considered."""
        path = write_cases_csv(
            out, sources, outputs=self.outputs, skipped=self.skipped, excluded=self.excluded
        )
        self.cases_csv = str(path)


def label_meanings(
    store: CaseStore, case_id: str, values: list[int], attrs: CaseAttributes
) -> list[LabelMeaning]:
    """The meaning (name, codes, colour) of each of ``values`` in a committed case: as the store recorded it,
    else described from the name and the case's lineage (pipeline/store/labels_meta.py)."""
    known = meanings_from_properties(store.label_properties(case_id))
    missing = describe_labels([v for v in values if v not in known], instances=list(attrs.instances))
    known.update({m.value: m for m in missing})
    return [known[v] for v in values]


def label_map_on_source(labels_zyx: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The store's (z, y, x) label map in the input file's own (i, j, k) voxel order."""
    return to_source_grid(labels_zyx, geometry)


class CaseWriter(Protocol):
    """Writes one case's file into ``out``, named ``name`` plus the format's suffix; returns its path."""

    def __call__(self, store: CaseStore, case_id: str, out: Path, *, name: str | None = None) -> Path: ...


def per_case(write: CaseWriter) -> Callable[..., ExportReport]:
    """An exporter that runs ``write`` per committed case (files named by case id, or with ``name_by``
    "input" by input: pipeline/export/traceable.py), records ExportErrors as skipped cases, and writes
    cases.csv."""

    def run(store: CaseStore, out: Path, *, name_by: str = "id") -> ExportReport:
        report = ExportReport(format="")
        sources = case_sources(store, store.committed_cases())
        names = export_names(sources, name_by)
        for case_id in sources:
            try:
                path = write(store, case_id, out, name=names[case_id])
            except ExportError as exc:
                report.skipped[case_id] = exc.reason
                continue
            report.written.append(str(path))
            report.outputs[case_id] = [path.relative_to(out).as_posix()]
        report.write_cases_csv(out, sources)
        return report

    return run
