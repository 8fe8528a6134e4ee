"""Hostile input through the command line: absurd headers, degenerate geometry, NaN/Inf voxels, archives
nested too deep, coarse masks that are not label maps. Each is one failing case with a reason naming the file
and what is wrong, refused from its header before pixels fill memory; the good case beside them is
annotated."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


def _nifti_claiming(path, shape) -> None:
    """A NIfTI whose header claims ``shape`` (int16) but holds a few bytes: a corrupt or hostile header."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 4096)


def _degenerate_nifti(path, real) -> None:
    """Real CT voxels with a header whose z spacing is zero in both the qform and the sform."""
    image = nib.load(str(real))
    header = image.header.copy()
    header.set_qform(None, code=0)
    header["srow_z"] = [0, 0, 0, 0]
    header["sform_code"] = 1
    header["vox_offset"] = 352
    data = np.asanyarray(image.dataobj).astype(np.int16)
    header.set_data_dtype(np.int16)
    path.write_bytes(header.binaryblock + b"\0" * 4 + data.tobytes(order="F"))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, small_chest, small_chest_nifti, box_fill):
    root = tmp_path_factory.mktemp("hostile")
    inputs = root / "inputs"
    inputs.mkdir()
    shutil.copy(small_chest[0], inputs / "good.nrrd")
    _nifti_claiming(inputs / "huge.nii", (30000, 30000, 30000))
    _nifti_claiming(inputs / "no_rows.nii", (0, 512, 10))
    nrrd.write(
        str(inputs / "claims.nrrd"),
        np.zeros((4, 4, 4), np.int16),
        {"space": "left-posterior-superior", "space directions": np.eye(3), "encoding": "gzip"},
    )
    text = (inputs / "claims.nrrd").read_bytes().replace(b"sizes: 4 4 4", b"sizes: 50000 50000 50000")
    (inputs / "claims.nrrd").write_bytes(text)
    _degenerate_nifti(inputs / "flat.nii", small_chest_nifti[0])
    volume = read_volume(small_chest[0])
    ijk = np.moveaxis(volume.array, (0, 1, 2), (2, 1, 0)).astype(np.float32)
    ijk[10, 10, 1], ijk[20, 20, 2] = np.nan, np.inf
    nib.save(nib.Nifti1Image(ijk, volume.geometry.affine[:, [2, 1, 0, 3]]), str(inputs / "holes.nii.gz"))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(str(inputs / "rows.dcm"))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PixelSpacing = [0, 0]
    ds.save_as(str(inputs / "no_spacing.dcm"))
    nested = shutil.copy(small_chest[0], root / "deep.nrrd")
    for level in range(3):  # a zip in a zip in a zip
        target = root / f"level{level}.zip"
        with zipfile.ZipFile(target, "w") as zf:
            zf.write(nested, f"inner/{nested.name}")
        nested = target
    shutil.copy(nested, inputs / "nested.zip")
    store = root / "store"
    argv = ["annotate", str(inputs), "--out", str(store), "--detector", "intensity"]
    code = main([*argv, "--config", str(box_fill)])
    return store, code


def test_each_hostile_input_is_one_failing_case_with_its_reason(hostile):
    store, code = hostile
    assert code == 1
    s = CaseStore(store)
    assert len(s.committed_cases()) == 1  # good.nrrd
    reasons = sorted(e["reason"] for e in s.errors().values())
    expected = {
        "huge.nii": "claims 30000×30000×30000",
        "no_rows.nii": "claims an empty image",
        "claims.nrrd": "claims 50000×50000×50000",
        "flat.nii": "transform is degenerate",
        "holes.nii.gz": "2 voxels NaN or infinite",
        "inputs series": "claims 60000×60000×1",  # rows.dcm: one-file series are named by their folder
        "inputs series ": "transform is degenerate",  # no_spacing.dcm
        "level0.zip": "nested too deep",  # the innermost archive of nested.zip
    }
    for name, why in expected.items():
        assert any(r.startswith(name.strip()) and why in r for r in reasons), (name, reasons)
    assert len(reasons) == len(expected)


def test_coarse_masks_that_are_not_label_maps_are_refused(tmp_path, small_chest, box_fill):
    """Four copies of the real CT (one voxel apart, so four cases), each with a coarse mask of another
    kind."""
    image, header = nrrd.read(str(small_chest[0]))
    labels = read_volume(small_chest[1])
    lungs = np.moveaxis(labels.array, (0, 1, 2), (2, 1, 0)).astype(np.float32)
    kinds = {
        "fractions": np.where(lungs > 0, lungs + 0.5, 0),
        "negative": np.where(lungs == lungs.max(), -1, lungs),
        "image": lungs * 20000.0,
        "whole-floats": lungs,
    }  # a float map of whole numbers is a label map
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for k, (kind, mask) in enumerate(kinds.items()):
        copy = image.copy()
        copy[0, 0, 0] += k + 1
        nrrd.write(str(images / f"{kind}.nrrd"), copy, header)
        nib.save(
            nib.Nifti1Image(mask, labels.geometry.affine[:, [2, 1, 0, 3]]), str(masks / f"{kind}.nii.gz")
        )
    store = CaseStore(tmp_path / "store")
    argv = ["annotate", str(images), "--coarse-mask", str(masks), "--out", str(store.root)]
    assert main([*argv, "--config", str(box_fill)]) == 1
    reasons = {Path(store.manifest(c)["image"]).name: e for c, e in store.errors().items()}
    assert {name: e["stage"] for name, e in reasons.items()} == {
        "fractions.nrrd": "prompt",
        "negative.nrrd": "prompt",
        "image.nrrd": "prompt",
    }
    assert "non-integer values (e.g. " in reasons["fractions.nrrd"]["reason"]
    assert "negative labels (down to -1)" in reasons["negative.nrrd"]["reason"]
    assert "beyond 65535" in reasons["image.nrrd"]["reason"]
    assert len(store.committed_cases()) == 1  # whole-floats
