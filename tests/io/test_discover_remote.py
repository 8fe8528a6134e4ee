"""fsspec inputs: an in-memory filesystem and a real S3 API (moto's server) on loopback."""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest

from medsam_engine.pipeline.io.discover import discover
from medsam_engine.pipeline.io.readers import read_case
from medsam_engine.pipeline.store.case_store import CaseStore


def _upload(fs, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture
def memory_fs():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/medsam-test", recursive=True)


def test_memory_folder_and_zip(memory_fs, tmp_path, multi_series_folder, chest_volume):
    _upload(memory_fs, multi_series_folder, "/medsam-test/study")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((multi_series_folder / "a").glob("IM*")):
            zf.write(path, f"a/{path.name}")
    memory_fs.put_file(str(archive), "/medsam-test/zips/study.zip")
    store = CaseStore(tmp_path / "store")
    folder_cases = discover(["memory://medsam-test/study"], store.case_ids())
    zip_cases = discover(["memory://medsam-test/zips/study.zip"], store.case_ids())
    assert [c.kind for c in folder_cases] == ["dicom-series", "dicom-series"]
    assert [c.kind for c in zip_cases] == ["dicom-series"]
    for case in folder_cases + zip_cases:
        assert Path(case.image).is_relative_to(store.root / "_cache")
        assert np.array_equal(read_case(case).array, chest_volume.array)
    assert discover(["memory://medsam-test/study"], store.case_ids()) == folder_cases  # the copy is reused


def test_missing_remote_path_is_a_failing_case(memory_fs, tmp_path):
    memory_fs.mkdir("/medsam-test")
    (case,) = discover(["memory://medsam-test/nothing-here"], CaseStore(tmp_path).case_ids())
    assert case.kind == "unreadable"
    assert "nothing found" in case.error


def test_s3_prefix_through_a_real_s3_api(tmp_path, multi_series_folder, chest_volume, monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(key, value)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("archive-bucket")
        _upload(fs, multi_series_folder / "b", "archive-bucket/ct/b")
        fsspec.filesystem("s3").invalidate_cache()
        (case,) = discover(["s3://archive-bucket/ct"], CaseStore(tmp_path / "store").case_ids())
        assert np.array_equal(read_case(case).array, chest_volume.array)
    finally:
        server.stop()
