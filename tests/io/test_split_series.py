"""A series is a series wherever its files are: files of one DICOM series in several inputs make one case."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.io.discover import discover
from medsam_engine.pipeline.store.case_store import CaseStore


def _split(series, root):
    """The series' files in two folders (a PACS export in two parts), one slice copied into both."""
    files = sorted(series.iterdir())
    first, second = root / "part1", root / "part2"
    for folder, chosen in ((first, files[:3]), (second, files[2:])):
        folder.mkdir(parents=True)
        for path in chosen:
            shutil.copy(path, folder / path.name)
    return first, second


def test_the_parts_of_a_series_make_one_case_with_each_instance_once(tmp_path, small_chest_dicom):
    first, second = _split(small_chest_dicom, tmp_path)
    store = CaseStore(tmp_path / "store")
    (whole,) = discover([small_chest_dicom], store.case_ids())
    (merged,) = discover([first, second], store.case_ids())
    assert merged.case_id == whole.case_id
    assert merged.error is None
    assert sorted(p.rsplit("/", 1)[1] for p in merged.files) == sorted(
        p.name for p in small_chest_dicom.iterdir()
    )


def test_a_series_split_across_two_folders_exports_as_the_whole_series(
    tmp_path, small_chest_dicom, small_chest, box_fill
):
    first, second = _split(small_chest_dicom, tmp_path)
    for name, inputs in (("whole", [small_chest_dicom]), ("split", [first, second])):
        mask = [str(small_chest[1])] * len(inputs)
        argv = ["annotate", *map(str, inputs), "--coarse-mask", *mask, "--out", str(tmp_path / name)]
        assert main([*argv, "--config", str(box_fill)]) == 0
        assert (
            main(
                ["export", str(tmp_path / name), "--format", "nifti", "--out", str(tmp_path / f"{name}-nii")]
            )
            == 0
        )
    (whole,) = (tmp_path / "whole-nii").glob("*.nii.gz")
    (split,) = (tmp_path / "split-nii").glob("*.nii.gz")
    a, b = nib.load(str(whole)), nib.load(str(split))
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert np.allclose(a.affine, b.affine)
    assert int(np.asanyarray(a.dataobj).astype(bool).sum()) > 0


def test_copies_of_one_instance_that_differ_fail_the_case_naming_both_files(
    tmp_path, small_chest_dicom, box_fill
):
    first, second = _split(small_chest_dicom, tmp_path)
    shared = sorted(second.iterdir())[0]  # the slice both parts hold
    ds = pydicom.dcmread(str(shared))
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(shared))
    store = CaseStore(tmp_path / "store")
    (case,) = discover([first, second], store.case_ids())
    assert case.error
    assert shared.name in case.error
    assert "different content" in case.error
    argv = ["annotate", str(first), str(second), "--out", str(tmp_path / "s"), "--detector", "intensity"]
    assert main([*argv, "--config", str(box_fill)]) == 1
    assert CaseStore(tmp_path / "s").errors()[case.case_id]["stage"] == "read"


def test_an_unreadable_slice_is_named_in_the_series_reason(tmp_path, small_chest_dicom, box_fill):
    first, second = _split(small_chest_dicom, tmp_path)
    broken = sorted(first.iterdir())[1]  # a middle slice of the series, cut off inside its header
    broken.write_bytes(broken.read_bytes()[:200])
    store = tmp_path / "store"
    argv = ["annotate", str(first), str(second), "--out", str(store), "--detector", "intensity"]
    assert main([*argv, "--config", str(box_fill)]) == 1
    errors = CaseStore(store).errors()
    reasons = {e["reason"] for e in errors.values()}
    series = [r for r in reasons if "missing between" in r]
    assert len(series) == 1
    assert broken.name in series[0]
    assert "unreadable file" in series[0]
    assert any(r.startswith(f"{broken.name}:") for r in reasons)  # and the file is its own failing case
