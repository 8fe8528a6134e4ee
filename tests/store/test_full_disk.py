"""A store on a full disk: exit 1 with a reason naming the lack of space, no traceback, nothing half-written
kept, and a rerun with room writes the masks a run that never lacked it writes. The disk is a real, small
tmpfs mounted for the test (root only; skipped elsewhere)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:80]})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def _argv(inputs, masks, out, box_fill) -> list[str]:
    return [
        "annotate",
        *map(str, inputs),
        "--coarse-mask",
        *map(str, masks),
        "--out",
        str(out),
        "--config",
        str(box_fill),
    ]


def _annotate(inputs, masks, out, box_fill):
    """The command in a process of its own: its exit code and stderr are what a user sees."""
    command = [sys.executable, "-m", "medsam_engine.pipeline.cli.main", *_argv(inputs, masks, out, box_fill)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_a_full_disk_is_a_reason_and_a_rerun_with_room_completes(
    small_disk, tmp_path, small_chest, small_chest_nifti, box_fill
):
    inputs, masks = [small_chest[0], small_chest_nifti[0]], [small_chest[1], small_chest_nifti[1]]
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2048 - 40) * 1024)  # ~40 KiB left: less than one case's group
    full = _annotate(inputs, masks, small_disk / "store", box_fill)
    assert full.returncode == 1, full.stderr[-2000:]
    assert "no space left on the device" in full.stderr
    assert "Traceback" not in full.stderr
    store = CaseStore(small_disk / "store")
    assert store.committed_cases() == []
    staging = small_disk / "store" / "_staging"
    assert not staging.exists() or list(staging.iterdir()) == []  # nothing half-written kept

    filler.unlink()  # the reruns run in this process
    assert main(_argv(inputs, masks, small_disk / "store", box_fill)) == 0
    assert main(_argv(inputs, masks, tmp_path / "roomy", box_fill)) == 0
    here, there = CaseStore(small_disk / "store"), CaseStore(tmp_path / "roomy")

    def by_image(s):
        return {s.manifest(c)["image"]: s.read_labels(c)[0] for c in s.committed_cases()}

    after, reference = by_image(here), by_image(there)
    assert sorted(after) == sorted(reference)
    assert len(after) == 2
    assert all(np.array_equal(after[k], reference[k]) for k in after)
