"""The one per-case driver: :func:`run_case` takes a case from its signature to a committed store group or a
recorded failure, under one :class:`~pipeline.annotate.policy.FailurePolicy`. The local engine
(pipeline/annotate/job.py), the Ray actors (pipeline/distributed/ray_pool.py) and the flywheel's rounds all
run cases through it, so a case fails, retries and is quarantined the same way wherever it runs.

Per case: download (a DICOMweb series, by whoever annotates it; not when a download of as many instances
gave the committed signature) -> signature (a committed case with the same one is skipped without loading the
model) -> read -> prompts (the configured detector) -> LiteMedSAM (slice or
propagate mode) -> post-processing -> quality scores -> commit (the store's commit marker is written last).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsam_engine.detectors.coarse_mask import object_boxes
from medsam_engine.detectors.protocol import Detection
from medsam_engine.detectors.registry import build_detector, get_spec
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.annotate.policy import (
    LOCAL,
    RETRY_NEXT_RUN,
    FailurePolicy,
    failure_of,
    with_retries,
)
from medsam_engine.pipeline.annotate.propagate import PropagateRules, propagate_volume
from medsam_engine.pipeline.annotate.quality import quality_attrs
from medsam_engine.pipeline.annotate.rendering import default_decoder_batch, effective_modality, renderings
from medsam_engine.pipeline.annotate.segment import segment_volume
from medsam_engine.pipeline.annotate.signature import (
    committed_with,
    signature_or_none,
    signature_or_read_error,
    signed_with,
)
from medsam_engine.pipeline.core.errors import (
    CaseError,
    PromptError,
    RunError,
    StoreConflictError,
    StoreUnavailableError,
    resource_fault,
)
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.outcome import CaseOutcome
from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.core.types import BoxPrompt, CaseRef, ObjectBox, Volume
from medsam_engine.pipeline.export.traceable import DICOM_KINDS
from medsam_engine.pipeline.io.cache import DICOMWEB_SERIES, remember_digest
from medsam_engine.pipeline.io.channels import select_channel
from medsam_engine.pipeline.io.dicom_scan import dicom_ids
from medsam_engine.pipeline.io.discover import materialise
from medsam_engine.pipeline.io.readers import label_names_of, read_case, read_volume
from medsam_engine.pipeline.store.case_store import UNREAD, CaseStore
from medsam_engine.pipeline.store.leases import Lease, holder, leased
from medsam_engine.pipeline.store.records import quarantine
from medsam_engine.postprocess.chain import apply_chain

log = logging.getLogger(__name__)


@contextlib.contextmanager
def timed(stages: dict[str, float] | None, name: str):
    """Add the block's wall seconds to ``stages[name]`` (nothing when ``stages`` is None)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if stages is not None:
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - start


def write_case_manifest(store: CaseStore, case: CaseRef, *, given: str | None = None) -> None:
    """Record what the case is made of (its inputs, series and kind): ``given`` is the input as the user gave
    it (default ``case.image``; a DICOMweb series' URL without its instance count), and the image, files and
    coarse mask are absolute paths for local inputs (URLs as they are), so that exports and reviews find
    them from any working directory. An nnU-Net case also records its channel files (``channels``), the
    channel segmented (``channel``, whose file ``image`` is) and the channels' names where known. A DICOM
    case's Study/SeriesInstanceUID and SeriesNumber are recorded too (``dicom``): its files may be a download
    the cache drops once the case is committed, and a review from the PACS and the exports' cases.csv still
    need them."""
    given = case.image if given is None else given
    record = {
        "case_id": case.case_id,
        "given": given.partition("#")[0] if "://" in given else given,
        "image": _absolute(case.image),
        "series": case.series,
        "files": [_absolute(f) for f in case.files],
        "coarse_mask": _absolute(case.coarse_mask) if case.coarse_mask else case.coarse_mask,
        "kind": case.kind,
    }
    if case.channels:  # an nnU-Net case: all its channel files, and the one segmented
        record["channels"] = [_absolute(c) for c in case.channels]
        record["channel"] = case.channel
        if case.channel_names:
            record["channel_names"] = list(case.channel_names)
    ids = dicom_ids(case.files[0] if case.files else case.image) if case.kind in DICOM_KINDS else ()
    if any(ids):
        record["dicom"] = dict(zip(("study_uid", "series_uid", "series_number"), ids, strict=True))
    store.write_manifest(case.case_id, record)


def _absolute(path: str) -> str:
    """A local path made absolute (symbolic links kept as given); a URL as it is."""
    return path if "://" in path else os.path.abspath(path)


MAX_LABEL = 65535  # label maps are stored as uint16


def label_values(coarse: np.ndarray) -> np.ndarray:
    """A coarse mask as integer labels; PromptError for values no label map holds (fractions, negatives,
    beyond uint16) rather than prompts made from a probability map or an image given by mistake."""
    if not np.issubdtype(coarse.dtype, np.integer):
        if not np.all(np.isfinite(coarse)):
            raise PromptError("coarse mask holds NaN or infinite values; give an integer label map")
        rounded = np.rint(coarse)
        off = np.abs(coarse - rounded) > 1e-3
        if off.any():
            example = float(coarse[off][0])
            raise PromptError(
                f"coarse mask holds {int(off.sum())} non-integer values (e.g. {example:g}); give an "
                "integer label map (threshold a probability map first)"
            )
        coarse = rounded.astype(np.int64)
    low, high = int(coarse.min(initial=0)), int(coarse.max(initial=0))
    if low < 0:
        raise PromptError(
            f"coarse mask holds negative labels (down to {low}); label values are 0 (background) or positive"
        )
    if high > MAX_LABEL:
        raise PromptError(
            f"coarse mask holds label {high}, beyond {MAX_LABEL}; is it an image rather than a label map?"
        )
    return coarse


def case_prompts(
    case: CaseRef, volume: Volume, config: EngineConfig, runner: LazyRunner
) -> tuple[np.ndarray | None, Detection, dict[int, str]]:
    """The case's coarse label map (given or found), the configured detector's Detection (box prompts, and
    seed objects, warnings and prompt origins where it has them), and the label names (from the coarse
    mask's file, then the detector's, then the configured label table, whose entries also carry SNOMED codes
    and colours)."""
    coarse = None
    if case.coarse_mask:
        coarse = align_to(read_volume(case.coarse_mask), volume, what="coarse mask")
        if coarse.ndim == 4:
            raise PromptError("coarse mask is a colour image; give a label map")
        coarse = label_values(coarse)
    section = config.prompts
    try:
        detector = build_detector(
            section.detector, rules=section.box_rules(), options=section.options, runner=runner, case=case
        )
        detection = detector(volume, coarse)
    except ValueError as exc:
        raise PromptError(str(exc)) from exc
    names: dict = dict(label_names_of(case.coarse_mask)) if case.coarse_mask else {}
    names.update(detection.label_names)
    names.update(config.label_specs())  # the user's label table has the last word
    return detection.label_map, detection, names


def clean(
    label_map: np.ndarray, volume: Volume, config: EngineConfig, values: list[int] | None = None
) -> tuple[np.ndarray, dict]:
    """The configured post-processing chain on the label map (whose present label ``values`` the caller may
    know); returns the new map and its lineage."""
    modality = effective_modality(volume, config)
    kind = "2D" if volume.is_2d else modality if modality in ("CT", "MR") else "OT"
    section = config.postprocess
    return apply_chain(
        label_map,
        spacing=volume.spacing,
        chain=section.chain_for(kind),
        per_label=section.per_label or None,
        values=values,
    )


def present_after(records) -> list[int]:
    """The label values a segmented map holds, from its lineage rather than a pass over the map: labels
    whose instances claimed voxels."""
    return sorted({int(r.label) for r in records if r.voxels > 0})


def annotate_case(
    case: CaseRef,
    volume: Volume,
    store: CaseStore,
    config: EngineConfig,
    runner: LazyRunner,
    *,
    signature: dict,
    overwrite: bool,
    progress=None,
    lease: Lease | None = None,
    model_lock=None,
    current: dict | object | None = UNREAD,
    stages: dict[str, float] | None = None,
) -> int:
    """Prompt, segment, clean and commit one read case; returns the number of slices segmented. Raises
    CaseError for expected failures, StoreConflictError when ``lease`` was taken over by another run while
    this one worked (it commits instead).

    Only the model's work holds ``model_lock`` (the segmentation, and the prompts of a detector that runs the
    model): prompts, renderings, post-processing, quality scores and the commit of concurrent calls overlap
    it. With ``pipeline.batch_across_cases`` (default on a GPU) the lock is held per model call instead of per
    case, and the encoder calls of concurrent cases share batches (:mod:`pipeline.annotate.shared_runner`).
    """
    lock = model_lock or contextlib.nullcontext()
    with timed(stages, "prompts"):
        with lock if get_spec(config.prompts.detector).needs_model else contextlib.nullcontext():
            coarse, detection, label_names = case_prompts(case, volume, config, runner)
        prompts, objects = detection.prompts, detection.objects
        if objects is not None:  # seeds with open ranges (marks): propagated whatever the configured mode
            config = config.with_overrides(model={"mode": "propagate"})
        kinds = detection.window_kinds
        rendered, window_of, windows = renderings(volume, coarse, prompts, config, window_kinds=kinds)
    slices = len({p.z for p in prompts}) if objects is None else volume.shape[0]
    with timed(stages, "model"):  # with the wait for the model, when other cases hold it
        model = runner.get()
        batch = encoder_batch(model, config)
        if model_lock is not None and batch_across_cases(model, config):
            shared = runner.shared(model_lock, batch)
            label_map, records = _segment(
                rendered, prompts, window_of, config, shared, progress, slices, batch, objects=objects
            )
        else:
            with lock:
                label_map, records = _segment(
                    rendered, prompts, window_of, config, model, progress, slices, batch, objects=objects
                )
    with timed(stages, "clean"):
        label_map, cleaning = clean(label_map, volume, config, present_after(records))
    attrs = {
        "case_id": case.case_id,
        "geometry": volume.geometry.to_json(),
        "modality": effective_modality(volume, config),
        "signature": signature,
        **quality_attrs(store, config, label_map, records),  # instances with quality scores; routing
        "prompts": len(prompts),
        "ct_windows": {str(k): list(v) for k, v in windows.items()},
        "postprocess": cleaning,
        "config": config.model_dump(mode="json"),
        "committed_at": utc_stamp(),
    }
    with_detection_notes(attrs, detection)
    image = volume.array if config.store.write_image else None
    if lease is not None and lease.lost:
        raise StoreConflictError(
            "another run took this case over while this one worked (its lease expired); that run commits it",
            case_id=case.case_id,
        )
    with timed(stages, "commit"):
        store.commit_case(
            case.case_id,
            labels=label_map,
            attrs=attrs,
            image=image,
            overwrite=overwrite,
            label_names=label_names,
            supersedes=case.supersedes,
            current=current,
            voxels={int(r["label"]): int(r["voxels_after"]) for r in cleaning["labels"]},
            keep_versions=config.store.keep_versions,
        )
    return slices


def with_detection_notes(attrs: dict, detection: Detection) -> None:
    """Add what the detector could not use (``prompt_warnings``) and each instance's prompt origin
    (``prompt_origin`` in its lineage record) to a case's attributes."""
    if detection.warnings:
        attrs["prompt_warnings"] = list(detection.warnings)
    if detection.origins:
        attrs["instances"] = [
            dict(i, prompt_origin=detection.origins[(i["label"], i["instance"])])
            if (i["label"], i["instance"]) in detection.origins
            else i
            for i in attrs["instances"]
        ]


def encoder_batch(model, config: EngineConfig) -> int:
    """Slices per encoder call: the configured number, else 1 on CPU and on CUDA as many as fit half the
    free device memory (measured once per runner)."""
    return config.model.encoder_batch or model.memory_batch()


def batch_across_cases(model, config: EngineConfig) -> bool:
    """Whether concurrent cases share encoder batches (configured, else on CUDA)."""
    wanted = config.pipeline.batch_across_cases
    return str(model.device).startswith("cuda") if wanted is None else wanted


def _segment(
    rendered,
    prompts: list[BoxPrompt],
    window_of: dict[int, str],
    config: EngineConfig,
    model,
    progress,
    slices: int,
    batch: int,
    *,
    objects: list[ObjectBox] | None = None,
):
    """The model's part of a case: (label map, instance records) in the configured mode; ``objects`` are
    the detector's seed objects (propagated), else the prompts' objects in propagate mode."""
    if progress is not None:
        progress.reset(total=slices)
    on_slice = None if progress is None else lambda: progress.update(1)
    if config.model.mode == "propagate":
        rules = PropagateRules(**config.propagate.model_dump())
        return propagate_volume(
            model,
            rendered,
            object_boxes(prompts) if objects is None else objects,
            window_of=window_of,
            rules=rules,
            model_name=model.model.name,
            on_slice=on_slice,
            jitter=config.quality.jitter(),
            open_range=objects is not None,
        )
    cuda = str(model.device).startswith("cuda")
    return segment_volume(
        model,
        rendered,
        prompts,
        window_of=window_of,
        model_name=model.model.name,
        on_slice=on_slice,
        encoder_batch=batch,
        decoder_batch=config.model.decoder_batch or default_decoder_batch(model, cuda),
        jitter=config.quality.jitter(),
    )


@dataclass(frozen=True)
class Segmented:
    """A case segmented but not committed: the cleaned (z, y, x) label map, its instance records
    (InstanceRecord), each label's CT window as (level, width) in HU (empty for other modalities) and the
    post-processing lineage."""

    labels: np.ndarray
    records: list
    windows: dict
    cleaning: dict


def segment_detection(
    volume: Volume, detection: Detection, config: EngineConfig, runner: LazyRunner
) -> Segmented:
    """The model's part of :func:`annotate_case` and the post-processing chain for a Detection on a read
    volume, one case at a time and without a commit (the flywheel segments the new findings of a reviewed
    case so, then merges them with what the reviewer accepted). Seed objects (marks) are propagated whatever
    the configured mode."""
    prompts, objects = detection.prompts, detection.objects
    if objects is not None:
        config = config.with_overrides(model={"mode": "propagate"})
    rendered, window_of, windows = renderings(
        volume, detection.label_map, prompts, config, window_kinds=detection.window_kinds
    )
    model = runner.get()
    slices = len({p.z for p in prompts}) if objects is None else volume.shape[0]
    label_map, records = _segment(
        rendered,
        prompts,
        window_of,
        config,
        model,
        None,
        slices,
        encoder_batch(model, config),
        objects=objects,
    )
    label_map, cleaning = clean(label_map, volume, config, present_after(records))
    return Segmented(label_map, list(records), windows, cleaning)


def _already_committed(store: CaseStore, case: CaseRef, node: str) -> CaseOutcome:
    """The outcome of a case committed with the same signature; the failure of its input's download on an
    earlier run, if any, is over."""
    if case.supersedes:
        store.close_failures(case.supersedes)
    return CaseOutcome(case.case_id, "skipped", reason="already committed with the same signature", node=node)


def _attempt(case: CaseRef, run: RunContext, *, progress, node: str) -> CaseOutcome:
    store, config, runner = run.store, run.config, run.runner
    start = time.perf_counter()
    given, listed = case.image, case
    if listed.kind == DICOMWEB_SERIES:  # downloaded before with as many instances: its digest is known
        known = signature_or_none(listed, config, runner.model_sha256)
        if known is not None and committed_with(store, case.case_id, known):
            return _already_committed(store, case, node)
    case = materialise(case, store.cache_dir())  # a DICOMweb series is downloaded here
    case = select_channel(case, config.input.channel, config.input.channel_names)  # nnU-Net's channels
    signature = signature_or_read_error(case, config, runner.model_sha256)
    if listed.kind == DICOMWEB_SERIES:  # the download goes once the run is done with it; its digest stays
        remember_digest(store.cache_dir(), listed, signature["input_sha256"])
    if committed_with(store, case.case_id, signature):
        return _already_committed(store, case, node)
    with leased(store, case.case_id, run_id=run.run_id, ttl_s=config.store.lease_ttl_s) as lease:
        if lease is None:
            other = (holder(store, case.case_id) or {}).get("run_id", "another run")
            return CaseOutcome(case.case_id, "skipped", reason=f"in progress in run {other}", node=node)
        current = store.case_attrs(case.case_id)  # read once under the lease: the commit needs no second read
        if signed_with(current, signature):
            return CaseOutcome(
                case.case_id, "skipped", reason="committed meanwhile by another run", node=node
            )
        runner.prefetch()  # the model loads while the case is read and prompted
        stages: dict[str, float] = {}
        with timed(stages, "read"):
            volume = read_case(case)  # in a reader process of its own: overlaps other calls' work
        write_case_manifest(store, case, given=given)
        slices = annotate_case(
            case,
            volume,
            store,
            config,
            runner,
            signature=signature,
            overwrite=run.overwrite,
            progress=progress,
            lease=lease,
            model_lock=run.model_lock,
            current=current,
            stages=stages,
        )
    return CaseOutcome(
        case.case_id,
        "done",
        seconds=time.perf_counter() - start,
        slices=slices,
        node=node,
        stages=stages,
    )


@dataclass(frozen=True)
class RunContext:
    """What every case of one run shares, built once and handed to :func:`run_case`: the ``store`` it
    commits into, the engine ``config``, the model (``runner``, loaded on first use), the ``run_id`` its
    leases and records carry, the failure ``policy``, whether a case committed with another signature is
    replaced (``overwrite``), the ``model_lock`` that concurrent cases' model work takes (None: one case at a
    time), and ``node``, which names the machine in outcomes. The local engine builds one per run, a Ray actor
    one per call from the run's typed Job."""

    store: CaseStore
    config: EngineConfig
    runner: LazyRunner
    run_id: str
    policy: FailurePolicy = LOCAL
    overwrite: bool = False
    model_lock: Any = None
    node: Callable[[], str] | None = None


def run_case(case: CaseRef, run: RunContext, *, progress=None) -> CaseOutcome:
    """Annotate and commit one case of ``run`` under its policy; never raises for the case's own failure.

    Transient errors are retried; a failure is recorded in STORE/_errors with its stage and reason (and
    quarantined when the policy asks, unless the next run should simply retry it); :class:`RunError` (no
    usable model; :class:`StoreUnavailableError` when the store is full, read-only or not writable, which
    would fail every next case the same way) propagates. The run's ``model_lock`` serialises the model work
    of concurrent calls: cases run on several threads at once (the local job's and a Ray actor's case
    workers) read, prompt, clean and commit in parallel while the model works on one case at a time.
    """
    store, config, runner, policy, node = run.store, run.config, run.runner, run.policy, run.node
    where = node() if node is not None else ""
    start = time.perf_counter()
    try:
        return with_retries(lambda: _attempt(case, run, progress=progress, node=where), policy)
    except RunError:
        raise
    except Exception as exc:
        fault = None if isinstance(exc, CaseError) else resource_fault(exc)
        if fault is not None:  # the store itself cannot take writes: every next case would fail the same way
            raise StoreUnavailableError(
                f"case {case.case_id} could not be written to the store {store.url}: "
                f"{fault}; nothing half-written was kept, rerun when there is room"
            ) from exc
        stage, reason = failure_of(exc)
        log.debug("case %s:\n%s", case.case_id, traceback.format_exc())  # may name files: debug only
    log.error("case %s failed at %s: %s", case.case_id, stage, reason)
    try:
        store.record_error(case.case_id, stage=stage, reason=reason, run_id=run.run_id)
        if store.manifest(case.case_id) is None:  # failed before it was read: its input is still recorded
            write_case_manifest(store, case)
        if policy.quarantine and stage not in RETRY_NEXT_RUN:
            quarantine(
                store,
                case.case_id,
                stage=stage,
                run_id=run.run_id,
                signature=signature_or_none(case, config, runner.model_sha256),
            )
    except Exception as exc:
        why = resource_fault(exc) or f"{type(exc).__name__}: {exc}"
        raise StoreUnavailableError(
            f"the store {store.url} cannot be written ({why}) while recording that case "
            f"{case.case_id} failed at {stage}; nothing half-written was kept, rerun "
            "when the store is back"
        ) from exc
    return CaseOutcome(
        case.case_id, "failed", stage=stage, reason=reason, seconds=time.perf_counter() - start, node=where
    )
