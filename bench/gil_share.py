"""How much of a case's work holds Python's interpreter lock (GIL) in the engine's process, and so how many
cases per second one process can hand a GPU however many CPUs it has (issue 19).

A child process runs the local engine with the null runner (bench/null_runner.py: everything but the model)
over real cases one at a time: slicerio's chest CT at 512 x 512 x 34 as DICOM (Explicit VR Little Endian,
lungs as coarse mask) and stardist's nuclei as 96 x 96 crops. py-spy samples its threads from outside
(``--nonblocking``, so the process is never paused) twice: all samples of the threads at work, then only
those holding the GIL. The GIL share of a case's wall time, times the wall time per case, is what one case
costs the process's single lock; its inverse is the ceiling of one process in cases per second. Case workers
on threads overlap everything else, not that.

    pip install py-spy   # a sampling profiler (not a dependency of the engine)
    cd bench && ../.venv/bin/python gil_share.py [--seconds 5] [--rate 250]

py-spy needs the permission to read another process's memory (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

CHILD = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {bench!r})
import pipeline_ceiling as pc
from medsam_engine.pipeline.annotate.config import EngineConfig

root, kind, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
config = EngineConfig()
config = config.model_copy(update={{"pipeline": config.pipeline.model_copy(update={{"case_workers": 1}})}})
if kind == "3d":
    made = [pc.make_3d(root / f"d{{k}}", variant=k + 1,
                       syntaxes={{"explicit-le": pc.SYNTAXES["explicit-le"]}})
            for k in range(9)]
    images, masks = [m["DICOM explicit-le"][0] for m in made], [m["DICOM explicit-le"][1] for m in made]
else:
    image, mask = pc.make_2d(root / "tiles", 300)
    images, masks = [image], [mask]
warm_image, warm_mask = (images[:1], masks[:1]) if kind == "3d" else pc.make_2d(root / "warm", 10, seed=1)
pc.run_local(warm_image if kind == "3d" else [warm_image], warm_mask if kind == "3d" else [warm_mask],
             root / "warm-store", config)
print("GO", flush=True)
for k in range(rounds):
    result = pc.run_local(images[1:] if kind == "3d" else images, masks[1:] if kind == "3d" else masks,
                          root / f"store-{{k}}-{{time.time()}}", config)
    print("CASE_MS", result["wall"] / result["cases"] * 1000, flush=True)
"""


def samples(path: Path) -> Counter:
    """Samples per thread name in a py-spy raw file."""
    counts: Counter = Counter()
    for line in path.read_text().splitlines():
        match = re.match(r"(.*) (\d+)$", line)
        if match:
            counts[match.group(1).split(";")[0].split(": ")[-1].split(" (")[0]] += int(match.group(2))
    return counts


def measure(kind: str, seconds: float, rate: int, spy: str, work: Path) -> dict:
    script = work / "child.py"
    script.write_text(CHILD.format(bench=str(Path(__file__).resolve().parent)))
    child = subprocess.Popen(
        [sys.executable, str(script), str(work / kind), kind, "40"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent,
    )
    assert child.stdout is not None
    while child.stdout.readline().strip() != "GO":
        if child.poll() is not None:
            raise SystemExit(f"the {kind} child ended before its cases ran")
    time.sleep(1.0)  # into the timed rounds
    files = {}
    for mode, flags in (("active", []), ("gil", ["--gil"])):
        files[mode] = work / f"{kind}-{mode}.txt"
        subprocess.run(
            [
                spy,
                "record",
                "-p",
                str(child.pid),
                "-d",
                str(seconds),
                "-r",
                str(rate),
                "-f",
                "raw",
                "--threads",
                "--nonblocking",
                "-o",
                str(files[mode]),
                *flags,
            ],
            check=True,
            capture_output=True,
        )
    child.kill()
    child.wait()
    per_case = [
        float(line.split()[1]) for line in child.stdout.read().splitlines() if line.startswith("CASE_MS")
    ]
    active, held = samples(files["active"]), samples(files["gil"])
    expected = seconds * rate  # samples of a thread at work all the time
    case_ms = min(per_case) if per_case else float("nan")
    share = sum(held.values()) / expected  # all threads' GIL samples over the wall time
    return {
        "kind": kind,
        "case_ms": case_ms,
        "main_active": active.get("MainThread", 0) / expected,
        "gil_share": share,
        "gil_ms_per_case": share * case_ms,
        "threads": dict(held.most_common(4)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is needed: pip install py-spy")
    slices = {"3d": 28, "2d": 1}  # prompted slices per case
    with tempfile.TemporaryDirectory(prefix="gil-share-", ignore_cleanup_errors=True) as tmp:
        for kind in ("3d", "2d"):
            found = measure(kind, args.seconds, args.rate, spy, Path(tmp))
            ceiling = 1000 / found["gil_ms_per_case"]
            print(
                f"{kind}: {found['case_ms']:.1f} ms per case (one case worker); GIL held "
                f"{found['gil_share']:.0%} of "
                f"the wall time = {found['gil_ms_per_case']:.1f} ms per case (samples by thread: "
                f"{found['threads']}); one process's ceiling ~{ceiling:.0f} cases/s = "
                f"{ceiling * slices[kind]:.0f} prompted slices/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
