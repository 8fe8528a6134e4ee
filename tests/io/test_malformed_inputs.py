"""A corpus of broken inputs: every bad file ends as a ReadError with a reason; nothing stops the batch.

The fuzz test mutates real DICOM files (flipped, cut and inserted bytes) and checks the same property.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from medsam_engine.pipeline.core.errors import CaseError, ReadError
from medsam_engine.pipeline.core.types import Volume
from medsam_engine.pipeline.io.archives import ExtractLimits
from medsam_engine.pipeline.io.discover import DiscoveryOptions, discover
from medsam_engine.pipeline.io.readers import read_case
from medsam_engine.pipeline.store.case_store import CaseStore

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))


def _with(path: Path, **changes) -> pydicom.Dataset:
    """A copy of ``path`` as its own series and instance, with ``changes`` (None deletes the element)."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def _wrong_length(data: bytes) -> bytes:
    """CT_small with the length of its Patient's Name element set far beyond the end of the file."""
    tag = b"\x10\x00\x10\x00PN"
    at = data.index(tag) + len(tag)
    return data[:at] + b"\xf0\xff" + data[at + 2 :]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_chest, small_chest_nifti) -> tuple[Path, set[str]]:
    """A folder of broken files (and one good one); returns it and the names that must fail."""
    root = tmp_path_factory.mktemp("malformed") / "corpus"
    root.mkdir()
    ct_path = root / "ct.tmp"
    _with(CT_SMALL).save_as(str(ct_path))
    ct = ct_path.read_bytes()
    ct_path.unlink()
    files = {
        "truncated_pixels.dcm": ct[: len(ct) - 9000],
        "truncated_header.dcm": ct[:300],
        "wrong_length.dcm": _wrong_length(ct),
        "random.dcm": os.urandom(4096),
        "IM_random_with_marker": b"\x00" * 128 + b"DICM" + os.urandom(3000),
        "zero.dcm": b"",
        "zero.nii.gz": b"",
        "random.nii.gz": os.urandom(3000),
        "random.nrrd": b"NRRD0004\n" + os.urandom(500),
        "random.png": b"\x89PNG\r\n\x1a\n" + os.urandom(500),
        "random.tif": b"II*\x00" + os.urandom(500),
        "cut.nii.gz": small_chest_nifti[0].read_bytes()[:2000],
        "cut.nrrd": small_chest[0].read_bytes()[:1500],
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    _with(CT_SMALL, PixelData=None).save_as(str(root / "no_pixels.dcm"))
    _with(CT_SMALL, Rows=512).save_as(str(root / "rows_too_many.dcm"))
    (root / "dangling.dcm").symlink_to(root / "does-not-exist.dcm")
    with zipfile.ZipFile(root / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.dcm", b"\x00" * (24 << 20))
    shutil.copy(CT_SMALL, root / "good.dcm")
    bad = set(files) | {"no_pixels.dcm", "rows_too_many.dcm", "dangling.dcm", "bomb.zip"}
    return root, bad


def _run_batch(cases) -> tuple[list[Volume], list[CaseError]]:
    """What the engine does per case: read, and record a CaseError without stopping."""
    done, failed = [], []
    for case in cases:
        try:
            done.append(read_case(case))
        except CaseError as exc:
            failed.append(exc)
    return done, failed


def test_every_bad_file_gets_an_error_with_a_reason(tmp_path, corpus):
    root, bad = corpus
    limits = ExtractLimits(ratio_from_bytes=1 << 20, max_ratio=50)
    cases = discover([root], CaseStore(tmp_path).case_ids(), options=DiscoveryOptions(limits=limits))
    done, failed = _run_batch(cases)
    assert len(done) == 1
    assert done[0].shape == (1, 128, 128)  # good.dcm
    assert all(isinstance(e, ReadError) and len(e.reason) > 20 for e in failed)
    reasons = "\n".join(e.reason for e in failed)
    for name in bad:
        assert f"{name}:" in reasons or f"{name}," in reasons, (name, reasons)
    assert len(failed) == len(bad)
    assert "empty file" in reasons
    assert "no pixel data" in reasons
    assert "zip bomb" in reasons


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value it meets
@settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    source=st.sampled_from(
        [
            "CT_small.dcm",
            "MR_small_RLE.dcm",
            "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_jp2klossless.dcm",
            "emri_small_RLE.dcm",
        ]
    ),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert"]), st.floats(0, 1), st.binary(min_size=1, max_size=16)
        ),
        min_size=1,
        max_size=4,
    ),
)
@example(source="MR_small_jpeg_ls_lossless.dcm", edits=[("flip", 0.228515625, b"\x00")])  # Rows' VR zeroed:
def test_mutated_dicom_never_escapes_as_anything_but_a_read_error(source, edits):  # raised on first access
    data = bytearray(Path(get_testdata_file(source)).read_bytes())
    for kind, where, noise in edits:
        at = int(where * (len(data) - 1))
        if kind == "flip":
            data[at : at + len(noise)] = noise
        elif kind == "cut":
            del data[at:]
        else:
            data[at:at] = noise
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutant.dcm"
        path.write_bytes(bytes(data))
        cases = discover([folder], CaseStore(Path(folder) / "store").case_ids())
        assert len(cases) <= 1
        done, failed = _run_batch(cases)
        for volume in done:
            assert volume.array.shape[:3] == volume.geometry.shape
            assert np.all(np.isfinite(volume.geometry.affine))
        assert all(isinstance(e, ReadError) and e.reason for e in failed)
