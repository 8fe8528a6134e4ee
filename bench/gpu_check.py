"""Issue 3's GPU check, prepared to run as one script when the `device` tool lends a GPU (it also runs on CPU,
smaller, as a smoke test of the script itself).

Measures, in one run on one device:
* the device's own matmul rate (fp32 and bf16, 4096², torch), the denominator of every efficiency figure;
* LiteMedSAM's encoder in slices/s at each ``--batches`` size (default 1 and 64), fp32 and bf16 autocast,
  on real chest CT slices (slicerio), with eta = 74.95 GFLOP x slices/s / matmul rate of that precision;
* bf16 against fp32 on the same slices: largest embedding difference and mask agreement (Dice) of all
  reference boxes of those slices;
* end to end: `annotate` on the 10-label chest CT case of bench/runner_speed.py (model load, read, prompts,
  model, commit; device as given, backend auto = eager torch on CUDA) in slices/s, with Dice against the
  reference labels;
* issue 19, keeping the GPU fed: the isolated encoder rate at the batch the engine sizes from free device
  memory (bf16 on CUDA), and on the same node the Ray pipeline's rate in two layouts: the engine's default
  plan (several actors sharing the GPU, each with its share of the node's CPUs and of the GPU's memory) and
  one actor holding the whole GPU and all the CPUs (``--gpus-per-actor 1``), one case worker per CPU,
  annotating ``--copies`` 512 x 512 chest CT cases (DICOM Explicit VR Little Endian and NIfTI, lungs as
  coarse masks) and ``--tiles`` small 2D nuclei cases; prompted slices per second after each actor's model
  is warm, and the ratio to the isolated encoder rate (goal >= 0.8).

    .venv/bin/python bench/gpu_check.py [--device cuda] [--batches 1 64] [--repeats 5] [--copies 8]
                                        [--tiles 400] [--json FILE]

The figures are printed and, with ``--json`` (default ``$OUT/gpu_check.json`` when ``OUT`` is set), written
as JSON. Nothing is downloaded: the model is the bundled checkpoint, the data ship in slicerio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

ENCODER_GFLOP = 74.95  # per 256² slice (facts.md)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype, size: int = 4096, repeats: int = 10) -> float:
    """GFLOP/s of a square matmul on ``device`` in ``dtype`` (2 FLOP per multiply-add)."""
    if device == "cpu":
        size, repeats = 2048, 5
        if dtype == torch.bfloat16:
            return float("nan")  # the CPU path never runs bf16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def real_slices():
    """uint8 chest CT slices (window 40/400) that hold reference labels, and each slice's reference boxes."""
    import slicerio

    from medsam_engine.detectors import compile_boxes
    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.core.intensity import to_uint8
    from medsam_engine.pipeline.io.readers import read_volume

    data = Path(slicerio.__file__).parent / "data"
    volume = read_volume(data / "CTChest4.nrrd")
    labels = align_to(read_volume(data / "Segmentation.seg.nrrd"), volume).astype(np.uint16)
    u8 = to_uint8(volume.array, "CT")
    prompts = compile_boxes(labels)
    zs = sorted({p.z for p in prompts})
    boxes = {z: np.array([p.box for p in prompts if p.z == z], np.float32) for z in zs}
    return [u8[z] for z in zs], [boxes[z] for z in zs]


def encoder_speed(runner, slices: list[np.ndarray], batch: int, repeats: int) -> float:
    """Slices/s of the runner's encoder at ``batch`` slices per call (distinct real slices, cycled)."""
    chunk = [slices[i % len(slices)] for i in range(batch)]
    runner._encode(chunk)  # warm-up: kernels, allocator, autotuning
    synchronize(runner.device)
    start = time.perf_counter()
    for _ in range(repeats):
        runner._encode(chunk)
    synchronize(runner.device)
    return batch * repeats / (time.perf_counter() - start)


def bf16_agreement(model, device: str, slices, boxes) -> dict:
    """bf16 autocast vs fp32 on the same slices: max |embedding delta| and Dice of every box's mask."""
    from medsam_engine.pipeline.core.metrics import dice
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner, foreground

    fp32 = LiteMedSAMRunner(model, device=device, precision="fp32", cache_bytes=0)
    bf16 = LiteMedSAMRunner(model, device=device, precision="bf16", cache_bytes=0)
    worst, scores = 0.0, []
    for u8, slice_boxes in zip(slices[:8], boxes[:8], strict=False):
        a, b = fp32._encode([u8])[0], bf16._encode([u8])[0]
        worst = max(worst, float(np.abs(a.array() - b.array()).max()))
        masks_a = foreground(fp32.decode(a, slice_boxes)[0])
        masks_b = foreground(bf16.decode(b, slice_boxes)[0])
        scores += [dice(x, y) for x, y in zip(masks_a, masks_b, strict=False)]
    return {
        "embedding_max_abs_delta": worst,
        "mask_dice_mean": float(np.mean(scores)),
        "mask_dice_min": float(np.min(scores)),
        "boxes": len(scores),
    }


def end_to_end(device: str) -> dict:
    """``annotate`` on the 10-label chest CT case (bench/runner_speed.py's), in this process."""
    from runner_speed import write_cases

    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.annotate.job import annotate
    from medsam_engine.pipeline.core.metrics import dice
    from medsam_engine.pipeline.io.discover import discover
    from medsam_engine.pipeline.store.case_store import CaseStore

    with tempfile.TemporaryDirectory(prefix="medsam-gpu-") as tmp:
        image, mask, reference, _ = write_cases(Path(tmp))["10 labels"]
        store = CaseStore(Path(tmp) / "store")
        config = EngineConfig.model_validate(
            {"model": {"device": device}, "intensity": {"ct_window": "fixed"}, "postprocess": {"chain": []}}
        )
        start = time.perf_counter()
        cases = discover([image], store.case_ids(), coarse_masks=[mask])
        summary = annotate(cases, store, config, show_progress=False)
        seconds = time.perf_counter() - start
        if summary.failed:
            raise RuntimeError([o.reason for o in summary.failed])
        labels, _ = store.read_labels(cases[0].case_id)
    slices = int(reference.any(axis=(1, 2)).sum())
    values = [int(v) for v in np.unique(reference) if v]
    return {
        "seconds": seconds,
        "slices": slices,
        "slices_per_s": slices / seconds,
        "dice_mean": float(np.mean([dice(labels == v, reference == v) for v in values])),
        "runner": summary.runner_stats,
    }


def memory_sized_encoder(model, device: str, slices, repeats: int) -> dict:
    """The isolated encoder at the engine's own batch size (sized by free device memory on CUDA)."""
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    runner = LiteMedSAMRunner(model, device=device, cache_bytes=0)  # precision auto: bf16 autocast on CUDA
    batch = runner.memory_batch()
    return {
        "batch": batch,
        "bf16": runner.bf16,
        "slices_per_s": encoder_speed(runner, slices, batch, repeats),
    }


def pipeline_cases(root: Path, copies: int, tiles: int, ids) -> list:
    """CaseRefs of ``copies`` distinct chest CT cases (each as a DICOM series and as NIfTI, the lungs as
    coarse mask) and of ``tiles`` small 2D nuclei cases with their instance masks (bench/pipeline_ceiling.py
    makes them from slicerio and stardist)."""
    from pipeline_ceiling import SYNTAXES, make_2d, make_3d

    from medsam_engine.pipeline.io.discover import discover

    inputs, masks = [], []
    for k in range(copies):
        made = make_3d(root / f"ct-{k}", variant=k + 1, syntaxes={"explicit-le": SYNTAXES["explicit-le"]})
        inputs += [pair[0] for pair in made.values()]
        masks += [pair[1] for pair in made.values()]
    cases = discover(inputs, ids, coarse_masks=masks) if inputs else []
    if tiles:
        images, tile_masks = make_2d(root / "tiles", tiles)
        cases += discover([images], ids, coarse_masks=[tile_masks])  # masks paired with tiles by file name
    return cases


def ray_pipeline(device: str, copies: int, tiles: int, gpus_per_actor: float | None) -> dict:
    """Prompted slices/s of the Ray pipeline on this node with the engine's actor plan for
    ``gpus_per_actor`` (None: the default, several actors sharing the GPU; 1: one actor with the whole GPU;
    on CPU: CPU actors), each actor warmed on one case, then timed over the rest, sharded as the engine
    does."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.distributed.ray_pool import (
        Job,
        PoolOptions,
        cluster_nodes,
        connect,
        drive,
        get_annotator,
        plan_actors,
        release_annotators,
    )
    from medsam_engine.pipeline.store.case_store import CaseStore

    connect()
    cuda = device.startswith("cuda")
    plan = plan_actors(cluster_nodes(), PoolOptions(gpus_per_actor=gpus_per_actor if cuda else 0))
    config_json = EngineConfig.model_validate({"model": {"device": device}}).model_dump_json()
    with tempfile.TemporaryDirectory(prefix="medsam-gpu-ray-") as tmp:
        store = CaseStore(Path(tmp) / "store")
        cases = [dataclasses.asdict(c) for c in pipeline_cases(Path(tmp), copies, tiles, store.case_ids())]
        actors = [get_annotator(plan, k, config_json) for k in range(plan.count)]
        job = Job(str(store.root), "gpu-check", config_json)
        warm, timed = cases[: plan.count], cases[plan.count :]
        shards = [timed[k :: plan.count] for k in range(plan.count)]
        try:
            with ThreadPoolExecutor(plan.count) as pool:  # model load, kernels: one case per actor
                list(
                    pool.map(lambda k: drive([warm[k]], lambda lost=None: actors[k], job), range(plan.count))
                )
                before = [ray.get(a.info.remote())["runner"] for a in actors]
                start = time.perf_counter()
                outcomes = [
                    o
                    for part in pool.map(
                        lambda k: drive(
                            shards[k], lambda lost=None: actors[k], job, in_flight=plan.case_workers + 1
                        ),
                        range(plan.count),
                    )
                    for o in part
                ]
                seconds = time.perf_counter() - start
            after = [ray.get(a.info.remote())["runner"] for a in actors]
        finally:
            release_annotators(plan, config_json)
        failed = [o for o in outcomes if o["status"] != "done"]
        if failed:
            reasons = [error.get("reason") for error in store.errors().values()]
            raise RuntimeError(f"{len(failed)} of {len(outcomes)} cases failed: {reasons[:3]}")
    slices = sum(a["encoded_slices"] - b["encoded_slices"] for a, b in zip(after, before, strict=False))
    calls = sum(a["encoder_calls"] - b["encoder_calls"] for a, b in zip(after, before, strict=False))
    return {
        "actors": plan.count,
        "cpus": plan.num_cpus,
        "gpus": plan.num_gpus,
        "case_workers": plan.case_workers,
        "cases": len(outcomes),
        "slices": slices,
        "seconds": seconds,
        "slices_per_s": slices / seconds,
        "slices_per_encoder_call": slices / max(1, calls),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--copies", type=int, default=8, help="CT cases for the Ray pipeline (x2: DICOM, NIfTI)"
    )
    parser.add_argument("--tiles", type=int, default=400, help="small 2D cases for the Ray pipeline")
    parser.add_argument(
        "--json", default=str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None
    )
    args = parser.parse_args()
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.devices import resolve_device
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    device = resolve_device(args.device)
    name = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu, {torch.get_num_threads()} threads"
    )
    report: dict = {
        "device": name,
        "torch": torch.__version__,
        "matmul_gflops": {
            "fp32": matmul_rate(device, torch.float32),
            "bf16": matmul_rate(device, torch.bfloat16),
        },
    }
    print(
        f"{name}, torch {torch.__version__}: matmul fp32 {report['matmul_gflops']['fp32']:.0f} GFLOP/s, "
        f"bf16 {report['matmul_gflops']['bf16']:.0f} GFLOP/s"
    )
    model = load_lite_medsam(device=device)
    slices, boxes = real_slices()
    precisions = ["fp32", "bf16"] if device.startswith("cuda") else ["fp32"]
    report["encoder"] = []
    for precision in precisions:
        runner = LiteMedSAMRunner(model, device=device, precision=precision, cache_bytes=0)
        rate = report["matmul_gflops"][precision]
        for batch in args.batches:
            speed = encoder_speed(runner, slices, batch, args.repeats)
            row = {
                "precision": precision,
                "batch": batch,
                "slices_per_s": speed,
                "eta": ENCODER_GFLOP * speed / rate,
            }
            if device.startswith("cuda"):
                row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            report["encoder"].append(row)
            print(f"encoder {precision} batch {batch:3d}: {speed:8.1f} slices/s, eta {row['eta']:.3f}")
    if device.startswith("cuda"):
        report["bf16_vs_fp32"] = bf16_agreement(model, device, slices, boxes)
        print(f"bf16 vs fp32: {report['bf16_vs_fp32']}")
    report["end_to_end"] = end_to_end(device)
    e2e = report["end_to_end"]
    print(
        f"annotate, 10-label chest CT: {e2e['slices']} slices in {e2e['seconds']:.1f} s = "
        f"{e2e['slices_per_s']:.2f} slices/s (model load included), Dice {e2e['dice_mean']:.4f}"
    )
    report["isolated_encoder"] = memory_sized_encoder(model, device, slices, args.repeats)
    isolated = report["isolated_encoder"]
    print(
        f"isolated encoder at the engine's batch ({isolated['batch']} slices, bf16 {isolated['bf16']}): "
        f"{isolated['slices_per_s']:.1f} slices/s"
    )
    layouts = (
        {"default plan": None, "one actor per GPU": 1.0} if device.startswith("cuda") else {"CPU actors": 0}
    )
    report["ray_pipeline"] = {}
    for layout, share in layouts.items():  # the engine's default, then one process holding the whole GPU
        flow = report["ray_pipeline"][layout] = ray_pipeline(device, args.copies, args.tiles, share)
        flow["ratio_to_isolated_encoder"] = flow["slices_per_s"] / isolated["slices_per_s"]
        print(
            f"Ray pipeline, {layout}: {flow['actors']} actor(s) x {flow['cpus']} CPUs, {flow['gpus']:g} GPU "
            f"({flow['case_workers']} case workers each): {flow['cases']} cases, {flow['slices']} slices in "
            f"{flow['seconds']:.1f} s = {flow['slices_per_s']:.1f} slices/s "
            f"({flow['slices_per_encoder_call']:.1f} "
            f"per encoder call); ratio to the isolated encoder {flow['ratio_to_isolated_encoder']:.2f} "
            "(goal >= 0.8)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
