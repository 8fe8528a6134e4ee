"""Slices per second of the Prefect flow on Ray versus the runner alone, on the same real cases, in one run.

Data: slicerio's chest CT cut into ``--cases`` overlapping slabs (distinct cases) with the lung labels (5, 6)
of its segmentation as coarse masks. "Runner alone" is the engine in this process
(`pipeline.annotate.job.annotate`,
model load included); "flow" is `annotate_archive` under a temporary Prefect server on a local Ray started
here (actor start and model load included; Ray and Prefect start-up are printed apart). Both use the default
configuration and every CPU. Prints one table and the ratio flow / runner (the goal is at least 0.8).

    .venv/bin/python bench/flow_throughput.py [--cases 3] [--slices 12] [--device auto|cpu|cuda]
                                              [--flow-first]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_cases(root: Path, cases: int, slices: int) -> tuple[Path, Path]:
    """``cases`` slabs of ``slices`` slices (NRRD, original geometry) and their lung label maps."""
    import nrrd
    import slicerio

    data_dir = Path(slicerio.__file__).parent / "data"
    image, header = nrrd.read(str(data_dir / "CTChest4.nrrd"))
    labels, label_header = nrrd.read(str(data_dir / "Segmentation.seg.nrrd"))
    depth = image.shape[2]
    starts = np.linspace(0, depth - slices, cases).round().astype(int)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for n, z0 in enumerate(starts):
        pairs = ((image, header, images, None), (labels, label_header, masks, (5, 6)))
        for source, src_header, folder, keep in pairs:
            meta = {k: v for k, v in src_header.items() if not k.startswith(("Segment", "sizes"))}
            step = np.asarray(meta["space directions"])[2]
            meta["space origin"] = np.asarray(meta["space origin"], float) + z0 * step
            slab = np.ascontiguousarray(source[:, :, z0 : z0 + slices])
            if keep is not None:
                slab = np.where(np.isin(slab, keep), slab, 0).astype(slab.dtype)
            nrrd.write(str(folder / f"slab{n}.nrrd"), slab, meta)
    return images, masks


def run_runner(images: Path, masks: Path, store: Path, config) -> tuple[float, int]:
    from medsam_engine.pipeline.annotate.job import annotate
    from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
    from medsam_engine.pipeline.io.discover import discover
    from medsam_engine.pipeline.store.case_store import CaseStore

    cases = discover([images], CaseStore(store).case_ids(), coarse_masks=[masks])
    start = time.perf_counter()
    summary = annotate(cases, CaseStore(store), config, runner=LazyRunner(config), show_progress=False)
    seconds = time.perf_counter() - start
    assert summary.count("done") == len(cases), [o.__dict__ for o in summary.outcomes]
    return seconds, sum(o.slices for o in summary.outcomes)


def run_flow(images: Path, masks: Path, store: Path, config) -> tuple[float, int, dict]:
    from medsam_engine.flows.annotate import RunOptions, annotate_archive

    start = time.perf_counter()
    report = annotate_archive(
        inputs=[str(images)], store=str(store), coarse_masks=[str(masks)], run=RunOptions(config=config)
    )
    seconds = time.perf_counter() - start
    assert report["counts"]["done"] == len(report["cases"]), report["counts"]
    return seconds, report["slices"], report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--flow-first", action="store_true", help="run the flow before the runner")
    args = parser.parse_args()
    os.environ.setdefault("MEDSAM_ENGINE_ID_KEY", "bench-flow-throughput")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from medsam_engine.pipeline.annotate.config import EngineConfig

    config = EngineConfig().with_overrides(model={"device": args.device})
    root = Path(tempfile.mkdtemp(prefix="flow-bench-"))
    try:
        images, masks = make_cases(root, args.cases, args.slices)
        if not args.flow_first:
            runner_s, runner_slices = run_runner(images, masks, root / "store-runner", config)
        from prefect.testing.utilities import prefect_test_harness

        from medsam_engine.pipeline.distributed.ray_pool import connect

        started = time.perf_counter()
        connect(None, local_cpus=os.cpu_count())
        ray_s = time.perf_counter() - started
        started = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=120):
            prefect_s = time.perf_counter() - started
            flow_s, flow_slices, report = run_flow(images, masks, root / "store-flow", config)
        if args.flow_first:
            runner_s, runner_slices = run_runner(images, masks, root / "store-runner", config)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    runner_rate, flow_rate = runner_slices / runner_s, flow_slices / flow_s
    print(
        f"{args.cases} cases, {runner_slices} slices with prompts, {os.cpu_count()} CPUs, "
        f"device {args.device}; "
        f"flow: {report['actors']} actor(s), {report['shards']} shard(s)"
    )
    print(f"{'':28s} {'wall s':>8s} {'slices':>7s} {'slices/s':>9s}")
    print(f"{'runner alone (engine)':28s} {runner_s:8.1f} {runner_slices:7d} {runner_rate:9.3f}")
    print(f"{'flow (Prefect + Ray)':28s} {flow_s:8.1f} {flow_slices:7d} {flow_rate:9.3f}")
    print(f"start-up outside the flow: local Ray {ray_s:.1f} s, temporary Prefect server {prefect_s:.1f} s")
    print(f"ratio flow / runner (slices/s): {flow_rate / runner_rate:.3f}")
    cold_rate = flow_slices / (flow_s + ray_s + prefect_s)
    print(f"ratio counting the Ray and Prefect start-up of a cold laptop run: {cold_rate / runner_rate:.3f}")


if __name__ == "__main__":
    main()
