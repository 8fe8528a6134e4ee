"""Marks as prompts: Dice of 3D masks from one key-slice long + short axis (propagation) against the same
object's 3D box and against true per-slice boxes, with the real LiteMedSAM on the real chest CT.

Data (real, shipped in packages): slicerio's chest CT (34 x 128 x 128, 3.05 x 3.05 x 10 mm) written as a
DICOM series with a Frame of Reference; structures: right lung (5), left lung (6) and the three spine labels
(2, 3, 4). For each, the key slice is its largest slice; the long axis joins its two pixels furthest apart
there, the short axis is the longest chord perpendicular to it (detectors.evaluation.recist_axes). The marks
are written as a GSPS with highdicom and read back by the ``marks`` detector, exactly as a run reads them.

Conditions (each label's CT window read by the engine from the median HU under its prompt: the reference
mask for the first two, the marks' lines for the rest):
* marks (axes_rule endpoints / ellipse): one seed box on the key slice, propagated up and down with the
  engine's stop rule, no z range given; the reach bounded by depth_factor times half the box's larger side
  (1.0, 1.5, 2.0, none);
* lone line (axis / square): the long axis alone;
* 3D box: the official propagate protocol, the object's true z range and its middle slice's true box;
* per-slice boxes: the true tight box on every slice (slice mode; the upper bound of box prompts).
Also the Dice of the seed box itself filled on its key slice against the key slice's reference (no model).

    .venv/bin/python bench/marks_prompts.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from marks_making import write_gsps

from medsam_engine.detectors import compile_boxes, object_boxes
from medsam_engine.detectors.evaluation import recist_axes
from medsam_engine.detectors.registry import build_detector
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.propagate import PropagateRules, propagate_volume
from medsam_engine.pipeline.annotate.rendering import renderings
from medsam_engine.pipeline.annotate.segment import segment_volume
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.metrics import dice
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.readers import read_volume

STRUCTURES = {5: "right lung", 6: "left lung", 2: "spine 2", 3: "spine 3", 4: "spine 4"}
SERIES, FRAME = "1.2.826.0.1.3680043.8.498.401", "1.2.826.0.1.3680043.8.498.402"
PROPAGATE = EngineConfig().with_overrides(model={"mode": "propagate"})


def chest_series(root: Path):
    """The chest CT as a DICOM series; its Volume as the engine reads it, the reference on that grid, the
    datasets by slice."""
    import pydicom
    import slicerio
    from conftest import complete_dicom_headers, write_ct_series

    data = Path(slicerio.__file__).parent / "data"
    folder = root / "series"
    write_ct_series(read_volume(data / "CTChest4.nrrd"), folder, series_uid=SERIES)
    complete_dicom_headers(folder, frame_of_reference_uid=FRAME)
    volume = read_volume(folder)
    reference = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume, what="reference")
    inverse = np.linalg.inv(volume.geometry.affine)
    images = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(path))
        ras = np.asarray([float(v) for v in ds.ImagePositionPatient]) * [-1, -1, 1]
        images[int(round((inverse @ [*ras, 1])[0]))] = ds
    return folder, volume, reference.astype(np.uint16), images


def image_xy(ds, volume, z: int, xy: np.ndarray) -> np.ndarray:
    """Volume x/y indices on slice z -> the image's column/row indices."""
    zyx = np.column_stack([np.full(len(xy), z), xy[:, 1], xy[:, 0], np.ones(len(xy))])
    lps = (volume.geometry.affine @ zyx.T).T[:, :3] * [-1, -1, 1]
    origin = np.asarray([float(v) for v in ds.ImagePositionPatient])
    orient = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    rows, cols = (float(v) for v in ds.PixelSpacing)
    return np.column_stack([(lps - origin) @ orient[:3] / cols, (lps - origin) @ orient[3:] / rows])


def marks_detection(root: Path, folder: Path, volume, images, axes: dict, options: dict, lone: bool):
    """Write one GSPS with every structure's axes (each on its own layer) and run the marks detector."""
    marks = root / f"marks-{len(list(root.iterdir()))}"
    marks.mkdir()
    annotations = []
    for label, (z, long, short) in axes.items():
        lines = [long] if lone else [long, short]
        objects = [("POLYLINE", image_xy(images[z], volume, z, line), None) for line in lines]
        annotations.append({"image": images[z], "layer": f"L{label}", "objects": objects})
    write_gsps(marks / "pr.dcm", list(images.values()), annotations)
    files = tuple(str(p) for p in sorted(folder.iterdir()))
    case = CaseRef("bench", str(folder), kind="series", files=files)
    detector = build_detector("marks", options={"marks": str(marks), **options}, case=case)
    return detector(volume)


def propagate(runner, volume, coarse, prompts, objects, rules=PropagateRules()):
    rendered, window_of, windows = renderings(volume, coarse, prompts, PROPAGATE)
    label_map, _ = propagate_volume(runner, rendered, objects, window_of=window_of, rules=rules)
    return label_map, windows


def by_structure(label_map: np.ndarray, reference: np.ndarray, value_of: dict[int, int]) -> dict[int, float]:
    return {label: dice(label_map == value_of[label], reference == label) for label in STRUCTURES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.devices import resolve_device
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    runner = LiteMedSAMRunner(load_lite_medsam(), device=resolve_device(args.device))
    root = Path(tempfile.mkdtemp(prefix="marks-bench-"))
    folder, volume, full_reference, images = chest_series(root)
    reference = np.where(np.isin(full_reference, list(STRUCTURES)), full_reference, 0).astype(np.uint16)
    axes = {}
    for label in STRUCTURES:
        mask = reference == label
        z = int(np.argmax(mask.sum(axis=(1, 2))))
        axes[label] = (z, *recist_axes(mask[z], volume.spacing[1:]))
    start = time.perf_counter()
    rows: dict[str, dict[int, float]] = {}
    seed_dice: dict[str, dict[int, float]] = {}
    marks_windows: dict[str, dict] = {}
    same = {label: label for label in STRUCTURES}
    per_slice = compile_boxes(reference, spacing=volume.spacing)
    rendered, window_of, windows = renderings(volume, reference, per_slice, EngineConfig())
    rows["true per-slice boxes (slice mode)"] = by_structure(
        segment_volume(runner, rendered, per_slice, window_of=window_of)[0], reference, same
    )
    three_d, _ = propagate(runner, volume, reference, per_slice, object_boxes(per_slice))
    rows["3D box (true z range, middle slice's box)"] = by_structure(three_d, reference, same)
    variants = [
        ("long + short axis, endpoints rule, depth 1.0", {"depth_factor": 1.0}, False),
        ("long + short axis, endpoints rule, depth 1.5", {"depth_factor": 1.5}, False),
        ("long + short axis, endpoints rule, depth 2.0", {"depth_factor": 2.0}, False),
        ("long + short axis, endpoints rule, no depth bound", {"depth_factor": None}, False),
        ("long + short axis, ellipse rule, depth 1.5", {"axes_rule": "ellipse", "depth_factor": 1.5}, False),
        ("lone long axis, axis rule (0.7), depth 1.5", {"lone_line": "axis", "depth_factor": 1.5}, True),
        ("lone long axis, square rule, depth 1.5", {"lone_line": "square", "depth_factor": 1.5}, True),
    ]
    for name, options, lone in variants:
        detection = marks_detection(root, folder, volume, images, axes, options, lone)
        names = {n: v for v, n in detection.label_names.items()}
        value_of = {label: names[f"L{label}"] for label in STRUCTURES}
        label_map, marks_windows[name] = propagate(
            runner, volume, detection.label_map, detection.prompts, detection.objects
        )
        rows[f"marks: {name}"] = by_structure(label_map, reference, value_of)
        seed = {}
        for label in STRUCTURES:
            (prompt,) = [p for p in detection.prompts if p.label == value_of[label]]
            box = np.zeros(volume.shape[1:], dtype=bool)
            box[prompt.box[1] : prompt.box[3] + 1, prompt.box[0] : prompt.box[2] + 1] = True
            seed[label] = dice(box, reference[prompt.z] == label)
        seed_dice[name] = seed
    seconds = time.perf_counter() - start
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    print(f"# marks as prompts, chest CT {volume.shape}, device {runner.device}, commit {commit.strip()}")
    print(f"# {seconds:.0f} s; CT windows by label (per-slice/3D runs): {windows}")
    header = "| condition | " + " | ".join(STRUCTURES.values()) + " | mean |"
    print(header)
    print("|" + "---|" * (len(STRUCTURES) + 2))
    for name, scores in rows.items():
        values = [scores[label] for label in STRUCTURES]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |")
    print("\nseed box filled on its key slice vs the key slice's reference (no model):")
    for name, scores in seed_dice.items():
        values = [scores[label] for label in STRUCTURES]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |")
    print("\nCT windows of the marks runs (by the marks' label values):", marks_windows)
    print("\ncommand: .venv/bin/python bench/marks_prompts.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
