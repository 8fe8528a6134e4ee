"""What each post-processing step does to Dice on real data, measured in one run.

MedSAM segments each dataset once from oracle boxes (slice mode, default windows); every step is then
applied alone to that raw label map, and so is each modality's default chain. Printed: mean Dice over labels
(and per label) with and without the step, and the seconds each took.

Data: slicerio's chest CT (7 labels: ribs, 3 spine parts, 2 lungs, body) and stardist's 2D nuclei (one label,
183 instances). Raw maps are cached in --cache so reruns skip the model.

    .venv/bin/python bench/postprocess_steps.py [--cache /tmp/pp-cache]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from medsam_engine.postprocess.chain import apply_chain, default_chain

STEPS = [
    {"op": "remove_small_components", "min_volume_mm3": 10.0},
    {"op": "remove_small_components", "min_volume_mm3": 100.0},
    {"op": "remove_small_components", "min_volume_mm3": 1000.0},
    {"op": "remove_small_components_2d", "min_area_mm2": 10.0},
    {"op": "remove_small_components_2d", "min_area_mm2": 50.0},
    {"op": "keep_largest_components", "k": 1},
    {"op": "fill_holes_2d", "max_area_mm2": 10.0},
    {"op": "fill_holes_2d", "max_area_mm2": 100.0},
    {"op": "fill_holes_2d"},
    {"op": "opening", "radius_mm": 1.0},
    {"op": "opening", "radius_mm": 3.0},
    {"op": "closing", "radius_mm": 1.0},
    {"op": "closing", "radius_mm": 3.0},
    {"op": "opening", "radius_mm": 6.5},
    {"op": "closing", "radius_mm": 6.5},
    {"op": "smooth_gaussian", "sigma_mm": 1.0},
    {"op": "smooth_gaussian", "sigma_mm": 3.0},
    {"op": "simplify_contours_2d", "tolerance_mm": 0.5},
    {"op": "simplify_contours_2d", "tolerance_mm": 3.0},
    {"op": "drop_disconnected_slices"},
    {"op": "bridge_slice_gaps"},
]


def chest(cache: Path):
    import slicerio

    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.io.readers import read_volume

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    reference = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume).astype(np.uint16)
    return "chest CT", "CT", volume, reference, _raw(cache / "chest.npy", volume, reference)


def nuclei(cache: Path):
    from stardist.data import test_image_nuclei_2d

    from medsam_engine.pipeline.core.types import Geometry, Volume

    image, instances = test_image_nuclei_2d(return_mask=True)
    image = (image.astype(np.float32) / image.max() * 255).astype(np.uint8)[None]
    geometry = Geometry(np.eye(4), image.shape, np.eye(4), image.shape, "2d")
    volume = Volume(image, geometry, "OT")
    reference = (instances > 0).astype(np.uint16)[None]
    return (
        "nuclei 2D",
        "2D",
        volume,
        reference,
        _raw(cache / "nuclei.npy", volume, reference, instances[None]),
    )


def _raw(path: Path, volume, reference, instances=None) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    from medsam_engine.detectors import compile_boxes
    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.annotate.rendering import renderings
    from medsam_engine.pipeline.annotate.segment import segment_volume
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    runner = LiteMedSAMRunner(load_lite_medsam())
    prompts = compile_boxes(reference, spacing=volume.spacing, instances=instances)
    rendered, window_of, _ = renderings(volume, reference, prompts, EngineConfig())
    label_map, _ = segment_volume(runner, rendered, prompts, window_of=window_of)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, label_map)
    return label_map


def scores(prediction: np.ndarray, reference: np.ndarray) -> dict[int, float]:
    from medsam_engine.pipeline.core.metrics import dice

    return {int(v): dice(prediction == v, reference == v) for v in np.unique(reference) if v}


def describe(step: dict) -> str:
    return step["op"] + "".join(f" {k}={v}" for k, v in step.items() if k != "op")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/medsam-engine-pp-cache"))
    args = parser.parse_args()
    for name, kind, volume, reference, raw in (chest(args.cache), nuclei(args.cache)):
        base = scores(raw, reference)
        mean = float(np.mean(list(base.values())))
        print(
            f"\n{name}: raw MedSAM mean Dice {mean:.4f}  per label "
            + " ".join(f"{k}:{v:.3f}" for k, v in base.items())
        )
        candidates = [[s] for s in STEPS] + [default_chain(kind)]
        for chain in candidates:
            start = time.perf_counter()
            cleaned, _ = apply_chain(raw, spacing=volume.spacing, chain=chain)
            seconds = time.perf_counter() - start
            after = scores(cleaned, reference)
            delta = float(np.mean(list(after.values()))) - mean
            label = (
                "default chain: " + "; ".join(describe(s) for s in chain)
                if len(chain) != 1 or chain is candidates[-1]
                else describe(chain[0])
            )
            worst = min(after, key=lambda k: after[k] - base[k])
            print(
                f"  {delta:+.4f}  worst label {worst} {after[worst] - base[worst]:+.4f}  {seconds:5.2f} s  "
                f"{label}"
            )


if __name__ == "__main__":
    main()
