"""Issue 19's ceiling: slices per second and per-case overhead of everything but the model, in one run.

The model is replaced by bench/null_runner.py (every box comes back filled, at once), so what is timed is
the pipeline around it: discovery (headers, keyed ids), signature hashing, the isolated reader (DICOM
decoding), prompts from the coarse masks, post-processing, quality records, zarr commit, manifests and the
run record. Data (real, shipped in packages):

* 3D: slicerio's chest CT resampled to 512 x 512 in-plane (34 slices, the lungs as coarse mask on 26 of
  them), written as NIfTI and as DICOM series in four transfer syntaxes (Explicit VR Little Endian, RLE
  Lossless, JPEG-LS Lossless, JPEG 2000 Lossless): one case each, repeated ``--repeats`` times in fresh
  stores;
* 2D: ``--tiles`` crops (96 x 96) of stardist's nuclei image with their instance masks: many small cases.

Each row runs the local engine (`pipeline.annotate.job.annotate`: one process, its case workers and their
reader processes) and, with ``--ray``, the same cases sharded over the engine's Ray actors as it plans them
for this machine (`plan_actors`, `drive`; on 2 cores one actor of 2 CPUs with 2 case workers), after a set
of warm-up cases through the same actors (untimed, as is discovery). Printed per row: wall seconds,
prompted slices per wall second, prompted slices per CPU-second (user + system time of the process and of
its children, the reader processes included while they run: "per core"; on Ray the actors' CPUs count as
busy for the whole wall time), the series' slices per CPU-second (every slice is read, hashed, stored; the
prompted ones are also segmented, post-processed and scored) and milliseconds per case.

The machine's own speed is measured in the same run and printed first (one core: fp32 matrix products in
GFLOP/s, a 64 MiB copy in GB/s, a pure-Python loop in millions of additions per second): the figures move
with it (this shared 2-core machine varied by a third within one day), the ratios to ``--baseline`` do not.

    .venv/bin/python bench/pipeline_ceiling.py [--repeats 3] [--tiles 200] [--ray] [--baseline REV [--rounds
    2]]

With ``--baseline REV`` the same rows are measured on the engine of git commit REV (a temporary worktree,
imported through bench/engine_tree.py; this bench script and data) and on this tree, alternately
``--rounds`` times by child processes, and each row's best run of each engine is compared: today's figures
and the new ones from one run on one machine, a drift of the host's speed weighing on both alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from engine_tree import engine, engine_env  # bench/ (scripts run from bench/)
from null_runner import NullLazyRunner

SYNTAXES = {
    "explicit-le": "1.2.840.10008.1.2.1",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg-ls": "1.2.840.10008.1.2.4.80",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
}


def chest_512() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, k) int16 CT resampled to 512 x 512 in-plane, its lungs (5, 6) and the new voxel->LPS affine."""
    import cv2
    import nrrd
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    image, header = nrrd.read(str(data / "CTChest4.nrrd"))
    labels, _ = nrrd.read(str(data / "Segmentation.seg.nrrd"))
    size = 512
    ct = (
        np.stack(
            [
                cv2.resize(image[:, :, k].astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
                for k in range(image.shape[2])
            ],
            axis=2,
        )
        .round()
        .astype(np.int16)
    )
    lungs = np.where(np.isin(labels, (5, 6)), labels, 0).astype(np.uint8)
    mask = np.stack(
        [
            cv2.resize(lungs[:, :, k], (size, size), interpolation=cv2.INTER_NEAREST)
            for k in range(lungs.shape[2])
        ],
        axis=2,
    )
    directions = np.asarray(header["space directions"], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = directions.T * np.array([image.shape[0] / size, image.shape[1] / size, 1.0])
    affine[:3, 3] = np.asarray(header["space origin"], dtype=float)
    return ct, mask, affine


def write_dicom(ct: np.ndarray, affine_lps: np.ndarray, folder: Path, syntax: str) -> None:
    """One CT series, one file per slice, in ``syntax``."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    row = affine_lps[:3, 1] / np.linalg.norm(affine_lps[:3, 1])
    col = affine_lps[:3, 0] / np.linalg.norm(affine_lps[:3, 0])
    for k in range(ct.shape[2]):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
        ds.FrameOfReferenceUID, ds.InstanceNumber = frame, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [*map(float, col), *map(float, row)]
        ds.ImagePositionPatient = [float(v) for v in affine_lps[:3, :3] @ [0, 0, k] + affine_lps[:3, 3]]
        ds.PixelSpacing = [float(np.linalg.norm(affine_lps[:3, 1])), float(np.linalg.norm(affine_lps[:3, 0]))]
        ds.SliceThickness = float(np.linalg.norm(affine_lps[:3, 2]))
        ds.Rows, ds.Columns = ct.shape[1], ct.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        pixels = np.ascontiguousarray(ct[:, :, k].T)
        ds.PixelData = pixels.tobytes()
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax, pixels)
        ds.save_as(str(folder / f"IM{k:04d}.dcm"), enforce_file_format=True)


def make_3d(
    root: Path, variant: int = 0, syntaxes: dict[str, str] = SYNTAXES
) -> dict[str, tuple[Path, Path]]:
    """The CT as NIfTI and as a DICOM series per syntax (new UIDs each call); ``variant`` changes one corner
    voxel so that copies are distinct cases."""
    import nibabel as nib

    ct, mask, affine_lps = chest_512()
    ct[0, 0, 0] += variant
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    cases = {}
    (root / "masks").mkdir(parents=True)
    mask_path = root / "masks" / "lungs.nii.gz"
    nib.save(nib.Nifti1Image(mask, affine_ras), str(mask_path))
    nifti = root / "nifti" / "chest.nii.gz"
    nifti.parent.mkdir()
    nib.save(nib.Nifti1Image(ct, affine_ras), str(nifti))
    cases["NIfTI"] = (nifti, mask_path)
    for name, uid in syntaxes.items():
        folder = root / f"dicom-{name}"
        write_dicom(ct, affine_lps, folder, uid)
        cases[f"DICOM {name}"] = (folder, mask_path)
    return cases


def make_2d(root: Path, tiles: int, seed: int = 0) -> tuple[Path, Path]:
    import cv2
    import stardist
    import tifffile

    data = Path(stardist.__file__).parent / "data" / "images"
    image = tifffile.imread(str(data / "img2d.tif")).astype(np.float64)
    mask = tifffile.imread(str(data / "mask2d.tif"))
    scaled = ((image - image.min()) / max(float(image.max() - image.min()), 1e-6) * 255).astype(np.uint8)
    images, masks = root / "tiles", root / "tile-masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    made = 0
    while made < tiles:
        y, x = rng.integers(0, 512 - 96, 2)
        window = np.s_[y : y + 96, x : x + 96]
        if mask[window].max() == 0:
            continue
        cv2.imwrite(str(images / f"t{made:04d}.png"), scaled[window])
        cv2.imwrite(str(masks / f"t{made:04d}.png"), mask[window].astype(np.uint16))
        made += 1
    return images, masks


def _live_children_cpu() -> float:
    """CPU seconds of this process's children that are still running (the reader processes, which
    RUSAGE_CHILDREN does not count until they end), from /proc (Linux; 0 elsewhere)."""
    total, me, tick = 0.0, str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its children, ended or alive."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + _live_children_cpu()


def run_local(inputs: list[Path], masks: list[Path], store: Path, config) -> dict:
    annotate = engine("annotate.job").annotate
    discover = engine("io.discover").discover
    CaseStore = engine("store.case_store").CaseStore

    s = CaseStore(store)
    wall, cpu = time.perf_counter(), cpu_seconds()
    cases = discover([str(p) for p in inputs], s.case_ids(), coarse_masks=[str(m) for m in masks])
    runner = NullLazyRunner(config)
    summary = annotate(cases, s, config, runner=runner, show_progress=False)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    assert summary.count("done") == len(cases), [o.reason for o in summary.failed]
    return {
        "cases": len(cases),
        "slices": sum(o.slices for o in summary.outcomes),
        "wall": wall,
        "cpu": cpu,
        "series_slices": series_slices(s),
    }


def series_slices(store) -> int:
    """Slices of every committed case's volume (its z extent), read after the timed part."""
    return sum(int(a.geometry.shape[0]) for a in store.all_attributes().values())


def machine_speed() -> dict:
    """This machine's speed on one core now: fp32 matrix products (GFLOP/s, bench/machine.py's measure on one
    torch thread), a 64 MiB copy (GB/s) and a pure-Python loop (millions of additions per second), best of
    three each, in a child process (torch stays out of this one)."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--machine-speed"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure_machine() -> dict:
    import torch
    from machine import matmul_gflops  # bench/machine.py: the FLOP rate every bench here divides by

    torch.set_num_threads(1)
    big = np.ones(64 << 18, dtype=np.float32)  # 64 MiB
    out = np.empty_like(big)
    best = {"gflops": max(matmul_gflops(1024, 10) for _ in range(3)), "copy_gbs": 0.0, "python_madds": 0.0}
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(4):
            np.copyto(out, big)
        best["copy_gbs"] = max(best["copy_gbs"], 4 * 2 * big.nbytes / (time.perf_counter() - start) / 1e9)
        start, total = time.perf_counter(), 0
        for value in range(2_000_000):
            total += value
        best["python_madds"] = max(best["python_madds"], 2.0 / (time.perf_counter() - start))
    return best


def run_ray(
    inputs: list[Path],
    masks: list[Path],
    store: Path,
    config,
    warm: tuple[list[Path], list[Path]] | None = None,
) -> dict:
    """The cases sharded over the engine's actors as it plans them for this machine (``plan_actors``: how
    many, their CPUs, threads and case workers; the null runner as model). ``warm`` cases go through the same
    actors first, untimed, so that the timed part is a long run's steady state (imports done)."""
    import dataclasses
    import inspect
    from concurrent.futures import ThreadPoolExecutor

    import ray

    pool = engine("distributed.ray_pool")
    Annotator, Job, PoolOptions = pool.Annotator, pool.Job, pool.PoolOptions
    cluster_nodes, drive, plan_actors = pool.cluster_nodes, pool.drive, pool.plan_actors
    discover = engine("io.discover").discover
    CaseStore = engine("store.case_store").CaseStore

    class NullAnnotator(Annotator):  # the engine's actor with the null runner in place of the model
        def __init__(self, config_json: str, threads: int = 1, case_workers: int = 2) -> None:
            if "case_workers" in inspect.signature(Annotator.__init__).parameters:
                super().__init__(config_json, threads, case_workers)
            else:  # an older engine (--baseline) whose actor starts its readers as cases come
                super().__init__(config_json, threads)
            self.runner = NullLazyRunner(self.config)

    plan = plan_actors(cluster_nodes(), PoolOptions(), case_workers=config.pipeline.case_workers)
    handles = [
        ray.remote(NullAnnotator)
        .options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_concurrency=plan.case_workers)
        .remote(config.model_dump_json(), plan.threads, plan.case_workers)
        for _ in range(plan.count)
    ]
    ray.get([h.info.remote() for h in handles])  # started

    def run(images: list[Path], coarse: list[Path], where: Path) -> tuple[list, float]:
        s = CaseStore(where)
        cases = discover([str(p) for p in images], s.case_ids(), coarse_masks=[str(m) for m in coarse])
        started = time.perf_counter()
        job = Job(str(where), "bench", config.model_dump_json())
        shards = [[dataclasses.asdict(c) for c in cases[k :: plan.count]] for k in range(plan.count)]
        with ThreadPoolExecutor(plan.count) as pool:
            outcomes = [
                o
                for part in pool.map(
                    lambda k: drive(
                        shards[k], lambda lost=None: handles[k], job, in_flight=plan.case_workers + 1
                    ),
                    range(plan.count),
                )
                for o in part
            ]
        assert all(o["status"] == "done" for o in outcomes), outcomes
        return cases, time.perf_counter() - started

    if warm:
        run(*warm, store.with_name(store.name + "-warm"))
    before = sum(ray.get(h.info.remote())["runner"].get("encoded_slices", 0) for h in handles)
    cases, wall = run(inputs, masks, store)
    slices = sum(ray.get(h.info.remote())["runner"].get("encoded_slices", 0) for h in handles) - before
    for handle in handles:
        ray.kill(handle)
    return {
        "cases": len(cases),
        "slices": slices,
        "wall": wall,
        "cpu": wall * plan.count * plan.num_cpus,
        "series_slices": series_slices(CaseStore(store)),
        "plan": f"{plan.count} actor(s) x {plan.num_cpus} CPU, {plan.case_workers} case workers each",
    }


def row(name: str, result: dict) -> str:
    per_case = result["wall"] / result["cases"] * 1000
    series = result.get("series_slices", 0) / result["cpu"]
    return (
        f"{name:28s} {result['cases']:5d} {result['slices']:6d} {result['wall']:8.2f} "
        f"{result['slices'] / result['wall']:9.1f} {result['slices'] / result['cpu']:9.1f} {series:9.1f} "
        f"{per_case:9.1f}"
    )


def measure(args, config, root: Path) -> dict[str, dict]:
    """Every row of the table, by name (printed as they come)."""
    rows: dict[str, dict] = {}

    def show(name: str, result: dict) -> None:
        rows[name] = result
        print(row(name, result) + (f"   ({result['plan']})" if "plan" in result else ""), flush=True)

    three_d = make_3d(root / "data")
    images, masks = make_2d(root / "data", args.tiles)
    cores = os.cpu_count() or 1
    for name, (image, mask) in three_d.items():
        runs = [
            run_local([image], [mask], root / f"store-{name}-{k}".replace(" ", "-"), config)
            for k in range(args.repeats)
        ]
        show(f"local {name}", min(runs, key=lambda r: r["wall"]))
    show(f"local 2D x{args.tiles}", run_local([images], [masks], root / "store-2d", config))
    if args.ray:
        connect = engine("distributed.ray_pool").connect

        start = time.perf_counter()
        connect(local_cpus=cores)
        print(
            f"(Ray started in {time.perf_counter() - start:.1f} s; the engine's own actor plan; wall "
            f"excludes "
            "actor start, warm-up and discovery; sl/cpu-s counts every actor's CPUs as busy)",
            flush=True,
        )
        sets = [make_3d(root / f"ray-data-{k}", variant=k + 1) for k in range(args.repeats + 1)]  # distinct
        inputs = [pair[0] for made in sets for pair in made.values()]
        mask_list = [pair[1] for made in sets for pair in made.values()]
        first = len(sets[0])  # the first set warms the actors up, untimed
        show(
            "ray 3D (all syntaxes)",
            run_ray(
                inputs[first:],
                mask_list[first:],
                root / "store-ray-3d",
                config,
                warm=(inputs[:first], mask_list[:first]),
            ),
        )
        warm_2d, warm_masks = make_2d(root / "data-warm-2d", 4 * cores, seed=1)
        show(
            f"ray 2D x{args.tiles}",
            run_ray([images], [masks], root / "store-ray-2d", config, warm=([warm_2d], [warm_masks])),
        )
    return rows


def _child_rows(src: Path, args, out: Path) -> dict[str, dict]:
    """Every row measured by a child process running this script on the engine of the checkout ``src``."""
    import json
    import subprocess
    import sys

    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--repeats",
        str(args.repeats),
        "--tiles",
        str(args.tiles),
        "--rows-json",
        str(out),
    ] + (["--ray"] if args.ray else [])
    with tempfile.TemporaryDirectory(prefix="engine-links-") as links:
        env = engine_env(src, Path(links))
        subprocess.run(command, check=True, env=env, cwd=Path(__file__).parent)
    return json.loads(out.read_text())


def _best(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Each row's best run (least CPU per prompted slice) over several rounds."""
    return {
        name: min((r[name] for r in runs), key=lambda row: row["cpu"] / max(1, row["slices"]))
        for name in runs[0]
    }


def compare(rev: str, args) -> tuple[dict[str, dict], dict[str, dict]]:
    """(baseline rows, this tree's rows): the engine of commit ``rev`` (a temporary git worktree) and this
    tree measured alternately, ``args.rounds`` times each, by child processes; each row's best run counts, so
    a drift of the host's speed during the run weighs on both alike."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    tree = Path(tempfile.mkdtemp(prefix="ceiling-baseline-"))
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(tree / "src"), rev],
        check=True,
        capture_output=True,
    )
    try:
        before, now = [], []
        for round_ in range(1, args.rounds + 1):
            print(f"== round {round_}/{args.rounds}: the engine at {rev}", flush=True)
            before.append(_child_rows(tree / "src", args, tree / f"before-{round_}.json"))
            print(f"== round {round_}/{args.rounds}: this tree", flush=True)
            now.append(_child_rows(repo, args, tree / f"now-{round_}.json"))
        return _best(before), _best(now)
    finally:
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree / "src")], capture_output=True
        )
        shutil.rmtree(tree, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles", type=int, default=200)
    parser.add_argument("--ray", action="store_true", help="also through the engine's Ray actors")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="measure the engine of this git commit and this tree alternately, and print the ratios",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="with --baseline: alternations (best run counts)"
    )
    parser.add_argument("--rows-json", help=argparse.SUPPRESS)  # the baseline's child writes its rows here
    parser.add_argument(
        "--machine-speed", action="store_true", help=argparse.SUPPRESS
    )  # machine_speed()'s child
    args = parser.parse_args()
    if args.machine_speed:
        import json

        print(json.dumps(_measure_machine()))
        return

    import json

    pipeline = engine()
    EngineConfig = engine("annotate.config").EngineConfig

    if args.baseline:
        before, rows = compare(args.baseline, args)
        print(
            f"== best of {args.rounds} rounds each, this tree against {args.baseline} (alternating runs, "
            "same machine)"
        )
        print(
            f"{'case':28s} {'cases':>5s} {'slices':>6s} {'wall s':>8s} {'slices/s':>9s} {'sl/cpu-s':>9s} "
            f"{'series/cs':>9s} {'ms/case':>9s}   {'sl/cpu-s x':>10s} {'ms/case x':>9s}"
        )
        for name, now in rows.items():
            old = before[name]
            per_cpu = (now["slices"] / now["cpu"]) / (old["slices"] / old["cpu"])
            per_case = (old["wall"] / old["cases"]) / (now["wall"] / now["cases"])
            print(f"{row(name, now)}   {per_cpu:9.2f}x {per_case:8.2f}x")
        return
    cores = os.cpu_count() or 1
    print(
        f"cores: {cores}; null runner (every box filled, no model); {args.repeats} runs per 3D row; "
        f"engine from {Path(pipeline.__file__).parent.parent}",
        flush=True,
    )
    speed = machine_speed()
    print(
        f"machine (one core, now): {speed['gflops']:.1f} GFLOP/s fp32 matmul, {speed['copy_gbs']:.1f} GB/s "
        f"copy, {speed['python_madds']:.1f} M Python additions/s",
        flush=True,
    )
    print(
        f"{'case':28s} {'cases':>5s} {'slices':>6s} {'wall s':>8s} {'slices/s':>9s} {'sl/cpu-s':>9s} "
        f"{'series/cs':>9s} {'ms/case':>9s}",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="ceiling-"))
    try:
        rows = measure(args, EngineConfig(), root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.rows_json:
        Path(args.rows_json).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
