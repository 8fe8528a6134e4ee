"""`medsam-engine store info` and `store cases`: what a store holds, on a store with committed, failed,
quarantined, in-progress and reviewed cases, a finished round and a registered model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import commit_from_source

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.cli.store import human_size
from medsam_engine.pipeline.core.provenance import file_sha256
from medsam_engine.pipeline.flywheel.registry import register
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.leases import acquire
from medsam_engine.pipeline.store.records import ROUNDS, quarantine, write_record


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, small_chest, small_chest_nifti, box_fill) -> Path:
    """`annotate images images/missing.nii.gz` (relative paths) over a good NIfTI volume, a corrupt file and
    a missing one; then a reviewed case of round 1, the corrupt case quarantined, the good case's lease held,
    a round record and a registered model."""
    root = tmp_path_factory.mktemp("store-commands")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    shutil.copy(small_chest_nifti[0], root / "images" / "good.nii.gz")
    (root / "images" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    for stem in ("good", "broken", "missing"):
        shutil.copy(small_chest_nifti[1], root / "masks" / f"{stem}.nii.gz")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        argv = ["annotate", "images", "images/missing.nii.gz", "--coarse-mask", "masks", "--out", "store"]
        assert main([*argv, "--config", str(box_fill)]) == 1
    store = CaseStore(root / "store")
    labels = read_volume(small_chest[1]).array
    commit_from_source(store, small_chest[0], labels, review_status="accepted", round=1)
    broken = _id_of(store, "images/broken.nii.gz")
    quarantine(store, broken, stage="read", signature=None, run_id="test")
    assert acquire(store, _id_of(store, "images/good.nii.gz"), run_id="test") is not None
    write_record(store, {"round": 1}, ROUNDS, "current.json")
    write_record(
        store, {"round": 1, "cases": {"annotated": 2}, "queue": {"cases": 0}}, ROUNDS, "round-001.json"
    )
    checkpoint = root / "round1.pth"
    checkpoint.write_bytes(b"weights of round 1")
    entry = {"sha256": file_sha256(checkpoint), "checkpoint": str(checkpoint), "created_at": "2026-01-01"}
    register(entry, None, store)
    return root / "store"


def _id_of(store: CaseStore, given: str) -> str:
    manifests = store.root / "_manifest"
    (found,) = [p.stem for p in manifests.iterdir() if _given(json.loads(p.read_text())) == given]
    return found


def _given(manifest: dict) -> str:
    return manifest.get("given") or manifest["image"]


def _cases(store_root, capsys, *options: str) -> dict[str, dict]:
    capsys.readouterr()
    assert main(["store", "cases", str(store_root), "--json", *options]) == 0
    return {entry["case_id"]: entry for entry in json.loads(capsys.readouterr().out)}


def _info(store_root, capsys) -> dict:
    capsys.readouterr()
    assert main(["store", "info", str(store_root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cases_lists_a_missing_input_as_failed_with_the_input_as_given(store_root, capsys):
    case_id = _id_of(CaseStore(store_root), "images/missing.nii.gz")
    entry = _cases(store_root, capsys)[case_id]
    assert (entry["given"], entry["status"]) == ("images/missing.nii.gz", "failed")


def test_cases_gives_the_stage_and_reason_of_a_corrupt_input(store_root, capsys):
    case_id = _id_of(CaseStore(store_root), "images/broken.nii.gz")
    assert _cases(store_root, capsys)[case_id]["error"].startswith("read: ")


def test_cases_shows_a_quarantined_case(store_root, capsys):
    case_id = _id_of(CaseStore(store_root), "images/broken.nii.gz")
    assert _cases(store_root, capsys)[case_id]["status"] == "quarantined"


def test_cases_gives_the_round_and_review_state_of_a_committed_case(store_root, capsys, small_chest):
    entry = _cases(store_root, capsys)[_id_of(CaseStore(store_root), str(small_chest[0]))]
    assert (entry["status"], entry["round"], entry["review_status"]) == ("committed", 1, "accepted")


def test_cases_failed_lists_only_failing_and_quarantined_cases(store_root, capsys):
    assert {e["status"] for e in _cases(store_root, capsys, "--failed").values()} == {"failed", "quarantined"}


def test_cases_failed_leaves_no_failing_case_out(store_root, capsys):
    failing = {c for c, e in _cases(store_root, capsys).items() if e["status"] != "committed"}
    assert set(_cases(store_root, capsys, "--failed")) == failing


def test_cases_prints_one_line_per_case_under_a_header(store_root, capsys):
    capsys.readouterr()
    assert main(["store", "cases", str(store_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(CaseStore(store_root).committed_cases()) + 2  # header, 2 failing cases


def test_info_counts_cases_by_status(store_root, capsys):
    assert _info(store_root, capsys)["cases"] == {
        "committed": 2,
        "failed": 1,
        "quarantined": 1,
        "in_progress": 1,
    }


def test_info_counts_review_states(store_root, capsys):
    assert _info(store_root, capsys)["review"] == {"accepted": 1, "unrouted": 1}


def test_info_gives_the_current_round(store_root, capsys):
    assert _info(store_root, capsys)["rounds"]["current"] == 1


def test_info_gives_the_current_model(store_root, capsys):
    assert _info(store_root, capsys)["models"]["current"] == file_sha256(store_root.parent / "round1.pth")


def test_info_measures_the_case_groups_on_disk(store_root, capsys):
    groups = sum(p.stat().st_size for g in store_root.glob("*.ome.zarr") for p in g.rglob("*") if p.is_file())
    assert _info(store_root, capsys)["disk"]["case groups"] == groups


def test_info_prints_sizes_in_human_units(store_root, capsys):
    capsys.readouterr()
    assert main(["store", "info", str(store_root)]) == 0
    assert "KiB" in capsys.readouterr().out


def test_human_size_uses_binary_units():
    assert [human_size(n) for n in (512, 1536, 5 * 1024**3)] == ["512 B", "1.5 KiB", "5.0 GiB"]


@pytest.mark.parametrize("action", ["info", "cases"])
def test_a_folder_that_is_not_a_store_is_a_usage_error_in_one_line(tmp_path, capsys, action):
    (tmp_path / "notes.txt").write_text("not a store\n")
    assert main(["store", action, str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
