"""Provenance values: UTC stamps, version ids and file hashes."""

from __future__ import annotations

import hashlib
import re

from medsam_engine.pipeline.core.provenance import (
    file_sha256,
    files_sha256,
    package_version,
    utc_stamp,
    version_id,
)


def test_utc_stamps_are_iso_8601():
    assert utc_stamp(0) == "1970-01-01T00:00:00Z"
    assert utc_stamp(1.5, precise=True) == "1970-01-01T00:00:01.500000+00:00"
    assert re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{6}", version_id())


def test_file_hashes_match_hashlib_and_a_folder_hash_counts_names(tmp_path):
    data = bytes(range(256)) * 5000  # more than one 1 MiB block
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "b.bin").write_bytes(b"b")
    assert file_sha256(tmp_path / "a.bin") == hashlib.sha256(data).hexdigest()
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    assert files_sha256(files) == hashlib.sha256(data + b"b").hexdigest()
    assert files_sha256(files, root=tmp_path) == hashlib.sha256(b"a.bin" + data + b"b.bin" + b"b").hexdigest()


def test_the_package_version_is_known_when_installed():
    assert package_version() not in ("", "0+unknown")
