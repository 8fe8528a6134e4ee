"""`medsam-engine detector train`: fit the learned detector from a store's accepted masks.

Data: every committed case (or only those whose ``review_status`` is ``accepted`` when the store has review
statuses); slices with any wanted label plus as many empty slices, spread evenly, as negatives. Each slice is
rendered as the annotate run rendered it (CT window or percentile clip) and embedded once by LiteMedSAM.
Hold-out: whole cases when there are two or more (the last ``holdout`` fraction of the sorted case ids, at
least one); with a single case, the top ``holdout`` fraction of its slices along z (a contiguous block, so
neighbouring slices don't leak). Early stopping watches the hold-out loss; the metrics reported are object
recall and precision (box IoU >= 0.5) on the held-out slices.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsam_engine.detectors.evaluation import object_scores
from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.core.types import CaseAttributes, Volume
from medsam_engine.pipeline.model.framing import Framing
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.queries import select_cases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceSample:
    case_id: str
    z: int
    embedding: np.ndarray  # (256, 64, 64) float32
    target: np.ndarray  # (L, 64, 64) float32
    labels: np.ndarray  # (H, W) reference label slice
    original_hw: tuple[int, int]


def read_case_volume(store: CaseStore, case_id: str) -> tuple[Volume, np.ndarray, CaseAttributes]:
    """The stored image as a Volume, its label map and attributes; ValueError without a stored image."""
    import zarr

    labels, attrs = store.read_labels(case_id)
    group = zarr.open_group(str(store.case_path(case_id)), mode="r")
    if "0" not in group:
        raise ValueError(f"case {case_id} was stored without its image (store.write_image: false)")
    image = np.asarray(group["0"][:])
    if image.ndim == 4:
        image = np.moveaxis(image, 0, -1)
    volume = attrs.volume(image)
    return volume, labels, attrs


def stored_label_names(store: CaseStore, case_id: str) -> dict[int, str]:
    """Label value -> name from the case's OME-Zarr ``image-label`` properties."""
    import zarr

    group = zarr.open_group(str(store.case_path(case_id)), mode="r")
    properties = group["labels/medsam"].attrs.get("ome", {}).get("image-label", {}).get("properties", [])
    return {int(p["label-value"]): str(p["name"]) for p in properties if "name" in p}


def _chosen_slices(labels: np.ndarray, wanted: list[int]) -> list[int]:
    present = np.isin(labels, wanted).any(axis=(1, 2))
    positives = list(np.nonzero(present)[0])
    empty = np.nonzero(~present)[0]
    negatives = (
        list(empty[np.linspace(0, len(empty) - 1, min(len(empty), len(positives))).astype(int)])
        if len(empty)
        else []
    )
    return sorted(int(z) for z in positives + negatives)


def collect_samples(
    store: CaseStore, runner, case_ids: list[str], wanted: list[int], meta: dict
) -> list[SliceSample]:
    from medsam_engine.detectors.learned import grid_targets, render

    samples = []
    for case_id in case_ids:
        volume, labels, _ = read_case_volume(store, case_id)
        rendered = render(volume, meta)
        for z in _chosen_slices(labels, wanted):
            embedded = runner.encode([rendered[z]])[0]
            samples.append(
                SliceSample(
                    case_id,
                    z,
                    embedded.array()[0],
                    grid_targets(labels[z], wanted, runner.model.framing),
                    labels[z],
                    embedded.original_hw,
                )
            )
    return samples


def split_by_case_or_z(samples: list, holdout: float) -> tuple[list, list, str] | None:
    """(train, held-out, how) for per-slice samples with ``case_id`` and ``z``: the last cases held out when
    there are several, else the top z block of the one case; None when neither can be split (one slice)."""
    cases = sorted({s.case_id for s in samples})
    if len(cases) >= 2:
        held = set(cases[len(cases) - max(1, int(round(len(cases) * holdout))) :])
        return (
            [s for s in samples if s.case_id not in held],
            [s for s in samples if s.case_id in held],
            "cases",
        )
    zs = sorted({s.z for s in samples})
    if len(zs) >= 2:
        cut = zs[min(len(zs) - 1, int(len(zs) * (1 - holdout)))]
        return [s for s in samples if s.z < cut], [s for s in samples if s.z >= cut], "z-block"
    return None


def evaluate_head(
    head, samples: list[SliceSample], wanted: list[int], framing: Framing, threshold: float = 0.5
) -> dict:
    """Object recall/precision per label on samples, from the head's thresholded heat maps."""
    import torch

    from medsam_engine.detectors.learned import grid_to_slice

    if not samples:
        return {}
    with torch.no_grad():
        grids = torch.sigmoid(head(torch.from_numpy(np.stack([s.embedding for s in samples])))).numpy()
    predicted, reference = [], []
    for grid, sample in zip(grids, samples, strict=False):
        heat = grid_to_slice(grid, sample.original_hw, framing)
        best = np.asarray(wanted)[heat.argmax(axis=0)]
        predicted.append(np.where(heat.max(axis=0) > threshold, best, 0))
        reference.append(sample.labels)
    scores = object_scores(np.stack(predicted), np.stack(reference), wanted)
    return {str(k): {m: round(v, 4) for m, v in s.items()} for k, s in scores.items()}


def train_from_store(
    store: CaseStore,
    out: str | Path,
    *,
    runner,
    labels: list[int] | None = None,
    holdout: float = 0.25,
    epochs: int = 200,
    seed: int = 0,
    parent: str | None = None,
) -> dict:
    """Train, evaluate on the hold-out, save the artefact; returns its metadata (with version and metrics)."""
    import torch

    from medsam_engine.detectors.learned import save_artefact, train_head

    case_ids = select_cases(store, "accepted-else-all")[0]
    if not case_ids:
        raise ValueError(f"no accepted or committed case in {store.root} to train from")
    intensity = store.attributes(case_ids[0]).config.get("intensity", {})  # type: ignore[union-attr]
    meta = {"ct_window": [intensity.get("ct_level", 40.0), intensity.get("ct_width", 400.0)]}
    present = sorted({int(v) for c in case_ids for v in np.unique(store.read_labels(c)[0]) if v})
    wanted = sorted(labels) if labels else present
    if not wanted:
        raise ValueError("the accepted masks hold no label to learn")
    names = {str(k): v for c in case_ids for k, v in stored_label_names(store, c).items() if k in wanted}
    start = time.perf_counter()
    samples = collect_samples(store, runner, case_ids, wanted, meta)
    train, held, how = split_by_case_or_z(samples, holdout) or (samples, [], "none")

    def as_tensors(s):
        return (
            torch.from_numpy(np.stack([x.embedding for x in s])),
            torch.from_numpy(np.stack([x.target for x in s])),
        )

    head, history = train_head(
        as_tensors(train), as_tensors(held) if held else None, epochs=epochs, seed=seed
    )
    meta.update(
        {
            "kind": "medsam-engine learned detector",
            "format": 1,
            "labels": wanted,
            "hidden": 32,
            "label_names": names,
            "encoder_model_sha256": runner.model.sha256,
            "parent": parent,
            "training": {
                "cases": case_ids,
                "train_slices": len(train),
                "holdout_slices": len(held),
                "split": how,
                "epochs_run": len(history),
                "seconds": round(time.perf_counter() - start, 1),
            },
            "metrics": {
                "holdout": evaluate_head(head, held, wanted, runner.model.framing),
                "train": evaluate_head(head, train, wanted, runner.model.framing),
                "final_val_loss": round(min(h["val_loss"] for h in history), 5),
            },
            "created_at": utc_stamp(),
        }
    )
    meta["version"] = save_artefact(out, head, meta)
    log.info("detector %s: %s", meta["version"][:12], meta["metrics"]["holdout"])
    return meta
