"""Ours vs the official LiteMedSAM loop on a real multi-label CT, measured in one run on this machine.

The baseline reimplements the official inference structure (MedSAM's CVPR24_LiteMedSAM_infer.py): MedSAM
preprocessing with the default CT window 40/400 on the array as stored, the slice re-encoded for every
(label, slice) pair, one box per decoder call, labels written in ascending order with later ones
overwriting earlier ones. Both get the same tight boxes per object and slice from the reference labels.

Prints: wall time of each and the speed ratio, encoder calls / unique slices, encoder efficiency
eta = 74.95 GFLOP / s per slice / matmul GFLOP/s measured here, and Dice per label for both.

    .venv/bin/python bench/compare_official.py [--image CT --labels LABELS] [--threads N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import matmul_gflops  # bench/machine.py (scripts run from bench/)

ENCODER_GFLOP = 74.95  # facts.md: 2 FLOP per multiply-add, 256x256 input


def official_loop(image: Path, labels_path: Path) -> tuple[np.ndarray, float, int]:
    """The official structure on the stored array; returns its label map (canonical grid), seconds,
    encodes."""
    import nrrd

    from medsam_engine.detectors.coarse_mask import boxes_from_label_map
    from medsam_engine.pipeline.core.intensity import to_uint8
    from medsam_engine.pipeline.io.readers import read_volume
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner, foreground

    raw, _ = nrrd.read(str(image))
    stored = np.transpose(raw, (2, 1, 0))  # SimpleITK's GetArrayFromImage order, no reorientation
    reference_raw, _ = nrrd.read(str(labels_path))
    reference = np.transpose(reference_raw, (2, 1, 0))
    runner = LiteMedSAMRunner(load_lite_medsam(), cache_bytes=0)  # the official loop caches nothing
    start = time.perf_counter()
    u8 = to_uint8(stored, "CT")
    segs = np.zeros(stored.shape, dtype=np.uint16)
    prompts = boxes_from_label_map(reference)
    for label in sorted({p.label for p in prompts}):
        for z in sorted({p.z for p in prompts if p.label == label}):
            for prompt in (p for p in prompts if p.label == label and p.z == z):
                embedded = runner.encode([u8[z]])[
                    0
                ]  # re-encoded per (label, slice) as the official script does
                logits, _ = runner.decode(embedded, np.array([prompt.box], dtype=np.float32))
                segs[z][foreground(logits)[0]] = label
    seconds = time.perf_counter() - start
    # bring the result onto the canonical grid our store uses, for a like-for-like Dice
    volume = read_volume(image)
    canonical = np.transpose(segs, (2, 1, 0))
    from medsam_engine.pipeline.core.orientation import canonical_volume

    canon = canonical_volume(canonical, volume.geometry.source_affine, modality="CT", source_format="nrrd")
    return canon.array, seconds, runner.stats.encoder_calls


def ours(image: Path, labels_path: Path, workdir: Path) -> tuple[np.ndarray, float, dict]:
    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.annotate.job import annotate
    from medsam_engine.pipeline.io.discover import discover
    from medsam_engine.pipeline.store.case_store import CaseStore

    store = CaseStore(workdir / "store")
    cases = discover([image], store.case_ids(), coarse_masks=[labels_path])
    start = time.perf_counter()
    summary = annotate(cases, store, EngineConfig(), show_progress=False)
    seconds = time.perf_counter() - start
    labels, _ = store.read_labels(cases[0].case_id)
    return labels, seconds, summary.runner_stats


def main() -> None:
    import slicerio

    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.core.metrics import dice
    from medsam_engine.pipeline.io.readers import read_volume

    data = Path(slicerio.__file__).parent / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=data / "CTChest4.nrrd")
    parser.add_argument("--labels", type=Path, default=data / "Segmentation.seg.nrrd")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_gflops()
    workdir = Path(tempfile.mkdtemp(prefix="medsam-bench-"))
    try:
        mine, t_ours, stats = ours(args.image, args.labels, workdir)
        official, t_official, official_encodes = official_loop(args.image, args.labels)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    volume = read_volume(args.image)
    reference = align_to(read_volume(args.labels), volume)
    unique_slices = len({z for z in range(reference.shape[0]) if reference[z].any()})
    per_slice = stats["seconds_encode"] / max(stats["encoded_slices"], 1)
    print(f"machine matmul: {peak:.1f} GFLOP/s ({args.threads} threads)")
    print(
        f"ours:     {t_ours:7.1f} s, encoder calls {stats['encoder_calls']} for {unique_slices} unique "
        f"slices "
        f"({stats['encoder_calls'] / unique_slices:.2f} per slice), decoder calls {stats['decoder_calls']} "
        f"for {stats['decoded_boxes']} boxes"
    )
    print(
        f"official: {t_official:7.1f} s, encoder calls {official_encodes} "
        f"({official_encodes / unique_slices:.2f} per slice)"
    )
    print(f"speed-up (official / ours): {t_official / t_ours:.2f}x")
    print(f"encoder eta: {ENCODER_GFLOP / per_slice / peak:.3f} ({per_slice:.2f} s per slice)")
    print(f"{'label':>5s} {'Dice ours':>10s} {'Dice official':>14s}")
    for label in (int(v) for v in np.unique(reference) if v):
        print(
            f"{label:5d} {dice(mine == label, reference == label):10.4f} "
            f"{dice(official == label, reference == label):14.4f}"
        )
    print(
        f"{'mean':>5s} {np.mean([dice(mine == v, reference == v) for v in np.unique(reference) if v]):10.4f} "
        f"{np.mean([dice(official == v, reference == v) for v in np.unique(reference) if v]):14.4f}"
    )


if __name__ == "__main__":
    main()
