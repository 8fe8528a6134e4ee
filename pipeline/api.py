"""The engine's Python API: annotate inputs into a store, read a case's masks, segment an in-memory volume.

    import medsam_engine as me

    summary = me.annotate(["ct.nii.gz"], "store", coarse_masks=["ct_boxes.nii.gz"])
    for case_id in me.open_store("store").committed_cases():
        labels, attrs = me.read_case("store", case_id)
    labels = me.segment(volume, [me.BoxPrompt(label=1, instance=1, z=12, box=(40, 52, 90, 101))],
    modality="CT")

Everything here is what the ``medsam-engine`` command runs; the command-line contract (README.md) is the
reference for what each option means.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.annotate.config import EngineConfig, load_config
from medsam_engine.pipeline.annotate.job import RunSummary
from medsam_engine.pipeline.annotate.job import annotate as _annotate_cases
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.annotate.plan import discover_inputs
from medsam_engine.pipeline.annotate.segment import segment_volume
from medsam_engine.pipeline.core.intensity import to_uint8
from medsam_engine.pipeline.core.types import BoxPrompt, CaseAttributes
from medsam_engine.pipeline.io.discover import DiscoveryOptions
from medsam_engine.pipeline.store.case_store import CaseStore

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


_RUNNERS: dict[str, LazyRunner] = {}  # one loaded model per configuration (its JSON), for repeated segment()


def _config(config: EngineConfig | str | Path | None) -> EngineConfig:
    return config if isinstance(config, EngineConfig) else load_config(config)


def open_store(store: str | Path | CaseStore) -> CaseStore:
    """A store (a folder or an ``s3://`` prefix) as :class:`CaseStore`; raises FileNotFoundError for a local
    folder that does not exist (writing into a new store is :func:`annotate`'s job)."""
    if isinstance(store, CaseStore):
        return store
    if "://" not in str(store) and not Path(store).is_dir():
        raise FileNotFoundError(f"no store at {store}")
    return CaseStore(store)


def annotate(
    inputs: Sequence[str | Path],
    store: str | Path | CaseStore,
    *,
    coarse_masks: Sequence[str | Path] = (),
    config: EngineConfig | str | Path | None = None,
    overwrite: bool = False,
    keep_localizers: bool = False,
) -> RunSummary:
    """Annotate ``inputs`` (files, folders, archives, ``s3://`` prefixes, a DICOMweb root) into ``store`` in
    this process, as ``medsam-engine annotate INPUT... --out STORE`` does. Boxes come from ``coarse_masks``
    (one per input, or one folder paired by file stem) or from the configured detector. Failures are recorded
    per case in the summary and the store; committed cases whose input did not change are skipped."""
    case_store = store if isinstance(store, CaseStore) else CaseStore(store)
    engine_config = _config(config)
    cases = discover_inputs(
        list(inputs),
        case_store,
        coarse_masks=list(coarse_masks),
        options=DiscoveryOptions(
            keep_localizers=keep_localizers, marks_from_pacs=engine_config.prompts.marks_from_pacs()
        ),
    )
    return _annotate_cases(cases, case_store, engine_config, overwrite=overwrite, show_progress=False)


def read_case(store: str | Path | CaseStore, case_id: str) -> tuple[np.ndarray, CaseAttributes]:
    """A committed case's (z, y, x) label map and its attributes (spacing, origin, direction, label names,
    lineage); raises KeyError for a case the store has not committed."""
    case_store = open_store(store)
    if case_id not in case_store.committed_cases():
        raise KeyError(f"case {case_id} is not committed in {case_store.root}")
    return case_store.read_labels(case_id)


def segment(
    volume: np.ndarray,
    boxes: Sequence[BoxPrompt],
    *,
    modality: str = "CT",
    config: EngineConfig | str | Path | None = None,
) -> np.ndarray:
    """Segment an in-memory (z, y, x) volume, a (y, x) image or a (y, x, 3) RGB image from box prompts
    (voxel XYXY on slice ``z``; ``z`` is 0 for a 2D image). Intensities are mapped as MedSAM's protocol maps
    ``modality`` ("CT", "MR", ...; RGB and uint8 images are used as they are); overlaps are resolved per slice
    by the model's logits. Returns a uint16 label map of the input's spatial shape; no post-processing. The
    model is loaded on the first call and kept for later calls with the same configuration."""
    engine_config = _config(config)
    array = np.asarray(volume)
    planar = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3 and array.dtype == np.uint8)
    stack = array[None] if planar else array
    if stack.ndim not in (3, 4):
        raise ValueError(f"segment: expected a (z, y, x) volume or a 2D image; got shape {array.shape}")
    rendered = stack if stack.dtype == np.uint8 else to_uint8(stack, modality, engine_config.intensity)
    key = engine_config.model_dump_json()
    runner = (_RUNNERS.get(key) or _RUNNERS.setdefault(key, LazyRunner(engine_config))).get()
    labels, _ = segment_volume(runner, rendered, list(boxes))
    return labels[0] if planar else labels
