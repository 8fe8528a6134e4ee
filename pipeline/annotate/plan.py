"""The plan of a run, the same whichever engine executes it: discovery -> what to skip -> shards.

:func:`discover_inputs` lists the cases of the inputs (each case once); :func:`plan_run` decides, per case,
whether there is work: a case committed with the same signature is skipped, and one quarantined under the same
signature is left out where the run honours quarantine; :meth:`RunPlan.shards` groups the cases to annotate so
that every shard holds about as many slices (a slice never crosses shards). The local engine runs one shard
in its process, the Ray engine one per actor; both then run each case through the one per-case driver
(pipeline/annotate/driver.py), which checks the commit again under the case's lease.

Slice counts come from headers only (NIfTI/NRRD headers, the number of files of a DICOM series,
NumberOfFrames of a multi-frame object), read in a thread pool: no pixel data is decoded here.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.signature import signature_or_none
from medsam_engine.pipeline.core.outcome import CaseOutcome
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.dicom_header import read_dicom_header
from medsam_engine.pipeline.io.discover import DiscoveryOptions, discover
from medsam_engine.pipeline.io.formats import NIFTI, NRRD, format_of
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import quarantined

log = logging.getLogger(__name__)


def _nifti_slices(path: Path) -> int:
    import nibabel as nib

    image = nib.load(str(path))  # reads the header; the data stays on disk
    shape = image.shape
    if len(shape) < 3:
        return 1
    codes = nib.aff2axcodes(image.affine)
    axial = [i for i, code in enumerate(codes[:3]) if code in ("S", "I")]
    return int(shape[axial[0]] if axial else shape[2])


def _nrrd_slices(path: Path) -> int:
    import nrrd
    import numpy as np

    header = nrrd.read_header(str(path))
    sizes = [int(s) for s in header["sizes"]]
    if len(sizes) < 3:
        return 1
    directions = header.get("space directions")
    try:
        spatial = [i for i, d in enumerate(directions) if d is not None and np.all(np.isfinite(d))]
        axial = max(spatial, key=lambda i: abs(float(np.asarray(directions[i])[2])))
        return sizes[axial]
    except (TypeError, ValueError, IndexError):
        return sizes[-1]


def _frames(case: CaseRef) -> int:
    """A multi-frame DICOM case's frames: as discovery read them, else from the file's header."""
    if case.frames is not None:
        return case.frames
    header = read_dicom_header(case.files[0], tags=["NumberOfFrames"])
    return int(getattr(header, "NumberOfFrames", 1) or 1)


def estimate_slices(case: CaseRef) -> int:
    """The number of axial slices the case has, from headers; 0 for a case that will fail at reading, 1 when
    the headers do not say."""
    if case.error:
        return 0
    try:
        if case.kind == "dicom-series":
            return len(case.files)
        if case.kind == "dicom-multiframe":
            return _frames(case)
        fmt = format_of(case.image)
        if fmt is NIFTI:
            return _nifti_slices(Path(case.image))
        if fmt is NRRD:
            return _nrrd_slices(Path(case.image))
    except Exception as exc:
        log.debug("case %s: no slice count from its header (%s)", case.case_id, type(exc).__name__)
    return 1


def slice_counts(cases: list[CaseRef], *, workers: int = 8) -> list[int]:
    """:func:`estimate_slices` of every case, in the order given (headers read in ``workers`` threads)."""
    if not cases:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(cases))) as pool:
        return list(pool.map(estimate_slices, cases))


def balance(weights: list[int], shards: int) -> list[list[int]]:
    """Indices of ``weights`` split into at most ``shards`` non-empty groups of near-equal total (largest
    first into the lightest group; each case also costs 1 for its fixed overhead). Order within a group
    follows the input order."""
    if shards < 1:
        raise ValueError(f"Argument 'shards' must be at least 1; got {shards}")
    heap = [(0, index) for index in range(min(shards, len(weights)))]
    groups: list[list[int]] = [[] for _ in heap]
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        load, index = heapq.heappop(heap)
        groups[index].append(item)
        heapq.heappush(heap, (load + weights[item] + 1, index))
    return [sorted(group) for group in groups if group]


def discover_inputs(
    inputs: Sequence[str | Path],
    store: CaseStore,
    *,
    coarse_masks: Sequence[str | Path] = (),
    options: DiscoveryOptions | None = None,
) -> list[CaseRef]:
    """Every case under ``inputs`` (pipeline.io.discover), each once: an input given twice, or reached through
    two inputs, is one case (the first)."""
    seen: set[str] = set()
    cases = []
    for case in discover(list(inputs), store.case_ids(), coarse_masks=list(coarse_masks), options=options):
        if case.case_id not in seen:
            seen.add(case.case_id)
            cases.append(case)
    return cases


SKIPPED_REASON = "already committed with the same signature"
QUARANTINED_REASON = "failed before under the same signature (quarantined; --retry-quarantined tries it)"


@dataclass(frozen=True)
class RunPlan:
    """The cases of a run split by what is to be done: ``todo`` (annotate), ``skipped`` (committed with the
    same signature) and ``quarantined`` (failed before under the same signature)."""

    todo: tuple[CaseRef, ...]
    skipped: tuple[CaseRef, ...] = ()
    quarantined: tuple[CaseRef, ...] = ()

    def settled(self) -> list[CaseOutcome]:
        """The outcomes of the cases with nothing to do, with their reasons."""
        return [CaseOutcome(c.case_id, "skipped", reason=SKIPPED_REASON) for c in self.skipped] + [
            CaseOutcome(c.case_id, "quarantined", reason=QUARANTINED_REASON) for c in self.quarantined
        ]

    def shards(self, count: int) -> list[list[CaseRef]]:
        """``todo`` in at most ``count`` groups of about equal slice counts (read from headers)."""
        todo = list(self.todo)
        return [[todo[i] for i in group] for group in balance(slice_counts(todo), count)]


def plan_run(
    cases: Sequence[CaseRef],
    store: CaseStore,
    config: EngineConfig,
    *,
    model_identity: Callable[[], str],
    honour_quarantine: bool,
    workers: int = 8,
) -> RunPlan:
    """Which ``cases`` have work to do under ``config`` and the model whose sha256 ``model_identity()``
    gives (asked only when needed: a user's checkpoint is hashed from disk). A case's signature is computed
    only when the store holds something to compare it with (a commit, or a quarantine record when
    ``honour_quarantine``); a case whose inputs cannot be read, or that replaces a failed download, is left
    to do (its driver records why, or closes the old failure)."""

    def verdict(case: CaseRef) -> str:
        if case.error or case.supersedes:
            return "todo"
        try:
            attrs = store.case_attrs(case.case_id)
            held = quarantined(store, case.case_id) if honour_quarantine else None
        except OSError:  # a store that does not answer: the driver meets it again and says why
            return "todo"
        if attrs is None and held is None:
            return "todo"
        signature = signature_or_none(case, config, model_identity())
        if signature is None:
            return "todo"
        if attrs is not None and attrs.get("signature") == signature:
            return "skipped"
        return "quarantined" if held is not None and held.get("signature") == signature else "todo"

    if not cases:
        return RunPlan(())
    with ThreadPoolExecutor(max_workers=min(workers, len(cases))) as pool:
        verdicts = list(pool.map(verdict, cases))
    split = {
        kind: tuple(c for c, v in zip(cases, verdicts, strict=True) if v == kind)
        for kind in ("todo", "skipped", "quarantined")
    }
    return RunPlan(split["todo"], split["skipped"], split["quarantined"])
