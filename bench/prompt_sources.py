"""Prompt sources measured by the Dice MedSAM reaches from their boxes, against oracle boxes, in one run.

Data (real, shipped in packages):
* slicerio's chest CT, lungs (labels 5 right, 6 left): oracle = boxes from the reference label map;
  intensity = HU rules, no labels; learned = the head trained on the lower 75 % of the slices (z-block)
  and evaluated on the upper 25 % it never saw (oracle scored on the same slices).
* stardist's 2D nuclei (512 x 512, one instance per nucleus): oracle = one box per reference instance;
  intensity = Otsu blobs split by watershed; learned = the head trained on the left half, evaluated on the
  right half.
Prints object recall/precision (box IoU >= 0.5) and Dice after MedSAM for each source.

    .venv/bin/python bench/prompt_sources.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from medsam_engine.detectors import BoxRules, build_detector, compile_boxes
from medsam_engine.detectors.evaluation import match_boxes, object_scores
from medsam_engine.detectors.learned import grid_targets, grid_to_slice, render, train_head
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.rendering import renderings
from medsam_engine.pipeline.annotate.segment import segment_volume
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.metrics import dice
from medsam_engine.pipeline.core.types import Geometry, Volume
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
from medsam_engine.pipeline.model.runner import LiteMedSAMRunner


def segment(runner, volume: Volume, coarse: np.ndarray, prompts) -> np.ndarray:
    rendered, window_of, _ = renderings(volume, coarse, prompts, EngineConfig())
    label_map, _ = segment_volume(runner, rendered, prompts, window_of=window_of)
    return label_map


def learned_label_map(
    runner, volume: Volume, train_z: list[int], test_z: list[int], labels: list[int], reference: np.ndarray
) -> tuple[np.ndarray, float]:
    """Train the head on ``train_z`` slices, predict a label map on ``test_z`` (zero elsewhere)."""
    meta = {"ct_window": [40.0, 400.0]}
    rendered = render(volume, meta)
    embed = {z: runner.encode([rendered[z]])[0] for z in sorted(set(train_z) | set(test_z))}
    x = torch.cat([embed[z].tensor().float() for z in train_z])
    y = torch.from_numpy(
        np.stack([grid_targets(reference[z], labels, runner.model.framing) for z in train_z])
    )
    start = time.perf_counter()
    head, _history = train_head((x, y), None, epochs=200, seed=0)
    seconds = time.perf_counter() - start
    out = np.zeros(volume.shape, dtype=np.uint16)
    with torch.no_grad():
        for z in test_z:
            heat = grid_to_slice(
                torch.sigmoid(head(embed[z].tensor().float()))[0].numpy(),
                embed[z].original_hw,
                runner.model.framing,
            )
            out[z] = np.where(heat.max(axis=0) > 0.5, np.asarray(labels)[heat.argmax(axis=0)], 0)
    return out, seconds


def ct_lungs(runner) -> list[str]:
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    reference = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume)
    reference = np.where(np.isin(reference, [5, 6]), reference, 0).astype(np.uint16)
    rows = []
    present = [int(z) for z in np.nonzero(reference.any(axis=(1, 2)))[0]]
    cut = present[int(len(present) * 0.75)]
    test_z = [z for z in present if z >= cut]
    held = np.zeros_like(reference)
    held[test_z] = reference[test_z]
    oracle = compile_boxes(reference, spacing=volume.spacing)
    found = build_detector("intensity", options={"targets": {"right lung": 5, "left lung": 6}})(volume)
    learned_map, seconds = learned_label_map(
        runner, volume, [z for z in range(volume.shape[0]) if z < cut], test_z, [5, 6], reference
    )
    learned = compile_boxes(learned_map, spacing=volume.spacing, source="learned")
    for name, coarse, prompts, scope in (
        ("oracle", reference, oracle, reference),
        ("intensity", found.label_map, found.prompts, reference),
        ("oracle, held-out z", held, [p for p in oracle if p.z >= cut], held),
        ("learned, held-out z", learned_map, learned, held),
    ):
        result = segment(runner, volume, coarse, prompts)
        if scope is held:
            result[:cut] = 0
        objects = object_scores(coarse, scope, [5, 6]) if name != "oracle" else None
        for label in (5, 6):
            recall = f"{objects[label]['recall']:.3f}/{objects[label]['precision']:.3f}" if objects else "1/1"
            rows.append(
                f"chest CT  {name:20s} label {label}  boxes {sum(p.label == label for p in prompts):4d}  "
                f"recall/precision {recall:>11s}  Dice {dice(result == label, scope == label):.4f}"
            )
    rows.append(f"chest CT  learned head trained in {seconds:.1f} s on {len(present) - len(test_z)} slices")
    return rows


def nuclei(runner) -> list[str]:
    from scipy import ndimage
    from stardist.data import test_image_nuclei_2d

    image, instances = test_image_nuclei_2d(return_mask=True)
    image = (image.astype(np.float32) / image.max() * 255).astype(np.uint8)
    geometry = Geometry(np.diag([1.0, 1.0, 1.0, 1.0]), (1, *image.shape), np.eye(4), (1, *image.shape), "2d")
    reference = (instances > 0).astype(np.uint16)[None]
    halves = {"left": (slice(None), slice(0, 256)), "right": (slice(None), slice(256, 512))}
    crops = {}
    for side, (ys, xs) in halves.items():
        crop_geometry = Geometry(geometry.affine, (1, 512, 256), np.eye(4), (1, 512, 256), "2d")
        crops[side] = (
            Volume(image[ys, xs][None], crop_geometry, "OT"),
            reference[:, ys, xs],
            instances[ys, xs][None],
        )
    rows = []
    volume, ref, inst = crops["right"]

    def boxes(m):
        return [
            (f[1].start, f[0].start, f[1].stop - 1, f[0].stop - 1)
            for f in ndimage.find_objects(m[0])
            if f is not None
        ]

    oracle = compile_boxes(ref, instances=inst)
    found = build_detector("intensity")(volume)
    learned_map, seconds = learned_label_map_2d(runner, crops)
    learned = compile_boxes(learned_map, rules=BoxRules(min_voxels=12), source="learned")
    for name, prompts in (("oracle", oracle), ("intensity", found.prompts), ("learned", learned)):
        result = segment_volume(runner, volume.array, prompts)[0]
        hits, missed, extra = match_boxes([p.box for p in prompts], boxes(inst))
        rows.append(
            f"nuclei 2D {name:20s} boxes {len(prompts):4d}  recall/precision "
            f"{hits / max(hits + missed, 1):.3f}/{hits / max(hits + extra, 1):.3f}  "
            f"Dice {dice(result > 0, ref > 0):.4f}"
        )
    rows.append(
        f"nuclei 2D learned head trained in {seconds:.1f} s on the left half, scored on the right half"
    )
    return rows


def learned_label_map_2d(runner, crops) -> tuple[np.ndarray, float]:
    meta = {"ct_window": [40.0, 400.0]}
    train_volume, train_ref, _ = crops["left"]
    test_volume, _, _ = crops["right"]
    train_embedding = runner.encode([render(train_volume, meta)[0]])[0]
    test_embedding = runner.encode([render(test_volume, meta)[0]])[0]
    x = train_embedding.tensor().float()
    y = torch.from_numpy(grid_targets(train_ref[0], [1], runner.model.framing)[None])
    start = time.perf_counter()
    head, _ = train_head((x, y), None, epochs=200, seed=0)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        heat = grid_to_slice(
            torch.sigmoid(head(test_embedding.tensor().float()))[0].numpy(),
            test_embedding.original_hw,
            runner.model.framing,
        )
    return (heat[0] > 0.5).astype(np.uint16)[None], seconds


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runner = LiteMedSAMRunner(load_lite_medsam())
    start = time.perf_counter()
    rows = ct_lungs(runner) + nuclei(runner)
    print("\n".join(rows))
    print(
        f"total {time.perf_counter() - start:.0f} s; encoder passes {runner.stats.encoded_slices}, "
        f"cache hits {runner.stats.cache_hits}"
    )


if __name__ == "__main__":
    main()
