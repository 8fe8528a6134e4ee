"""The annotate job: cases -> read -> prompts -> LiteMedSAM -> clean -> committed store groups.

Per-case failures (CaseError) are recorded in the store and the batch goes on; a committed case with the
same signature is skipped without loading the model.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from pipeline.config import EngineConfig
from pipeline.discover import case_content_hash, content_hash
from pipeline.errors import CaseError, PromptError
from pipeline.store import CaseStore, remove_stale_staging
from pipeline.types import CaseRef, Volume

log = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return version("medsam-engine")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class CaseOutcome:
    case_id: str
    status: str  # "done" | "skipped" | "failed"
    reason: str = ""
    seconds: float = 0.0
    slices: int = 0


@dataclass
class RunSummary:
    run_id: str
    outcomes: list[CaseOutcome] = field(default_factory=list)
    runner_stats: dict = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


class LazyRunner:
    """Loads the model on first use, so a run whose cases are all committed never loads it.

    ``prefetch`` starts the load in a background thread, so the first case's read and prompts overlap it
    (loading is mostly native work: hashing, the runtime's compiled-graph import); ``get`` waits for it and
    raises whatever the load raised (a failed load is tried again by the next ``get``).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._runner = None
        self._loading: concurrent.futures.Future | None = None
        self._lock = threading.Lock()

    def _build(self):
        from pipeline.backends import build_runner
        from pipeline.model import load_lite_medsam, resolve_device

        section = self.config.model
        device = resolve_device(section.device)
        cache_mb = section.embedding_cache_mb
        if cache_mb is None:
            cache_mb = 512 if self.config.prompts.detector == "learned" else 32
        return build_runner(load_lite_medsam(section.checkpoint, device=device, lazy=True),
                            device=device, backend=section.backend, precision=section.precision,
                            cache_bytes=cache_mb << 20)

    def _start(self) -> concurrent.futures.Future:
        with self._lock:
            if self._loading is None:
                future: concurrent.futures.Future = concurrent.futures.Future()

                def load() -> None:
                    try:
                        future.set_result(self._build())
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller of get()
                        future.set_exception(exc)

                threading.Thread(target=load, name="medsam-engine-model-load", daemon=True).start()
                self._loading = future
            return self._loading

    def prefetch(self) -> None:
        """Start loading the model in the background unless it is loaded or loading."""
        if self._runner is None:
            self._start()

    def get(self):
        if self._runner is None:
            future = self._start()
            try:
                self._runner = future.result()
            except BaseException:
                with self._lock:
                    if self._loading is future and future.done():  # an interrupted wait keeps its load
                        self._loading = None
                raise
        return self._runner

    def settle(self) -> None:
        """Wait for a background load still under way (a run whose cases all failed early leaves one),
        so no thread is left importing or compiling while the process exits; its outcome is kept for get()."""
        loading = self._loading
        if self._runner is None and loading is not None:
            concurrent.futures.wait([loading])

    def stats(self) -> dict:
        """The runner's counters, or {} when the model was never loaded."""
        return {} if self._runner is None else self._runner.stats.as_dict()

    @functools.cached_property
    def model_sha256(self) -> str:
        """The checkpoint's sha256, read once per runner (a user's checkpoint is hashed from disk)."""
        if self.config.model.checkpoint is None:
            from pipeline.model import LITE_MEDSAM_SHA256

            return LITE_MEDSAM_SHA256
        from pipeline.model import file_sha256

        return file_sha256(self.config.model.checkpoint)


def case_signature(case: CaseRef, config: EngineConfig, model_sha256: str) -> dict:
    signature = {
        "input_sha256": case_content_hash(case),
        "prompt_sha256": content_hash(case.coarse_mask) if case.coarse_mask else None,
        "model_sha256": model_sha256,
        "config_hash": config.result_hash(),
        "package_version": package_version(),
    }
    artefact = config.prompts.options.get("artefact") if config.prompts.detector == "learned" else None
    if artefact:
        signature["detector_sha256"] = content_hash(str(artefact))
    return signature


def signature_or_read_error(case: CaseRef, config: EngineConfig, model_sha256: str, *,
                            keep_transient: bool = False) -> dict:
    """The case's signature; an input that cannot be read raises ReadError naming the file and why.

    ``keep_transient`` re-raises errors worth retrying in place (pipeline/quarantine.py) as they are."""
    from pipeline.errors import ReadError

    try:
        return case_signature(case, config, model_sha256)
    except OSError as exc:
        if keep_transient:
            from pipeline.quarantine import is_transient

            if is_transient(exc):
                raise
        name = Path(exc.filename or case.image).name
        raise ReadError(f"{name}: cannot be read ({exc.strerror or exc})") from exc


def committed_with(store: CaseStore, case_id: str, signature: dict) -> bool:
    """Whether the case is committed with exactly this signature (then there is nothing to do)."""
    attrs = store.case_attrs(case_id)
    return attrs is not None and attrs.get("signature") == signature


def write_case_manifest(store: CaseStore, case: CaseRef) -> None:
    """Record what the case is made of before its work starts (its inputs, series and kind)."""
    store.write_manifest(case.case_id, {"case_id": case.case_id, "image": case.image, "series": case.series,
                                        "files": list(case.files), "coarse_mask": case.coarse_mask,
                                        "kind": case.kind})


def _modality(volume: Volume, config: EngineConfig) -> str:
    wanted = config.intensity.modality
    return volume.modality if wanted == "auto" else wanted


def _prompts(case: CaseRef, volume: Volume, config: EngineConfig, runner: "LazyRunner"):
    """The case's coarse label map (given or found) and its box prompts, from the configured detector."""
    from detectors import build_detector
    from pipeline.geometry import align_to
    from pipeline.readers import label_names_of, read_volume

    coarse = None
    if case.coarse_mask:
        coarse = align_to(read_volume(case.coarse_mask), volume, what="coarse mask")
        if coarse.ndim == 4:
            raise PromptError("coarse mask is a colour image; give a label map")
        if not np.issubdtype(coarse.dtype, np.integer):
            coarse = np.rint(coarse).astype(np.int64)
    section = config.prompts
    try:
        detector = build_detector(section.detector, rules=section.box_rules(), options=section.options,
                                  runner=runner)
        detection = detector(volume, coarse)
    except ValueError as exc:
        raise PromptError(str(exc)) from exc
    names = dict(label_names_of(case.coarse_mask)) if case.coarse_mask else {}
    names.update(detection.label_names)
    return detection.label_map, detection.prompts, names


def _clean(label_map: np.ndarray, volume: Volume, config: EngineConfig) -> tuple[np.ndarray, dict]:
    """The configured post-processing chain on the label map; returns the new map and its lineage."""
    from postprocess.chain import apply_chain

    modality = _modality(volume, config)
    kind = "2D" if volume.is_2d else modality if modality in ("CT", "MR") else "OT"
    section = config.postprocess
    return apply_chain(label_map, spacing=volume.spacing, chain=section.chain_for(kind),
                       per_label=section.per_label or None)


def _renderings(volume: Volume, coarse: np.ndarray | None, prompts, config: EngineConfig):
    """uint8 renderings of the volume per intensity window, and each label's window name."""
    from pipeline.preprocess import IntensityConfig, choose_ct_windows, to_uint8

    section = config.intensity
    modality = _modality(volume, config)
    base = IntensityConfig(section.ct_level, section.ct_width, section.lower_percentile, section.upper_percentile)
    if modality != "CT":
        return {"default": to_uint8(volume.array, modality, base)}, {}, {}
    labels = sorted({p.label for p in prompts})
    windows = choose_ct_windows(volume.array, coarse, labels, default=(section.ct_level, section.ct_width),
                                lung=section.lung_window, bone=section.bone_window,
                                explicit=section.label_windows, auto=section.ct_window == "auto")
    names = {label: f"{level:g}/{width:g}" for label, (level, width) in windows.items()}
    renderings = {}
    for label, (level, width) in windows.items():
        if names[label] not in renderings:
            config_w = IntensityConfig(level, width, section.lower_percentile, section.upper_percentile)
            renderings[names[label]] = to_uint8(volume.array, "CT", config_w)
    if not renderings:
        renderings["default"] = to_uint8(volume.array, "CT", base)
    return renderings, names, windows


def _decoder_batch(runner, cuda: bool) -> int:
    """Boxes per decoder call by default: 64 on CUDA; on CPU 16 for the exported graphs (their per-box cost
    falls with the batch), 4 for eager torch, whose original decoder slows down past a few boxes per call
    (bench/decoder_forms.py: 113 ms/box at 4, 205 at 16)."""
    if cuda:
        return 64
    return 16 if runner.backend != "torch" else 4


def process_case(case: CaseRef, store: CaseStore, config: EngineConfig, runner: LazyRunner, *,
                 signature: dict, overwrite: bool, progress=None,
                 volume: Volume | None = None) -> CaseOutcome:
    """Annotate one case and commit it; raises CaseError for expected failures.

    ``volume`` is the case's image when the caller has already read it (the Ray actors read the next case
    while the model works on this one); None reads it here.
    """
    from pipeline.readers import read_case
    from pipeline.rounds import quality_attrs
    from pipeline.segment import segment_volume

    start = time.perf_counter()
    runner.prefetch()  # the model loads while the case is read and prompted
    volume = read_case(case) if volume is None else volume
    coarse, prompts, label_names = _prompts(case, volume, config, runner)
    renderings, window_of, windows = _renderings(volume, coarse, prompts, config)
    model = runner.get()
    if progress is not None:
        progress.reset(total=len({p.z for p in prompts}))
    on_slice = None if progress is None else lambda: progress.update(1)
    if config.model.mode == "propagate":
        from detectors import object_boxes
        from pipeline.propagate import PropagateRules, propagate_volume

        rules = PropagateRules(**config.propagate.model_dump())
        label_map, records = propagate_volume(model, renderings, object_boxes(prompts), window_of=window_of,
                                              rules=rules, model_name=model.model.name, on_slice=on_slice,
                                              jitter=config.quality.jitter())
    else:
        cuda = str(model.device).startswith("cuda")
        label_map, records = segment_volume(model, renderings, prompts, window_of=window_of,
                                            model_name=model.model.name, on_slice=on_slice,
                                            encoder_batch=config.model.encoder_batch or (32 if cuda else 1),
                                            decoder_batch=config.model.decoder_batch or _decoder_batch(model, cuda),
                                            jitter=config.quality.jitter())
    label_map, cleaning = _clean(label_map, volume, config)
    attrs = {
        "case_id": case.case_id,
        "geometry": volume.geometry.to_json(),
        "modality": _modality(volume, config),
        "signature": signature,
        **quality_attrs(store, config, label_map, records),  # instances with quality scores; routing
        "prompts": len(prompts),
        "ct_windows": {str(k): list(v) for k, v in windows.items()},
        "postprocess": cleaning,
        "config": config.model_dump(mode="json"),
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    image = volume.array if config.store.write_image else None
    store.commit_case(case.case_id, labels=label_map, attrs=attrs, image=image, overwrite=overwrite,
                      label_names=label_names)
    return CaseOutcome(case.case_id, "done", seconds=time.perf_counter() - start,
                       slices=len({p.z for p in prompts}))


def annotate(cases: list[CaseRef], store: CaseStore, config: EngineConfig, *, overwrite: bool = False,
             runner: LazyRunner | None = None, show_progress: bool | None = None) -> RunSummary:
    """Run every case; failures are recorded per case and never stop the batch."""
    from tqdm.auto import tqdm

    runner = runner or LazyRunner(config)
    remove_stale_staging(store)
    summary = RunSummary(run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6])
    show = sys.stderr.isatty() if show_progress is None else show_progress
    model_sha = runner.model_sha256
    try:
        with tqdm(total=len(cases), desc="cases", unit="case", disable=not show) as bar, \
                tqdm(desc="slices", unit="slice", disable=not show, leave=False) as slices:
            for case in cases:
                summary.outcomes.append(_run_one(case, store, config, runner, model_sha, overwrite,
                                                 summary.run_id, slices if show else None))
                bar.update(1)
    finally:
        runner.settle()
    summary.runner_stats = runner.stats()
    store.write_run(summary.run_id, {
        "run_id": summary.run_id, "package_version": package_version(), "config": config.model_dump(mode="json"),
        "cases": [o.__dict__ for o in summary.outcomes], "runner": summary.runner_stats})
    return summary


def _run_one(case: CaseRef, store: CaseStore, config: EngineConfig, runner: LazyRunner, model_sha: str,
             overwrite: bool, run_id: str, progress) -> CaseOutcome:
    try:
        signature = signature_or_read_error(case, config, model_sha)
    except CaseError as exc:
        store.record_error(case.case_id, stage=exc.stage, reason=exc.reason, run_id=run_id)
        log.error("case %s failed: %s", case.case_id, exc.reason)
        return CaseOutcome(case.case_id, "failed", exc.reason)
    if committed_with(store, case.case_id, signature):
        return CaseOutcome(case.case_id, "skipped", "already committed with the same signature")
    write_case_manifest(store, case)
    try:
        return process_case(case, store, config, runner, signature=signature, overwrite=overwrite,
                            progress=progress)
    except CaseError as exc:
        exc.case_id = case.case_id
        store.record_error(case.case_id, stage=exc.stage, reason=exc.reason, run_id=run_id)
        log.error("case %s failed at %s: %s", case.case_id, exc.stage, exc.reason)
        return CaseOutcome(case.case_id, "failed", f"{exc.stage}: {exc.reason}")
