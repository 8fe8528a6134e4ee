"""Issue 3's benchmark: `medsam-engine annotate` vs the official LiteMedSAM loop, measured in one run.

Cases (real data shipped in packages):
* "10 labels": slicerio's chest CT with its 7 labels plus 3 more cut from them (upper halves of both lungs,
  the left ribs), so labels overlap in z as in a multi-organ CT;
* "1 label": the same CT, right lung only;
* "2D": stardist's 512² nuclei image with one box per nucleus (125 boxes);
* "2D 250": that image beside its mirror image (512 x 1024, 250 boxes), the issue's memory case for 2D.

Official loop (eager torch, as MedSAM's CVPR24_LiteMedSAM_infer.py is structured): CT window 40/400, every
(label, slice) pair re-encodes the slice, one box per decoder call, labels written in order; 2D: one
encoder pass, one box per decoder call. Ours: the engine's annotate in a child process (so its peak RSS is
its own) with `ct_window: fixed` (the same single window, hence exactly one encoder pass per slice) and
the configured backend, timed from its first import of the package (imports, discovery with its input
hash, model load, read, prompts, model, commit: all but the interpreter's start). Printed per case: wall
seconds and the ratio, encoder calls per unique slice, encoder and decoder efficiency eta = FLOP / s /
(matmul FLOP/s measured in this run), peak RSS, and Dice of both against the reference and ours against the
official masks.

    .venv/bin/python bench/runner_speed.py [--backend auto|torch|onnxruntime|openvino] [--large]
                                          [--before TREE [--before-module MODULE]]

``--large`` adds the memory check: the CT resampled to 512 x 512 x 300 (1 label), ours only.
``--before TREE`` also times the command line of another checkout (``git worktree add TREE REV``) against
this one on every case, in the same run, each as ``python -m MODULE annotate ...`` with the same
configuration (interpreter start included for both; MODULE by default the checkout's ``cli.main``, under
``pipeline`` before the ``medsam_engine`` namespace): the before/after ratio of a refactoring.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from engine_tree import engine_env  # bench/ (scripts run from bench/)
from machine import matmul_gflops

ENCODER_GFLOP = 74.95  # per 256² slice, 2 FLOP per multiply-add (facts.md)
DECODER_GFLOP = 3.62  # per box

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()  # ours is timed from its first import of the package to the commit


def peak_rss_mb():
    # this process's own high-water mark: Linux carries ru_maxrss over from the parent through fork and exec
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.io.discover import discover
from medsam_engine.pipeline.annotate.job import annotate
from medsam_engine.pipeline.store.case_store import CaseStore
image, mask, root, backend = sys.argv[1:5]
config = EngineConfig.model_validate({"intensity": {"ct_window": "fixed"}, "model": {"backend": backend},
                                      "postprocess": {"chain": []}})
store = CaseStore(root)
cases = discover([image], store.case_ids(), coarse_masks=[mask])
summary = annotate(cases, store, config, show_progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "stats": summary.runner_stats, "case": cases[0].case_id,
                  "failed": [o.reason for o in summary.failed],
                  "peak_rss_mb": peak_rss_mb()}))
"""


def write_cases(folder: Path) -> dict[str, tuple[Path, Path, np.ndarray, object]]:
    """NIfTI/PNG inputs and masks for each case; returns name -> (image, mask, reference on our grid,
    volume)."""
    import cv2
    import nibabel as nib
    import slicerio
    from stardist.data import test_image_nuclei_2d

    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.io.readers import read_volume

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    labels = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume).astype(np.uint16)
    ten = labels.copy()
    for source, new in ((5, 8), (6, 9)):
        zs = np.nonzero((labels == source).any(axis=(1, 2)))[0]
        upper = np.zeros_like(labels, dtype=bool)
        upper[zs[len(zs) // 2] :] = True
        ten[(labels == source) & upper] = new
    ribs = labels == 1
    ribs[:, :, : labels.shape[2] // 2] = False
    ten[ribs] = 10
    affine = volume.geometry.affine[:, [2, 1, 0, 3]]  # (x, y, z) voxel order for NIfTI
    cases = {}
    for name, label_map in (("10 labels", ten), ("1 label", np.where(labels == 5, 5, 0).astype(np.uint16))):
        image, mask = folder / f"{name[:2].strip()}-ct.nii.gz", folder / f"{name[:2].strip()}-mask.nii.gz"
        nib.save(nib.Nifti1Image(volume.array.transpose(2, 1, 0).astype(np.int16), affine), image)
        nib.save(nib.Nifti1Image(label_map.transpose(2, 1, 0), affine), mask)
        cases[name] = (image, mask, label_map, volume.array)
    picture, instances = test_image_nuclei_2d(return_mask=True)
    picture = (picture.astype(np.float32) / picture.max() * 255).astype(np.uint8)
    cv2.imwrite(str(folder / "nuclei.png"), picture)
    cv2.imwrite(str(folder / "nuclei-mask.png"), instances.astype(np.uint16))
    cases["2D"] = (
        folder / "nuclei.png",
        folder / "nuclei-mask.png",
        instances.astype(np.uint16)[None],
        picture[None],
    )
    wide = np.concatenate([picture, picture[:, ::-1]], axis=1)
    mirrored = instances[:, ::-1].astype(np.uint16)
    wide_instances = np.concatenate(
        [instances.astype(np.uint16), np.where(mirrored > 0, mirrored + instances.max(), 0)], axis=1
    )
    cv2.imwrite(str(folder / "wide.png"), wide)
    cv2.imwrite(str(folder / "wide-mask.png"), wide_instances)
    cases["2D 250"] = (folder / "wide.png", folder / "wide-mask.png", wide_instances[None], wide[None])
    return cases


def official(array: np.ndarray, reference: np.ndarray, two_d: bool) -> tuple[np.ndarray, float, dict, float]:
    """The official loop's structure on our canonical arrays; returns masks, loop seconds, runner stats and
    the seconds it took to load the model (in a child process, as a fresh script would: imports included)."""
    from medsam_engine.detectors import compile_boxes
    from medsam_engine.pipeline.core.intensity import to_uint8
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner, foreground

    load = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; t = time.perf_counter(); import torch; "
            "from medsam_engine.pipeline.model.checkpoint import load_lite_medsam; load_lite_medsam(); "
            "print(time.perf_counter() - t)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    load_seconds = float(load.stdout.strip().splitlines()[-1])
    runner = LiteMedSAMRunner(load_lite_medsam(), cache_bytes=0)
    start = time.perf_counter()
    u8 = array if two_d else to_uint8(array, "CT")
    out = np.zeros(reference.shape, dtype=np.uint16)
    if two_d:  # instances: one box per nucleus, one encoder pass for the image
        embedded = runner.encode([u8[0]])[0]
        for value in (int(v) for v in np.unique(reference) if v):
            ys, xs = np.nonzero(reference[0] == value)
            logits, _ = runner.decode(
                embedded, np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], np.float32)
            )
            out[0][foreground(logits)[0]] = 1
        return out, time.perf_counter() - start, runner.stats.as_dict(), load_seconds
    prompts = compile_boxes(reference)
    for label in sorted({p.label for p in prompts}):
        for prompt in sorted((p for p in prompts if p.label == label), key=lambda p: p.z):
            embedded = runner.encode([u8[prompt.z]])[0]
            logits, _ = runner.decode(embedded, np.array([prompt.box], dtype=np.float32))
            out[prompt.z][foreground(logits)[0]] = label
    return out, time.perf_counter() - start, runner.stats.as_dict(), load_seconds


def ours(image: Path, mask: Path, root: Path, backend: str) -> tuple[np.ndarray, dict]:
    from medsam_engine.pipeline.store.case_store import CaseStore

    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(image), str(mask), str(root), backend],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["failed"]:
        raise RuntimeError(result["failed"])
    labels, _ = CaseStore(root).read_labels(result["case"])
    return labels, result


def report(name: str, reference, mine, result, theirs, t_official, official_stats, peak, t_load) -> None:
    from medsam_engine.pipeline.core.metrics import dice

    stats = result["stats"]
    unique = int(reference.any(axis=(1, 2)).sum())
    binary = name.startswith("2D")
    values = [1] if binary else [int(v) for v in np.unique(reference) if v]
    ref = (reference > 0).astype(np.uint16) if binary else reference
    mine = (mine > 0).astype(np.uint16) if binary else mine
    dice_ours = np.mean([dice(mine == v, ref == v) for v in values])
    dice_theirs = np.mean([dice(theirs == v, ref == v) for v in values])
    agree = np.mean([dice(mine == v, theirs == v) for v in values])
    encode_s = stats["seconds_encode"] / max(stats["encoded_slices"], 1)
    decode_s = stats["seconds_decode"] / max(stats["decoded_boxes"], 1)
    official_encode = official_stats["seconds_encode"] / max(official_stats["encoded_slices"], 1)
    official_decode = official_stats["seconds_decode"] / max(official_stats["decoded_boxes"], 1)
    print(f"\n== {name}: {len(values)} label(s), {unique} slice(s), {stats['decoded_boxes']} boxes")
    print(
        f"  official {t_official:8.1f} s  encoder calls {official_stats['encoder_calls']:4d} "
        f"({official_stats['encoder_calls'] / unique:.2f}/slice)  enc {official_encode:.3f} s/slice "
        f"(eta {ENCODER_GFLOP / official_encode / peak:.3f})  dec {official_decode * 1000:.0f} ms/box "
        f"(eta {DECODER_GFLOP / official_decode / peak:.3f})"
    )
    print(
        f"  ours     {result['seconds']:8.1f} s  encoder calls {stats['encoder_calls']:4d} "
        f"({stats['encoded_slices'] / unique:.2f}/slice)  enc {encode_s:.3f} s/slice "
        f"(eta {ENCODER_GFLOP / encode_s / peak:.3f})  dec {decode_s * 1000:.0f} ms/box "
        f"(eta {DECODER_GFLOP / decode_s / peak:.3f})  peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    print(f"  official model load (fresh process, imports included) {t_load:.1f} s")
    print(
        f"  speed-up {(t_official + t_load) / result['seconds']:.2f}x with the official model load, "
        f"{t_official / result['seconds']:.2f}x without it (ours includes its load)"
    )
    print(
        f"  Dice vs reference: ours {dice_ours:.4f}, "
        f"official {dice_theirs:.4f}; ours vs official masks {agree:.4f}"
    )


def large_case(folder: Path, backend: str) -> None:
    import nibabel as nib
    import slicerio
    from scipy import ndimage

    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.io.readers import read_volume

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    labels = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume)
    factors = (300 / volume.shape[0], 512 / volume.shape[1], 512 / volume.shape[2])
    big = ndimage.zoom(volume.array.astype(np.float32), factors, order=1).astype(np.int16)
    big_labels = ndimage.zoom((labels == 5).astype(np.uint8) * 5, factors, order=0).astype(np.uint16)
    affine = volume.geometry.affine @ np.diag([1 / f for f in factors] + [1.0])
    nib.save(nib.Nifti1Image(big.transpose(2, 1, 0), affine[:, [2, 1, 0, 3]]), folder / "big-ct.nii.gz")
    nib.save(
        nib.Nifti1Image(big_labels.transpose(2, 1, 0), affine[:, [2, 1, 0, 3]]), folder / "big-mask.nii.gz"
    )
    _, result = ours(folder / "big-ct.nii.gz", folder / "big-mask.nii.gz", folder / "big-store", backend)
    print(
        f"\n== 512 x 512 x 300 CT, 1 label: {result['seconds']:.1f} s, {result['stats']['encoded_slices']} "
        f"slices encoded, peak RSS {result['peak_rss_mb']:.0f} MB (ours only)"
    )


def cli_seconds(tree: Path, module: str | None, image: Path, mask: Path, out: Path, config: Path) -> float:
    """Wall seconds of ``python -m MODULE annotate`` on the engine of the checkout ``tree`` (MODULE by
    default its package's ``cli.main``)."""
    with tempfile.TemporaryDirectory(prefix="engine-links-") as links:
        env = engine_env(tree, Path(links))
        module = module or f"{env['BENCH_ENGINE_PACKAGE']}.cli.main"
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                module,
                "annotate",
                str(image),
                "--coarse-mask",
                str(mask),
                "--out",
                str(out),
                "--config",
                str(config),
            ],
            cwd=links,
            env=env,
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - start
    return seconds


def before_after(
    folder: Path,
    name: str,
    image: Path,
    mask: Path,
    before: Path,
    module: str | None,
    backend: str,
    repeats: int = 2,
) -> None:
    """Best of ``repeats`` alternating runs of the other checkout's CLI and this one's, on one case."""
    config = folder / "before-after.yaml"
    config.write_text(
        json.dumps(
            {"intensity": {"ct_window": "fixed"}, "model": {"backend": backend}, "postprocess": {"chain": []}}
        )
    )
    here = Path(__file__).resolve().parents[1]
    times: dict[str, list[float]] = {"before": [], "after": []}
    for attempt in range(repeats):
        slug = f"{name.replace(' ', '-')}-{attempt}"
        times["before"].append(cli_seconds(before, module, image, mask, folder / f"before-{slug}", config))
        times["after"].append(cli_seconds(here, None, image, mask, folder / f"after-{slug}", config))
    b, a = min(times["before"]), min(times["after"])
    print(
        f"  before/after ({before.name}): {b:.1f} s vs {a:.1f} s -> after is {b / a:.2f}x the before speed "
        f"(all runs: before {[round(x, 1) for x in times['before']]}, "
        f"after {[round(x, 1) for x in times['after']]})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    parser.add_argument("--before", type=Path, default=None, help="another checkout to time against this one")
    parser.add_argument(
        "--before-module", default=None, help="its command-line module (default: its package's cli.main)"
    )
    args = parser.parse_args()
    peak = matmul_gflops()
    print(
        f"machine matmul {peak:.1f} GFLOP/s, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"backend {args.backend}"
    )
    with tempfile.TemporaryDirectory(prefix="medsam-speed-") as tmp:
        folder = Path(tmp)
        for name, (image, mask, reference, array) in write_cases(folder).items():
            if args.only and name not in args.only:
                continue
            mine, result = ours(image, mask, folder / f"store-{name.replace(' ', '-')}", args.backend)
            theirs, t_official, official_stats, t_load = official(array, reference, name.startswith("2D"))
            report(name, reference, mine, result, theirs, t_official, official_stats, peak, t_load)
            if args.before is not None:
                before_after(
                    folder, name, image, mask, args.before.resolve(), args.before_module, args.backend
                )
        if args.large:
            large_case(folder, args.backend)


if __name__ == "__main__":
    main()
