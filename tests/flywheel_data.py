"""Real-data helpers shared by the flywheel tests (quality, review, finetune, rounds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

LUNGS = (5, 6)  # right and left lung: one CT window (lung), so 4 encoder passes per 4-slice case


def lung_inputs(root: Path, small_chest, small_chest_nifti) -> tuple[Path, Path, Path]:
    """images/ (the four real chest slices as NRRD "chest_a" and as NIfTI "chest_b": two cases with the same
    pixels, so the embedding cache serves the second), masks/ (lungs only, the prompts) and reference/ (the
    same lungs: the simulated reviewer's corrections)."""
    import nibabel as nib
    import nrrd

    images, masks, reference = root / "images", root / "masks", root / "reference"
    for folder in (images, masks, reference):
        folder.mkdir(parents=True)
    shutil.copy(small_chest[0], images / "chest_a.nrrd")
    shutil.copy(small_chest_nifti[0], images / "chest_b.nii.gz")
    data, header = nrrd.read(str(small_chest[1]))
    lungs = np.where(np.isin(data, LUNGS), data, 0).astype(np.uint8)
    for folder in (masks, reference):
        nrrd.write(str(folder / "chest_a.nrrd"), lungs, header)
    nifti = nib.load(str(small_chest_nifti[1]))
    labels = np.asanyarray(nifti.dataobj)
    nib.save(
        nib.Nifti1Image(np.where(np.isin(labels, LUNGS), labels, 0).astype(np.int16), nifti.affine),
        str(masks / "chest_b.nii.gz"),
    )
    shutil.copy(masks / "chest_b.nii.gz", reference / "chest_b.nii.gz")
    return images, masks, reference


def shared_runner(config, runner):
    """A LazyRunner for ``config`` that uses an already loaded runner (the session's model and its cache)."""
    from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner

    lazy = LazyRunner(config)
    lazy._runner = runner
    return lazy


def case_of(store, stem: str) -> str:
    """The id of the committed case whose input file has this stem."""
    from medsam_engine.pipeline.io.readers import stem_of

    (found,) = [c for c in store.committed_cases() if stem_of(store.manifest(c)["image"]) == stem]
    return found


def commit_lungs_case(root: Path, small_chest, config=None, **attrs):
    """A store holding the four real chest slices with their reference lungs as case "c0ffee", annotated
    with ``config`` (default EngineConfig); extra case ``attrs`` (``review_status``, say) are added."""
    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.io.readers import read_volume
    from medsam_engine.pipeline.store.case_store import CaseStore

    volume = read_volume(small_chest[0])
    labels = align_to(read_volume(small_chest[1]), volume)
    labels = np.where(np.isin(labels, LUNGS), labels, 0).astype(np.uint16)
    store = CaseStore(root)
    config = config or EngineConfig()
    record = {
        "case_id": "c0ffee",
        "geometry": volume.geometry.to_json(),
        "modality": "CT",
        "signature": {},
        "instances": [],
        "config": config.model_dump(mode="json"),
        **attrs,
    }
    store.commit_case(
        "c0ffee",
        labels=labels,
        attrs=record,
        image=volume.array,
        label_names={5: "right lung", 6: "left lung"},
    )
    return store
