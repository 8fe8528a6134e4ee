"""Two data-engine rounds on real data with a simulated reviewer: Dice per round and the fine-tuning lift.

Protocol, per dataset (all through the `medsam-engine` commands, run in this process):

1. `round run` on every case with the official model (boxes from the reference masks: the MedSAM protocol).
2. The simulated reviewer corrects part A: `review import` of the reference masks of A.
3. `finetune --store` on the accepted part A (CPU; its defaults: the image encoder's last stage and
   neck, prompt encoder and mask decoder; `--finetune-arg=--encoder-stages --finetune-arg=0` for the decoder
   only, `... --finetune-arg=--augment` for flipped and turned copies).
4. `round run` again: part A is kept (accepted), part B is stale for the new model and is re-annotated.
Dice on part B from round 1 (official model) and round 2 (fine-tuned) uses the same prompts and the same
post-processing, so the difference (the lift) is the model's.

Data (real, shipped in packages):
* slicerio chest CT (128 x 128 x 34, 3 x 3 x 10 mm), labels 2-6 (cervical/thoracic/lumbar spine, lungs), cut
  into six 5-6-slice blocks along z; A = blocks 0, 2, 4, B = blocks 1, 3, 5.
* stardist nuclei (512 x 512 fluorescence, 125 instances), cut into four 256 x 256 quadrants; A = the left
  column, B = the right column. Each nucleus is its own label value, so Dice per label is Dice per nucleus.

    .venv/bin/python bench/flywheel.py [--out /tmp/flywheel-bench] [--only chest|nuclei]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.cli.main import main as cli

CHEST_LABELS = (2, 3, 4, 5, 6)
# one case-id key for every run, so every option is measured on the same held-out split (the split follows the
# keyed case ids; a store of its own would draw another key, and another split, each time)
os.environ.setdefault("MEDSAM_ENGINE_ID_KEY", "flywheel-bench")


def chest_data(root: Path) -> tuple[list[str], list[str]]:
    """images/, masks/ and reference/ (same stems) of the chest blocks; returns the stems of parts A and B."""
    import nrrd
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    image, header = nrrd.read(str(data / "CTChest4.nrrd"))
    labels, _label_header = nrrd.read(str(data / "Segmentation.seg.nrrd"))
    if labels.shape != image.shape:
        raise RuntimeError("the bundled chest labels are no longer on the image grid")
    labels = np.where(np.isin(labels, CHEST_LABELS), labels, 0).astype(np.uint8)
    header = {k: v for k, v in header.items() if not k.startswith(("Segment", "sizes"))}
    edges = np.linspace(0, image.shape[2], 7).round().astype(int)
    stems = []
    for folder in ("images", "masks", "reference"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for n, (k0, k1) in enumerate(itertools.pairwise(edges)):
        block = dict(header)
        step = np.asarray(header["space directions"], float)[2]
        block["space origin"] = np.asarray(header["space origin"], float) + k0 * step
        stem = f"chest_block{n}"
        nrrd.write(str(root / "images" / f"{stem}.nrrd"), np.ascontiguousarray(image[:, :, k0:k1]), block)
        for folder in ("masks", "reference"):
            nrrd.write(str(root / folder / f"{stem}.nrrd"), np.ascontiguousarray(labels[:, :, k0:k1]), block)
        stems.append(stem)
    return stems[0::2], stems[1::2]


def nuclei_data(root: Path) -> tuple[list[str], list[str]]:
    """Four 256 x 256 quadrants of stardist's nuclei image as 8-bit PNG with their instance masks."""
    import cv2
    import stardist
    import tifffile

    data = Path(stardist.__file__).parent / "data" / "images"
    image = tifffile.imread(str(data / "img2d.tif")).astype(np.float32)
    mask = tifffile.imread(str(data / "mask2d.tif"))
    image = ((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)
    for folder in ("images", "masks", "reference"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    stems = {}
    halves = (slice(0, 256), slice(256, 512))
    for name, (ys, xs) in {f"q{r}{c}": (halves[r], halves[c]) for c in (0, 1) for r in (0, 1)}.items():
        stem = f"nuclei_{name}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), image[ys, xs])
        for folder in ("masks", "reference"):
            cv2.imwrite(str(root / folder / f"{stem}.png"), mask[ys, xs].astype(np.uint16))
        stems[name] = stem
    return [stems["q00"], stems["q10"]], [stems["q01"], stems["q11"]]


def pooled_dice(store_path: Path, root: Path, stems: list[str]) -> dict:
    """Dice per label pooled over the cases of ``stems`` (voxels summed), and their mean."""
    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.io.readers import read_volume, stem_of
    from medsam_engine.pipeline.store.case_store import CaseStore

    store = CaseStore(store_path)
    inter: dict[int, int] = {}
    total: dict[int, int] = {}
    for case_id in store.committed_cases():
        stem = stem_of(store.manifest(case_id)["image"])
        if stem not in stems:
            continue
        labels, attrs = store.read_labels(case_id)
        case = attrs.volume(labels)
        reference_file = next((root / "reference").glob(f"{stem}.*"))
        reference = align_to(read_volume(reference_file), case, what="reference")
        for value in (int(v) for v in np.unique(reference) if v):
            both = int(np.logical_and(labels == value, reference == value).sum())
            inter[value] = inter.get(value, 0) + both
            total[value] = total.get(value, 0) + int((labels == value).sum() + (reference == value).sum())
    per_label = {v: 2 * inter[v] / total[v] for v in sorted(total)}
    mean = float(np.mean(list(per_label.values())))
    return {"mean": mean, "per_label": per_label, "labels": len(per_label)}


def run(command: list[str], log: list[str]) -> float:
    log.append("medsam-engine " + " ".join(command))
    start = time.perf_counter()
    code = cli(command)
    if code != 0:
        raise RuntimeError(f"`medsam-engine {' '.join(command)}` exited {code}")
    return time.perf_counter() - start


def experiment(name: str, root: Path, part_a: list[str], part_b: list[str], finetune_args: list[str]) -> dict:
    store, log, seconds = root / "store", [], {}
    inputs = [
        "round",
        "run",
        str(root / "images"),
        "--store",
        str(store),
        "--coarse-mask",
        str(root / "masks"),
    ]
    seconds["round 1"] = run(inputs, log)
    round1 = {"A": pooled_dice(store, root, part_a), "B": pooled_dice(store, root, part_b)}
    corrections = [str(next((root / "reference").glob(f"{s}.*"))) for s in part_a]
    seconds["review import"] = run(
        ["review", "import", str(store), *corrections, "--reviewer", "simulated"], log
    )
    # promoted whatever its held-out Dice, so round 2 measures the fine-tuned model; its entry still says
    # whether the default rule (beat the current model on the held-out cases) would have promoted it
    seconds["finetune"] = run(
        [
            "finetune",
            "--store",
            str(store),
            "--out",
            str(root / "round1.pth"),
            "--promote",
            "always",
            *finetune_args,
        ],
        log,
    )
    seconds["round 2"] = run(inputs, log)
    round2 = pooled_dice(store, root, part_b)
    from medsam_engine.pipeline.flywheel.registry import registered_models
    from medsam_engine.pipeline.store.case_store import CaseStore

    entry = registered_models(CaseStore(store))[-1]  # the run's entry, whether it trained a model or not
    reports = [json.loads((store / "_rounds" / f"round-00{n}.json").read_text()) for n in (1, 2)]
    from medsam_engine.pipeline.flywheel.rounds import format_table, round_rows

    return {
        "dataset": name,
        "commands": log,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "round1_A": round1["A"],
        "round1_B": round1["B"],
        "round2_B": round2,
        "lift_B": round2["mean"] - round1["B"]["mean"],
        "finetune": {k: entry[k] for k in ("data", "metrics", "seconds", "trained")},
        "routing": [r["routing"] for r in reports],
        "calibration_round2": reports[1]["calibration"],
        "table": format_table(round_rows(CaseStore(store))),
    }


def summary(result: dict) -> str:
    first_a, first_b, second_b = result["round1_A"], result["round1_B"], result["round2_B"]
    lines = [
        f"== {result['dataset']}",
        f"Dice round 1 (official) part A {first_a['mean']:.4f}, part B {first_b['mean']:.4f}"
        f" ({first_b['labels']} labels)",
        f"Dice round 2 (fine-tuned on A) part B {second_b['mean']:.4f}  -> lift {result['lift_B']:+.4f}",
    ]
    if len(result["round1_B"]["per_label"]) <= 8:
        for label, before in result["round1_B"]["per_label"].items():
            lines.append(f"   label {label}: {before:.4f} -> {result['round2_B']['per_label'][label]:.4f}")
    else:
        before = np.array(list(result["round1_B"]["per_label"].values()))
        after = np.array([result["round2_B"]["per_label"][k] for k in result["round1_B"]["per_label"]])
        better, worse = int((after > before + 1e-4).sum()), int((after < before - 1e-4).sum())
        change = float(np.median(after - before))
        lines.append(f"   per label: better {better}, worse {worse}, median change {change:+.4f}")
    metrics = result["finetune"]["metrics"]
    lines.append(
        f"fine-tune: held-out Dice {metrics['holdout_dice_before']} -> "
        f"{metrics['holdout_dice_after']} "
        f"({metrics['epochs_chosen']} epochs chosen, {result['finetune']['seconds']} s, "
        f"data {json.dumps(result['finetune']['data'])})"
    )
    lines.append(
        f"trained: {result['finetune']['trained']}; the default rule would "
        f"{'promote' if metrics['epochs_chosen'] else 'hold'} it ({metrics['choice']})"
    )
    lines.append(f"seconds: {json.dumps(result['seconds'])}")
    lines.append(f"calibration fitted for round 2: {json.dumps(result['calibration_round2'])}")
    lines.append(result["table"])
    lines += ["commands:"] + [f"   {c}" for c in result["commands"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/flywheel-bench")
    parser.add_argument("--only", choices=["chest", "nuclei"], default=None)
    parser.add_argument("--finetune-arg", action="append", default=[], help="extra `finetune` argument")
    args = parser.parse_args()
    out = Path(args.out)
    results = []
    for name, make in (("chest", chest_data), ("nuclei", nuclei_data)):
        if args.only and name != args.only:
            continue
        root = out / name
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        part_a, part_b = make(root)
        results.append(experiment(name, root, part_a, part_b, args.finetune_arg))
        print(summary(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
