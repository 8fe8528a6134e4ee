"""Storage with a lifecycle: the cache a run fills is emptied once its cases are committed (kept with
--keep-cache), previous versions keep no second copy of the image and are bounded by store.keep_versions, and
`store clean` lists (dry run) and removes (--yes) what a store no longer needs, never what a live run uses.

All on real data (the chest CT slices and the nuclei tiles), the box-fill runner in the network's place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_archive, use_s3
from killing import kill_at

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.processes import HOST, process_tag
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.cache import PINS, CacheLifecycle, pin, series_download, unpin
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.model.checkpoint import LITE_MEDSAM_SHA256
from medsam_engine.pipeline.model.graph_cache import graph_folder
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.leases import leased
from medsam_engine.pipeline.store.records import REQUESTS, write_request


def _config(tmp_path: Path, name: str, extra: str = "") -> str:
    """A configuration file: the box-fill runner, and ``extra`` YAML sections."""
    path = tmp_path / f"{name}.yaml"
    path.write_text("model:\n  runner: box-fill\n" + extra)
    return str(path)


@pytest.fixture
def zipped(tmp_path, small_chest, small_chest_nifti) -> tuple[Path, Path]:
    """A zip of two real cases (one NRRD, one NIfTI) and the folder of their coarse masks."""
    images, masks = make_archive(tmp_path / "data", small_chest, small_chest_nifti)
    archive = tmp_path / "cases.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(images.iterdir()):
            out.write(path, f"images/{path.name}")
    return archive, masks


def _entries(store: Path, kind: str) -> list[str]:
    folder = store / "_cache" / kind
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- the cache a run fills -----------------------------------------------------------------------------------
def test_an_archive_is_extracted_for_the_run_and_removed_once_its_cases_are_committed(
    zipped, tmp_path, capsys
):
    archive, masks = zipped
    store = tmp_path / "store"
    argv = ["annotate", str(archive), "--coarse-mask", str(masks), "--out", str(store)]
    assert main([*argv, "--config", _config(tmp_path, "box")]) == 0
    assert "2 done" in capsys.readouterr().out
    assert len(CaseStore(store).committed_cases()) == 2
    assert _entries(store, "archives") == []  # both cases committed: the extraction is gone
    assert _entries(store, PINS) == []  # and nothing is pinned any more
    assert main([*argv, "--config", _config(tmp_path, "box")]) == 0  # a rerun extracts to compare, then
    assert "2 skipped" in capsys.readouterr().out  # skips both and removes the extraction again
    assert _entries(store, "archives") == []


def test_a_fetched_zip_and_its_extraction_go_with_their_cases(zipped, tmp_path, capsys):
    import fsspec

    archive, masks = zipped
    memory = fsspec.filesystem("memory")
    memory.put_file(str(archive), "/lifecycle-test/cases.zip")
    store = tmp_path / "store"
    argv = ["annotate", "memory://lifecycle-test/cases.zip", "--coarse-mask", str(masks), "--out", str(store)]
    try:
        assert main([*argv, "--config", _config(tmp_path, "box")]) == 0
    finally:
        memory.rm("/lifecycle-test", recursive=True)
    assert "2 done" in capsys.readouterr().out
    assert (store / "_cache" / "remote").is_dir()
    assert (store / "_cache" / "archives").is_dir()
    assert _entries(store, "remote") == []
    assert _entries(store, "archives") == []


def test_keep_cache_keeps_the_extraction_and_store_clean_removes_it(zipped, tmp_path, capsys):
    archive, masks = zipped
    store = tmp_path / "store"
    argv = ["annotate", str(archive), "--coarse-mask", str(masks), "--out", str(store), "--keep-cache"]
    assert main([*argv, "--config", _config(tmp_path, "box")]) == 0
    (extracted,) = _entries(store, "archives")
    assert sorted(p.name for p in (store / "_cache" / "archives" / extracted / "images").iterdir()) == [
        "chest_a.nrrd",
        "chest_b.nii.gz",
    ]
    capsys.readouterr()
    assert main(["store", "clean", str(store), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [Path(e["path"]).name for e in listed["entries"]] == [extracted]
    assert listed["kinds"]["archive caches"]["bytes"] > os.path.getsize(archive) // 2
    assert _entries(store, "archives") == [extracted]  # a dry run removes nothing
    assert main(["store", "clean", str(store), "--yes"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert _entries(store, "archives") == []


def test_config_key_keep_cache_is_the_same_as_the_flag(zipped, tmp_path):
    archive, masks = zipped
    store = tmp_path / "store"
    config = _config(tmp_path, "keep", "store:\n  keep_cache: true\n")
    assert (
        main(["annotate", str(archive), "--coarse-mask", str(masks), "--out", str(store), "--config", config])
        == 0
    )
    assert len(_entries(store, "archives")) == 1


def test_an_entry_is_removed_when_its_last_case_ends_and_never_while_another_process_pins_it(tmp_path):
    cache = tmp_path / "_cache"
    shared, alone, other = (cache / "archives" / name for name in ("shared", "alone", "other"))
    for folder in (shared, alone, other):
        (folder / "x").mkdir(parents=True)
    cases = [
        CaseRef("a", str(shared / "x"), cached_from=(str(shared),)),
        CaseRef("b", str(shared / "x"), cached_from=(str(shared),)),
        CaseRef("c", str(alone / "x"), cached_from=(str(alone),)),
        CaseRef("d", str(other / "x"), cached_from=(str(other),)),
    ]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # another live process of this machine pins 'other' (a concurrent run on the same archive)
        pins = cache / PINS / f"{process_tag(holder.pid)}.json"
        pins.parent.mkdir()
        pins.write_text(json.dumps({"host": HOST, "pid": holder.pid, "entries": ["archives/other"]}))
        run = CacheLifecycle(cache, cases)
        mine = json.loads((cache / PINS / f"{process_tag()}.json").read_text())["entries"]
        assert mine == ["archives/alone", "archives/other", "archives/shared"]
        run.case_ended("a")
        assert shared.exists()  # case b still reads it
        run.case_ended("c")
        assert not alone.exists()
        run.case_ended("b")
        run.case_ended("d")
        assert not shared.exists()
        assert other.exists()  # the other run still uses it
        assert run.removed == ["archives/alone", "archives/shared"]
    finally:
        holder.kill()
        holder.wait()
    run.finish()
    assert not (cache / PINS / f"{process_tag()}.json").exists()


def test_a_dicomweb_case_reads_the_folder_its_series_is_downloaded_into(tmp_path):
    case = CaseRef("c1", "http://pacs/dicom-web/studies/1/series/2#12", kind="dicomweb-series")
    download = series_download(tmp_path, case)
    assert download == tmp_path / "dicomweb" / "c1-12"
    (download / "s001").mkdir(parents=True)
    run = CacheLifecycle(tmp_path, [case], defer=True)
    run.case_ended("c1")
    assert download.exists()  # deferred: a SEG push after the run still reads the series
    run.finish()
    assert not download.exists()


# -- previous versions --------------------------------------------------------------------------------------
def test_previous_versions_keep_masks_without_the_image_and_are_bounded(small_chest, tmp_path, capsys):
    store_path = tmp_path / "store"
    config = _config(tmp_path, "two", "store:\n  keep_versions: 2\n")
    base = ["annotate", str(small_chest[0]), "--coarse-mask", str(small_chest[1]), "--out", str(store_path)]
    produced = []
    for margin in (0, 2, 4, 6):
        assert main([*base, "--config", config, "--overwrite", "--box-margin", str(margin)]) == 0
        store = CaseStore(store_path)
        (case_id,) = store.committed_cases()
        produced.append(store.read_labels(case_id)[0])
    assert "1 done" in capsys.readouterr().out
    labels, attrs = store.read_labels(case_id)
    assert np.array_equal(labels, produced[-1])
    assert store.read_image(case_id) is not None  # the committed version keeps the image
    history = attrs.raw["previous_versions"]
    names = [Path(entry["path"]).name for entry in history]
    assert len(names) == 2
    assert sorted(p.name for p in (store_path / "_previous" / case_id).iterdir()) == sorted(names)
    for name, expected in zip(names, produced[1:3], strict=True):  # the 2nd and 3rd runs' masks
        folder = store_path / "_previous" / case_id / name
        assert not (folder / "0").exists()  # same input: no second copy of the image
        old_labels, old_attrs = store.read_version(case_id, name)
        assert np.array_equal(old_labels, expected)
        assert old_attrs.raw["image_dropped"] is True
        assert old_attrs.instances  # the lineage is kept
        assert "ome" not in json.loads((folder / "zarr.json").read_text())["attributes"]
    image_bytes = sum(p.stat().st_size for p in (store_path / f"{case_id}.ome.zarr" / "0").rglob("*"))
    previous_bytes = sum(p.stat().st_size for p in (store_path / "_previous").rglob("*") if p.is_file())
    assert previous_bytes < image_bytes


def test_a_previous_version_of_another_input_keeps_its_image(small_chest, tmp_path):
    store = CaseStore(tmp_path / "store")
    volume = read_volume(small_chest[0])
    labels = (read_volume(small_chest[1]).array > 0).astype(np.uint16)
    geometry = volume.geometry.to_json()

    def commit(input_sha256: str) -> None:
        attrs = {"geometry": geometry, "signature": {"input_sha256": input_sha256}, "instances": []}
        store.commit_case("case", labels=labels, image=volume.array, attrs=attrs, overwrite=True)

    commit("a" * 64)
    commit("b" * 64)  # another input: the replaced version keeps its image
    commit("b" * 64)  # the same input: this time the replaced version drops it
    history = store.attributes("case").raw["previous_versions"]
    first, second = (tmp_path / "store" / entry["path"] for entry in history)
    assert (first / "0").is_dir()
    assert not (second / "0").exists()
    assert np.array_equal(store.read_version("case", first.name)[0], labels)


def test_on_object_storage_too_versions_drop_the_image_and_are_bounded(small_chest, s3_endpoint, monkeypatch):
    url = use_s3(monkeypatch, s3_endpoint, "lifecycle")
    store = CaseStore(f"{url}/store")
    volume = read_volume(small_chest[0])
    labels = (read_volume(small_chest[1]).array > 0).astype(np.uint16)
    attrs = {"geometry": volume.geometry.to_json(), "signature": {"input_sha256": "c" * 64}, "instances": []}
    for run in range(3):
        signed = dict(attrs, signature={**attrs["signature"], "run": run})
        store.commit_case(
            "case", labels=labels + run, image=volume.array, attrs=signed, keep_versions=1, overwrite=True
        )
    (kept,) = store.attributes("case").raw["previous_versions"]
    name = Path(kept["path"]).name
    assert store.list_names(store.root / "_previous" / "case") == [name]
    assert "0" not in store.list_names(store.root / "_previous" / "case" / name)
    assert np.array_equal(store.read_version("case", name)[0], labels + 1)
    assert np.array_equal(store.read_image("case"), volume.array)


# -- store clean ---------------------------------------------------------------------------------------------
@pytest.fixture
def cluttered(two_tiles, tmp_path) -> Path:
    """A store of two committed real cases (three versions each, all kept) with what clean may remove beside
    them, and an error record."""
    images, masks = two_tiles
    store_path = tmp_path / "store"
    config = _config(tmp_path, "many", "store:\n  keep_versions: 10\n")
    for margin in (0, 1, 2):
        argv = ["annotate", str(images), "--coarse-mask", str(masks), "--out", str(store_path), "--overwrite"]
        assert main([*argv, "--config", config, "--box-margin", str(margin)]) == 0
    store = CaseStore(store_path)
    dead = _dead_pid()
    first = store.committed_cases()[0]
    staging = store_path / "_staging" / f"{first}.{process_tag(dead)}.0badf00d.ome.zarr"
    (staging / "labels").mkdir(parents=True)
    (staging / "zarr.json").write_text("{}")
    lease = {"case_id": first, "run_id": "killed", "host": HOST, "pid": dead, "expires_at": time.time() + 300}
    (store_path / "_leases").mkdir(exist_ok=True)
    (store_path / "_leases" / f"{first}.json").write_text(json.dumps(lease))
    old = write_request(store, {"inputs": ["x"]})
    record = json.loads((store_path / REQUESTS / f"{old}.json").read_text())
    record["written_at"] = "2020-01-01T00:00:00Z"
    (store_path / REQUESTS / f"{old}.json").write_text(json.dumps(record))
    write_request(store, {"inputs": ["y"]})  # a fresh one: kept
    download = store_path / "_cache" / "dicomweb" / "0123456789abcdef-3"
    download.mkdir(parents=True)
    (download / "slice.dcm").write_bytes(b"\0" * 2048)
    store.record_error("feedfacefeedface", stage="read", reason="a test failure", run_id="test")
    return store_path


def test_store_clean_lists_then_removes_exactly_that(cluttered, tmp_path, capsys):
    store = CaseStore(cluttered)
    before = _tree(cluttered)
    capsys.readouterr()
    assert main(["store", "clean", str(cluttered), "--keep-versions", "1", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert _tree(cluttered) == before  # the dry run removed nothing
    counts = {kind: total["entries"] for kind, total in listed["kinds"].items()}
    assert counts == {
        "download caches": 1,
        "archive caches": 0,
        "staging": 1,
        "previous versions": 2,  # per case 2 versions, one kept: one each
        "stale leases": 1,
        "old run requests": 1,
        "stale pins": 0,
    }
    assert all(entry["size"] > 0 for entry in listed["entries"] if entry["kind"] != "stale leases")
    paths = {entry["path"] for entry in listed["entries"]}
    assert main(["store", "clean", str(cluttered), "--keep-versions", "1"]) == 0
    dry = capsys.readouterr().out
    assert "would remove 6 entries" in dry
    assert all(str(Path(p).relative_to(cluttered)) in dry for p in paths)
    assert main(["store", "clean", str(cluttered), "--keep-versions", "1", "--yes"]) == 0
    assert "removed 6 entries" in capsys.readouterr().out
    gone = {str(Path(p).relative_to(cluttered)) for p in paths}
    assert _tree(cluttered) == {p for p in before if not any(p == g or p.startswith(g + "/") for g in gone)}
    assert "feedfacefeedface" in store.errors()  # an error record is never removed
    for case_id in store.committed_cases():  # the cases and their newest earlier version stay readable
        store.read_labels(case_id)
        (kept,) = store.attributes(case_id).raw["previous_versions"][-1:]
        store.read_version(case_id, Path(kept["path"]).name)
    assert main(["export", str(cluttered), "--format", "nifti", "--out", str(tmp_path / "nifti")]) == 0
    assert len(list((tmp_path / "nifti").glob("*.nii.gz"))) == 2
    capsys.readouterr()
    assert main(["store", "clean", str(cluttered), "--keep-versions", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == []


def test_store_clean_leaves_a_live_writers_lease_staging_and_pinned_cache(cluttered, capsys):
    store = CaseStore(cluttered)
    case_id = store.committed_cases()[1]
    live_staging = cluttered / "_staging" / f"{case_id}.{process_tag()}.00c0ffee.ome.zarr"
    live_staging.mkdir(parents=True)
    downloading = cluttered / "_cache" / "dicomweb" / "fedcba9876543210-5"
    downloading.mkdir(parents=True)
    pin(cluttered / "_cache", ["dicomweb/fedcba9876543210-5"])  # a run of this process downloads it
    try:
        with leased(store, case_id, run_id="live") as lease:
            assert lease is not None
            assert main(["store", "clean", str(cluttered), "--yes", "--json"]) == 0
            removed = {Path(e["path"]).name for e in json.loads(capsys.readouterr().out)["entries"]}
            assert (cluttered / "_leases" / f"{case_id}.json").exists()
            assert json.loads((cluttered / "_leases" / f"{case_id}.json").read_text())["token"] == lease.token
    finally:
        unpin(cluttered / "_cache", ["dicomweb/fedcba9876543210-5"])
    assert live_staging.is_dir()
    assert downloading.is_dir()
    assert {live_staging.name, downloading.name, f"{case_id}.json"}.isdisjoint(removed)
    assert "0123456789abcdef-3" in removed  # the dead writer's leftovers beside them went


def test_a_killed_runs_staging_and_lease_are_listed_then_removed(two_tiles, tmp_path, capsys):
    images, masks = two_tiles
    store_path = tmp_path / "store"
    argv = ["annotate", str(images), "--coarse-mask", str(masks), "--out", str(store_path)]
    argv += ["--config", _config(tmp_path, "serial", "pipeline:\n  case_workers: 1\n")]
    kill_at("pathlib:Path.write_bytes", argv, tmp_path, nth=9)  # a case's group is 7 files: the 2nd's 2nd
    store = CaseStore(store_path)
    (staging,) = (store_path / "_staging").iterdir()  # the killed writer's half-written group
    (lease,) = (store_path / "_leases").glob("*.json")
    assert len(store.committed_cases()) == 1
    capsys.readouterr()
    assert main(["store", "clean", str(store_path), "--json"]) == 0
    listed = {(e["kind"], Path(e["path"]).name) for e in json.loads(capsys.readouterr().out)["entries"]}
    assert listed == {("staging", staging.name), ("stale leases", lease.name)}
    assert staging.is_dir()
    assert lease.is_file()
    assert main(["store", "clean", str(store_path), "--yes"]) == 0
    assert not staging.exists()
    assert not lease.exists()
    assert main(argv) == 0  # the rerun commits the second case
    assert len(store.committed_cases()) == 2


def test_store_clean_prunes_graphs_of_other_versions_and_unused_models(
    tmp_path, monkeypatch, capsys, cluttered
):
    cache = tmp_path / "engine-cache"
    monkeypatch.setenv("MEDSAM_ENGINE_CACHE", str(cache))
    current = graph_folder(LITE_MEDSAM_SHA256, "openvino")
    old = current.with_name(f"{LITE_MEDSAM_SHA256[:16]}-openvino-2023.0.0-2.0.0")
    unused = current.with_name(f"{'ab' * 8}{current.name[16:]}")
    notes = current.with_name("notes")
    for folder in (current, old, unused, notes):
        folder.mkdir(parents=True)
        (folder / "encoder.onnx").write_bytes(b"\1" * 4096)
    capsys.readouterr()
    assert main(["store", "clean", str(cluttered), "--json"]) == 0
    assert "model graphs" not in json.loads(capsys.readouterr().out)["kinds"]  # only with --graphs
    assert main(["store", "clean", str(cluttered), "--graphs", "--json"]) == 0
    graphs = [e for e in json.loads(capsys.readouterr().out)["entries"] if e["kind"] == "model graphs"]
    assert sorted(Path(e["path"]).name for e in graphs) == sorted([old.name, unused.name])
    assert all(e["size"] == 4096 for e in graphs)
    assert main(["store", "clean", str(cluttered), "--graphs", "--yes"]) == 0
    assert current.is_dir()
    assert notes.is_dir()
    assert not old.exists()
    assert not unused.exists()


def test_store_clean_of_what_is_no_store_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    for given in (tmp_path / "missing", tmp_path / "file.txt", tmp_path):
        assert main(["store", "clean", str(given)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()  # and made nothing
