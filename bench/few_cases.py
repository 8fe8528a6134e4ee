"""The first corrections: the lift on unseen targets after one fine-tuning round from 1, 2, 3 or 5 reviewed
cases, of one kind or of several, with the minutes each takes.

Every regime runs the command-line contract as a user would, in this process:

    medsam-engine finetune --images IMG... --labels LAB... --out CKPT        (its defaults)
    medsam-engine annotate UNSEEN... --coarse-mask REF... --out STORE --checkpoint CKPT
    (and once per kind with the official weights: the baseline)

and scores the unseen targets' masks against their references: Dice per label pooled over the unseen cases of
a kind (voxels summed), averaged over labels; the lift of a regime is the mean over its kinds of (fine-tuned -
official). Same boxes (the references' tight boxes), same post-processing, both models on eager torch.

Kinds (real data shipped in packages):
* ``mr``: the MNI152 2009a T1 template (nilearn), axial slices from -20 to +70 mm every 2 mm, cut into five
  9-slice slabs; reviewed cases hold the *left* hemisphere's white matter (label 1) and grey matter (label 2)
  from the template's tissue maps (p > 0.5); the unseen targets are the *right* hemisphere's, on all slabs.
* ``ct``: slicerio's chest CT cut into ten z blocks (3-4 slices), labels 2-6 (spine, lungs); unseen: blocks
  1, 4 and 7; reviewed cases from the others.
* ``nuclei``: stardist's 512 x 512 nuclei image as sixteen 128 x 128 tiles, each nucleus its own label;
unseen:
  six fixed tiles; reviewed cases from the others.

    .venv/bin/python bench/few_cases.py [--out /tmp/few-cases] [--regime mixed-2 ...] [--list]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.cli.main import main as cli

os.environ.setdefault("MEDSAM_ENGINE_ID_KEY", "few-cases-bench")
TORCH_CONFIG = "model:\n  backend: torch\n"

# regime -> reviewed cases per kind
REGIMES = {
    "mixed-2": {"mr": 1, "ct": 1},
    "mr-1": {"mr": 1},
    "ct-1": {"ct": 1},
    "nuclei-1": {"nuclei": 1},
    "mixed-3": {"mr": 1, "ct": 1, "nuclei": 1},
    "ct-2": {"ct": 2},
    "nuclei-2": {"nuclei": 2},
    "mr-2": {"mr": 2},
    "ct-3": {"ct": 3},
    "nuclei-3": {"nuclei": 3},
    "mr-3": {"mr": 3},
    "mixed-5": {"mr": 1, "ct": 2, "nuclei": 2},
    "ct-5": {"ct": 5},
    "nuclei-5": {"nuclei": 5},
    "mr-5": {"mr": 5},
}


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, affine), str(path))


def mr_data(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """(reviewed pool, unseen) (image, labels) pairs of the MNI template (see the module docstring)."""
    import nibabel as nib
    import nilearn

    data = Path(nilearn.__file__).parent / "datasets" / "data"
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    t1 = nib.load(str(data / name.format("t1")))
    grey = np.asarray(nib.load(str(data / name.format("gm"))).dataobj, dtype=np.float32) / 255
    white = np.asarray(nib.load(str(data / name.format("wm"))).dataobj, dtype=np.float32) / 255
    image = np.asarray(t1.dataobj, dtype=np.int16)
    tissue = np.where(white > 0.5, 1, np.where(grey > 0.5, 2, 0)).astype(np.uint8)
    x_mm = t1.affine[0, 0] * np.arange(image.shape[0]) + t1.affine[0, 3]
    left, right = tissue * (x_mm < -2)[:, None, None], tissue * (x_mm > 2)[:, None, None]
    z_mm = t1.affine[2, 2] * np.arange(image.shape[2]) + t1.affine[2, 3]
    picked = np.nonzero((z_mm >= -20) & (z_mm <= 70) & (np.round(z_mm) % 2 == 0))[0]
    pool, unseen = [], []
    for n, block in enumerate(np.array_split(picked, 5)):
        affine = t1.affine.copy()
        affine[2, 2] *= 2
        affine[:3, 3] = (t1.affine @ [0, 0, block[0], 1])[:3]
        for part, labels, out in (("left", left, pool), ("right", right, unseen)):
            folder = root / "mr" / part
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"mni_slab{n}_{part}"
            _save_nifti(folder / f"{stem}.nii.gz", np.ascontiguousarray(image[:, :, block]), affine)
            _save_nifti(folder / f"{stem}_labels.nii.gz", np.ascontiguousarray(labels[:, :, block]), affine)
            out.append((folder / f"{stem}.nii.gz", folder / f"{stem}_labels.nii.gz"))
    # the whole left hemisphere is one reviewed volume in the 1-case regimes: slab 2 first (the middle)
    return [pool[2], pool[0], pool[4], pool[1], pool[3]], unseen


def ct_data(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    import nrrd
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    image, header = nrrd.read(str(data / "CTChest4.nrrd"))
    labels, _ = nrrd.read(str(data / "Segmentation.seg.nrrd"))
    labels = np.where(np.isin(labels, (2, 3, 4, 5, 6)), labels, 0).astype(np.uint8)
    header = {k: v for k, v in header.items() if not k.startswith(("Segment", "sizes"))}
    folder = root / "ct"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    edges = np.linspace(0, image.shape[2], 11).round().astype(int)
    for n, (k0, k1) in enumerate(itertools.pairwise(edges)):
        block = dict(header)
        step = np.asarray(header["space directions"], float)[2]
        block["space origin"] = np.asarray(header["space origin"], float) + k0 * step
        stem = f"chest_block{n}"
        nrrd.write(str(folder / f"{stem}.nrrd"), np.ascontiguousarray(image[:, :, k0:k1]), block)
        nrrd.write(str(folder / f"{stem}_labels.nrrd"), np.ascontiguousarray(labels[:, :, k0:k1]), block)
        pairs.append((folder / f"{stem}.nrrd", folder / f"{stem}_labels.nrrd"))
    unseen = [pairs[i] for i in (1, 4, 7)]
    return [pairs[i] for i in (5, 2, 8, 0, 9, 3, 6)], unseen


def nuclei_data(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    import cv2
    import stardist
    import tifffile

    data = Path(stardist.__file__).parent / "data" / "images"
    image = tifffile.imread(str(data / "img2d.tif")).astype(np.float32)
    mask = tifffile.imread(str(data / "mask2d.tif"))
    image = ((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)
    folder = root / "nuclei"
    folder.mkdir(parents=True, exist_ok=True)
    tiles = []
    for r in range(4):
        for c in range(4):
            stem = f"nuclei_r{r}c{c}"
            ys, xs = slice(128 * r, 128 * (r + 1)), slice(128 * c, 128 * (c + 1))
            cv2.imwrite(str(folder / f"{stem}.png"), image[ys, xs])
            cv2.imwrite(str(folder / f"{stem}_labels.png"), mask[ys, xs].astype(np.uint16))
            tiles.append((folder / f"{stem}.png", folder / f"{stem}_labels.png"))
    unseen_at = (1, 4, 6, 9, 11, 14)
    pool_at = (5, 10, 0, 15, 3, 12, 2, 7, 8, 13)
    return [tiles[i] for i in pool_at], [tiles[i] for i in unseen_at]


def pooled_dice(store: Path, unseen: list[tuple[Path, Path]]) -> float:
    """Mean over labels of each label's Dice pooled over the unseen cases (voxels summed)."""
    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.io.readers import read_volume, stem_of
    from medsam_engine.pipeline.store.case_store import CaseStore

    reference_of = {stem_of(image): labels for image, labels in unseen}
    case_store = CaseStore(store)
    inter: dict[int, int] = {}
    total: dict[int, int] = {}
    for case_id in case_store.committed_cases():
        labels, attrs = case_store.read_labels(case_id)
        case = attrs.volume(labels)
        reference = align_to(read_volume(reference_of[stem_of(case_store.manifest(case_id)["image"])]), case)
        for value in (int(v) for v in np.unique(reference) if v):
            inter[value] = inter.get(value, 0) + int(((labels == value) & (reference == value)).sum())
            total[value] = total.get(value, 0) + int((labels == value).sum() + (reference == value).sum())
    return float(np.mean([2 * inter[v] / total[v] for v in total]))


def annotate_unseen(kind: str, unseen: list, out: Path, config: Path, checkpoint: Path | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        "annotate",
        *[str(i) for i, _ in unseen],
        "--coarse-mask",
        *[str(m) for _, m in unseen],
        "--out",
        str(out),
        "--config",
        str(config),
    ]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    if cli(command) != 0:
        raise RuntimeError(f"annotate of the unseen {kind} cases failed")
    return pooled_dice(out, unseen)


def run_regime(name: str, data: dict, baseline: dict, root: Path, config: Path) -> dict:
    counts = REGIMES[name]
    pairs = [p for kind, n in counts.items() for p in data[kind][0][:n]]
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    checkpoint = out / "ft.pth"
    command = [
        "finetune",
        "--images",
        *[str(i) for i, _ in pairs],
        "--labels",
        *[str(m) for _, m in pairs],
        "--out",
        str(checkpoint),
        "--device",
        "cpu",
    ]
    start = time.perf_counter()
    code = cli(command)
    minutes = (time.perf_counter() - start) / 60
    if code != 0:
        raise RuntimeError(f"finetune for {name} exited {code}")
    after = {}
    for kind in counts:
        after[kind] = (
            annotate_unseen(kind, data[kind][1], out / f"unseen-{kind}", config, checkpoint)
            if checkpoint.exists()
            else baseline[kind]
        )
    entry = json.loads((out / "ft.pth.json").read_text()) if checkpoint.exists() else None
    lifts = {kind: after[kind] - baseline[kind] for kind in counts}
    return {
        "regime": name,
        "cases": counts,
        "finetune_minutes": round(minutes, 2),
        "written": checkpoint.exists(),
        "before": {k: round(baseline[k], 4) for k in counts},
        "after": {k: round(v, 4) for k, v in after.items()},
        "lift": {k: round(v, 4) for k, v in lifts.items()},
        "mean_lift": round(float(np.mean(list(lifts.values()))), 4),
        "epochs_chosen": entry["metrics"]["epochs_chosen"] if entry else 0,
        "cv": (
            {
                "before": entry["metrics"]["holdout_dice_before"],
                "after": entry["metrics"]["holdout_dice_after"],
                "folds": entry["data"]["folds"],
            }
            if entry
            else None
        ),
        "command": "medsam-engine " + " ".join(command),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/few-cases")
    parser.add_argument("--regime", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("-v", "--verbose", action="store_true", help="log each fine-tuning epoch")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
        logging.getLogger("medsam_engine.pipeline.flywheel").setLevel(logging.INFO)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    config = root / "torch.yaml"
    config.write_text(TORCH_CONFIG)
    needed = {kind for name in args.regime for kind in REGIMES[name]}
    makers = {"mr": mr_data, "ct": ct_data, "nuclei": nuclei_data}
    data = {kind: makers[kind](root / "data") for kind in sorted(needed)}
    baseline_file = root / "baseline.json"
    baseline = json.loads(baseline_file.read_text()) if baseline_file.exists() else {}
    for kind in sorted(needed - set(baseline)):
        baseline[kind] = annotate_unseen(kind, data[kind][1], root / f"base-{kind}", config, None)
        baseline_file.write_text(json.dumps(baseline))
    print(
        f"official model on the unseen targets: {json.dumps({k: round(v, 4) for k, v in baseline.items()})}"
    )
    results = []
    for name in args.regime:
        results.append(run_regime(name, data, baseline, root, config))
        print(json.dumps(results[-1]), flush=True)
        with open(root / "results.jsonl", "a") as stream:
            stream.write(json.dumps(results[-1]) + "\n")
    print("| regime | reviewed cases | official | fine-tuned | lift | epochs | minutes |", file=sys.stdout)
    print("|---|---|---|---|---|---|---|")
    for r in results:

        def shown(figures: dict) -> str:
            return ", ".join(f"{k} {v:.3f}" for k, v in figures.items())

        print(
            f"| {r['regime']} | {r['cases']} | {shown(r['before'])} | {shown(r['after'])} | "
            f"{r['mean_lift']:+.3f} | {r['epochs_chosen']} | {r['finetune_minutes']:.1f} |"
        )


if __name__ == "__main__":
    main()
