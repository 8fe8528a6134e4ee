"""Issue 18: a fine-tuned checkpoint runs as fast as the official one, on the same runtime, in one run.

Both checkpoints are built with the engine's default backend (`build_runner(..., backend="auto")`): the
fine-tuned one's graphs are exported and parity-checked once (a cache miss; timed on its own and left out of
the rates), then each runner embeds the same real chest CT slices (slicerio, lung window) and decodes the same
boxes (the lungs' boxes from the reference labels), alternately, ``--repeats`` times; the embedding cache is
emptied before every pass. Printed: seconds per pass for each, the ratio (fine-tuned / official) and the time
the fine-tuned runner took to build (its graphs' export and parity check).

    .venv/bin/python bench/checkpoint_speed.py --checkpoint TUNED.pth [--repeats 3] [--slices 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def chest_slices(count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` lung-window slices of slicerio's chest CT and each slice's lung boxes (XYXY)."""
    import slicerio

    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.io.readers import read_volume

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    labels = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume)
    lungs = [z for z in range(labels.shape[0]) if np.isin(labels[z], (5, 6)).any()]
    chosen = [lungs[i] for i in np.linspace(0, len(lungs) - 1, min(count, len(lungs))).round().astype(int)]
    slices, boxes = [], []
    for z in chosen:
        window = (np.clip(volume.array[z], -1350.0, 150.0) + 1350.0) * (255.0 / 1500.0)  # lung window
        slices.append(np.ascontiguousarray(window.round().astype(np.uint8)))
        per_label = []
        for value in (5, 6):
            rows, cols = np.nonzero(labels[z] == value)
            if rows.size:
                per_label.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        boxes.append(np.array(per_label, dtype=np.float32))
    return slices, boxes


def one_pass(runner, slices: list[np.ndarray], boxes: list[np.ndarray]) -> float:
    runner._cache.clear()  # every pass embeds every slice
    start = time.perf_counter()
    for embedded, slice_boxes in zip(runner.encode(slices), boxes, strict=True):
        runner.decode(embedded, slice_boxes)
    return time.perf_counter() - start


def main() -> None:
    from medsam_engine.pipeline.model.build import build_runner
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a fine-tuned LiteMedSAM checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=16)
    args = parser.parse_args()

    slices, boxes = chest_slices(args.slices)
    official = build_runner(load_lite_medsam(None))
    start = time.perf_counter()
    tuned = build_runner(load_lite_medsam(args.checkpoint))  # exports and checks its graphs on a cache miss
    export_s = time.perf_counter() - start
    print(
        f"backends: official {official.backend}, fine-tuned {tuned.backend}; fine-tuned runner built in "
        f"{export_s:.1f} s (graph export and parity check when not cached)"
    )
    one_pass(official, slices, boxes), one_pass(tuned, slices, boxes)  # warm-up
    times = {"official": [], "fine-tuned": []}
    for _ in range(args.repeats):
        times["official"].append(one_pass(official, slices, boxes))
        times["fine-tuned"].append(one_pass(tuned, slices, boxes))
    best = {name: min(values) for name, values in times.items()}
    print(
        f"{len(slices)} slices, {sum(len(b) for b in boxes)} boxes per pass; seconds per pass (best of "
        f"{args.repeats}): official {best['official']:.3f}, fine-tuned {best['fine-tuned']:.3f}; ratio "
        f"fine-tuned / official {best['fine-tuned'] / best['official']:.3f}"
    )
    print(json.dumps({"all_seconds": {k: [round(v, 3) for v in vs] for k, vs in times.items()}}))


if __name__ == "__main__":
    main()
