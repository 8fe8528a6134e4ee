"""A writer killed with SIGKILL in the middle of a case leaves nothing taken as done; a rerun commits it.

The child process stops itself at a chosen point of the write (it says where in a file and then waits), so the
parent kills it at a known moment instead of after a guessed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medsam_engine.pipeline.export.formats import export_store
from medsam_engine.pipeline.store.case_store import CaseStore, remove_stale_staging

CHILD = r"""
import os, sys, time
from pathlib import Path
import numpy as np
import medsam_engine.pipeline.store.case_store as store_module

root, ready, hook, overwrite = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"

def stop_here(*args, **kwargs):
    ready.write_text(hook)
    time.sleep(600)  # killed long before this ends

if hook == "mid-write":  # a large case, streamed: image and label chunks and metadata on disk; the status not
    import zarr
    import medsam_engine.pipeline.store.ome_zarr as encoding
    encoding.IN_MEMORY_BYTES = 0
    zarr.Group.update_attributes = stop_here  # the root's 'medsam' status is the last write
elif hook == "mid-files":  # a small case, encoded in memory: some of its files written, the root's not
    real_write = Path.write_bytes
    def write_bytes(self, data):
        if self.name == "0":  # a chunk: the metadata files of its folder are written already
            stop_here()
        return real_write(self, data)
    Path.write_bytes = write_bytes
else:  # "before-commit": the whole group is written; the rename into place has not happened
    real_replace = os.replace
    def replace(src, dst):
        if str(src).endswith(".ome.zarr") or str(dst).endswith(".ome.zarr"):
            stop_here()
        return real_replace(src, dst)
    os.replace = replace
labels = np.random.default_rng(2).integers(0, 4, (16, 256, 256)).astype(np.uint16)
store_module.CaseStore(root).commit_case("case-1", labels=labels, image=labels.astype(np.int16),
                                         attrs={"geometry": {"spacing_zyx_mm": [2.0, 1.0, 1.0]},
                                                "signature": {"run": 2}}, overwrite=overwrite)
"""


def _new_labels() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 4, (16, 256, 256)).astype(np.uint16)


def _geometry_attrs(signature: dict) -> dict:
    shape = [16, 256, 256]
    affine = np.diag([2.0, 1.0, 1.0, 1.0])  # (z, y, x) voxel -> mm
    return {
        "signature": signature,
        "geometry": {
            "spacing_zyx_mm": [2.0, 1.0, 1.0],
            "affine_zyx_to_ras": affine.tolist(),
            "shape_zyx": shape,
            "source_affine": affine[:, [2, 1, 0, 3]].tolist(),
            "source_shape": shape[::-1],
            "source_format": "nifti",
        },
    }


def _kill_writer_at(hook: str, root, tmp_path, *, overwrite: bool) -> None:
    script, ready = tmp_path / "child.py", tmp_path / "ready"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(root), str(ready), hook, str(int(overwrite))],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if child.poll() is not None:
            pytest.fail(f"writer ended before reaching {hook}: {child.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"writer did not reach {hook} within 60 s")
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("hook", ["mid-write", "mid-files", "before-commit"])
def test_killed_writer_leaves_no_done_case_and_a_rerun_commits_it(tmp_path, hook, overwrite):
    root = tmp_path / "store"
    store = CaseStore(root)
    old = np.full((16, 256, 256), 9, np.uint16)
    if overwrite:
        store.commit_case("case-1", labels=old, attrs=_geometry_attrs({"run": 1}))

    _kill_writer_at(hook, root, tmp_path, overwrite=overwrite)

    assert any((root / "_staging").iterdir())  # the killed writer's debris is there ...
    if overwrite:  # ... and the earlier version is still the committed one, untouched
        assert store.committed_cases() == ["case-1"]
        labels, attrs = store.read_labels("case-1")
        assert attrs.signature == {"run": 1}
        assert np.array_equal(labels, old)
    else:  # ... but readers, exports and resume see no case
        assert store.committed_cases() == []
        assert store.case_attrs("case-1") is None
        assert export_store(store, "nifti", tmp_path / "nifti").written == []

    store.commit_case("case-1", labels=_new_labels(), attrs=_geometry_attrs({"run": 2}), overwrite=overwrite)
    labels, attrs = store.read_labels("case-1")
    assert attrs.signature == {"run": 2}
    assert np.array_equal(labels, _new_labels())
    assert [h["signature"] for h in attrs.raw.get("previous_versions", [])] == (
        [{"run": 1}] if overwrite else []
    )
    assert remove_stale_staging(store, older_than_s=0) == 1
    assert not any((root / "_staging").iterdir())
    assert len(export_store(store, "nifti", tmp_path / "nifti").written) == 1
