"""`medsam-engine demo`: the main job on real data that ships in PyPI packages, with embedded defaults.

Data: slicerio's chest CT (128x128x34, LPS with negative in-plane directions) and its label map (ribs,
cervical/thoracic/lumbar spine, right lung, left lung, tissue). The label map plays the coarse mask (the
MedSAM protocol: a tight box per object per slice) and the reference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from medsam_engine.detectors.coarse_mask import boxes_from_label_map
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.job import annotate
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.metrics import filled_box_dice
from medsam_engine.pipeline.export.nifti import export_nifti
from medsam_engine.pipeline.io.discover import discover
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.report.evaluate import evaluate_store
from medsam_engine.pipeline.report.store_report import write_store_report
from medsam_engine.pipeline.store.case_store import CaseStore


def demo_inputs(folder: Path) -> tuple[Path, Path, Path, dict[int, str]]:
    """Copy the bundled chest CT and its labels into ``folder``; returns image, coarse mask, reference,
    names."""
    import nrrd
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    image, labels = data / "CTChest4.nrrd", data / "Segmentation.seg.nrrd"
    for sub in ("images", "coarse", "reference"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, folder / "images" / "chest_ct.nrrd")
    shutil.copyfile(labels, folder / "coarse" / "chest_ct.nrrd")
    shutil.copyfile(labels, folder / "reference" / "chest_ct.nrrd")
    header = nrrd.read_header(str(labels))
    names = {}
    for key, value in header.items():
        if key.endswith("_LabelValue"):
            names[int(value)] = header.get(key.replace("_LabelValue", "_Name"), f"label {value}")
    return (
        folder / "images" / "chest_ct.nrrd",
        folder / "coarse" / "chest_ct.nrrd",
        folder / "reference" / "chest_ct.nrrd",
        names,
    )


def _box_dice(image: Path, coarse: Path) -> dict[int, float]:
    volume = read_volume(image)
    reference = align_to(read_volume(coarse), volume)
    return filled_box_dice(reference, boxes_from_label_map(reference))


def run_demo(out: Path) -> int:
    out = Path(out)
    image, coarse, reference, names = demo_inputs(out / "inputs")
    store = CaseStore(out / "store")
    cases = discover([image], store.case_ids(), coarse_masks=[coarse])
    print(f"annotating {len(cases)} case(s) from bundled real data (slicerio chest CT) ...", flush=True)
    summary = annotate(cases, store, EngineConfig())
    for outcome in summary.failed:
        print(f"failed {outcome.case_id}: {outcome.reason}")
    exported = export_nifti(store, out / "nifti")
    results = evaluate_store(store, [reference])
    box = _box_dice(image, coarse)
    report = write_store_report(store, out / "qc")
    print(f"\nmasks (OME-Zarr store): {store.root.resolve()}")
    for path in exported:
        print(f"NIfTI label map:        {path.resolve()}")
    print(f"\n{'label':>5s}  {'structure':28s} {'Dice':>7s} {'NSD':>7s} {'box Dice':>9s}")
    for labels in results.values():
        for label, scores in labels.items():
            print(
                f"{label:5d}  {names.get(label, '')[:28]:28s} {scores['dice']:7.4f} {scores['nsd']:7.4f} "
                f"{box.get(label, float('nan')):9.4f}"
            )
        mean = np.mean([s["dice"] for s in labels.values()])
        print(f"{'mean':>5s}  {'':28s} {mean:7.4f} {'':7s} {np.mean(list(box.values())):9.4f}")
    stats = summary.runner_stats
    if stats:
        print(
            f"\nencoder: {stats['encoded_slices']} slices in {stats['seconds_encode']:.1f} s; decoder: "
            f"{stats['decoded_boxes']} boxes in {stats['decoder_calls']} calls, "
            f"{stats['seconds_decode']:.1f} s"
        )
    print(f"QC report: {report.resolve()}")
    return 1 if summary.failed else 0
