"""The command-line contract end to end on real volumes and a real 2D image."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import nrrd
import numpy as np
import pytest
from conftest import make_archive

from medsam_engine.pipeline.annotate.run_record import RECORD_KEYS
from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


def _annotate_archive(root, small_chest, small_chest_nifti, *options: str):
    """One run over a NRRD case, a NIfTI case and an unreadable file (masks from a stem-matched folder)."""
    images, masks = make_archive(root, small_chest, small_chest_nifti)
    (images / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    shutil.copy(small_chest[1], masks / "broken.nrrd")
    store = root / "store"
    code = main(["annotate", str(images), "--coarse-mask", str(masks), "--out", str(store), *options])
    return root, store, code


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, small_chest, small_chest_nifti, box_fill):
    """The archive annotated by the box-fill runner: for what the model's masks do not change."""
    root = tmp_path_factory.mktemp("cli")
    return _annotate_archive(root, small_chest, small_chest_nifti, "--config", str(box_fill))


@pytest.fixture(scope="module")
def annotated_by_the_model(tmp_path_factory, small_chest, small_chest_nifti):
    """The archive annotated by LiteMedSAM: for the Dice it reaches against the reference, and for each
    label's overlap with its coarse mask (filled boxes tie where they overlap and the earlier box wins: the
    box-fill runner loses the spine's box under another label's). The NIfTI case holds the NRRD case's pixels:
    with room for a case's 12 embeddings (4 slices, 3 windows) its slices come from the cache."""
    root = tmp_path_factory.mktemp("cli-model")
    config = root / "config.yaml"
    config.write_text("model:\n  embedding_cache_mb: 64\n")
    return _annotate_archive(root, small_chest, small_chest_nifti, "--config", str(config))


def test_bad_input_fails_only_its_case_with_a_recorded_reason(annotated):
    _, store, code = annotated
    assert code == 1
    errors = CaseStore(store).errors()
    assert len(errors) == 1
    (error,) = errors.values()
    assert error["stage"] == "read"
    assert "broken.nii.gz" in error["reason"]
    assert len(CaseStore(store).committed_cases()) == 2


def test_nifti_export_lands_on_each_input_grid(annotated_by_the_model, tmp_path):
    _root, store, _ = annotated_by_the_model
    assert main(["export", str(store), "--format", "nifti", "--out", str(tmp_path)]) == 0
    s = CaseStore(store)
    for case_id in s.committed_cases():
        source = s.manifest(case_id)["image"]
        exported = nib.load(str(tmp_path / f"{case_id}.nii.gz"))
        if source.endswith(".nrrd"):
            raw, header = nrrd.read(source)
            lps = np.eye(4)
            lps[:3, :3] = np.asarray(header["space directions"]).T
            lps[:3, 3] = header["space origin"]
            expected_affine, expected_shape = np.diag([-1, -1, 1, 1]) @ lps, raw.shape
        else:
            ref = nib.load(source)
            expected_affine, expected_shape = ref.affine, ref.shape
        assert exported.shape == expected_shape
        assert np.allclose(exported.affine, expected_affine, atol=1e-4)
        # the exported labels sit on the voxels the coarse mask marked (same grid, same label values)
        mask_path = source.replace("/images/", "/masks/")
        mask = (
            np.asanyarray(nib.load(mask_path).dataobj)
            if mask_path.endswith(".nii.gz")
            else nrrd.read(mask_path)[0]
        )
        out = np.asanyarray(exported.dataobj)
        for label in (3, 7):  # thoracic spine (compact, off-centre in y) and body tissue
            overlap = np.logical_and(out == label, mask == label).sum() / max((mask == label).sum(), 1)
            assert overlap > 0.5, (case_id, label, overlap)
        flipped = np.logical_and(out[:, ::-1] == 3, mask == 3).sum() / max((mask == 3).sum(), 1)
        assert flipped < 0.2  # a y-flip would not overlap: the check above really tests the grid


def test_eval_reports_dice_per_case_and_label(annotated_by_the_model, small_chest, capsys):
    root, store, _ = annotated_by_the_model
    capsys.readouterr()
    assert main(["eval", str(store), "--reference", str(root / "masks"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2
    for labels in results.values():
        assert 0.5 < labels["3"]["dice"] <= 1.0  # thoracic spine, a compact target


def test_rerun_skips_committed_cases_without_encoding(annotated, box_fill):
    root, store, _ = annotated
    runs_before = set((store / "_runs").iterdir())
    argv = ["annotate", str(root / "images"), "--coarse-mask", str(root / "masks"), "--out", str(store)]
    code = main([*argv, "--config", str(box_fill)])
    assert code == 1  # the broken file still fails, and says so again
    (new_run,) = set((store / "_runs").iterdir()) - runs_before
    record = json.loads(new_run.read_text())
    statuses = sorted(c["status"] for c in record["cases"])
    assert statuses == ["failed", "skipped", "skipped"]
    assert record["runner"] == {}  # the model was never even loaded
    assert set(RECORD_KEYS) <= set(record)
    assert record["engine"] == "local"  # the Ray engine's schema
    assert record["counts"] == {"done": 0, "skipped": 2, "quarantined": 0, "failed": 1}


def test_2d_png_with_many_instance_boxes(nuclei_2d, tmp_path):
    store = tmp_path / "store"
    assert main(["annotate", str(nuclei_2d[0]), "--coarse-mask", str(nuclei_2d[1]), "--out", str(store)]) == 0
    s = CaseStore(store)
    (case_id,) = s.committed_cases()
    labels, attrs = s.read_labels(case_id)
    reference = read_volume(nuclei_2d[1]).array
    assert labels.shape == (1, 256, 256)
    assert len(attrs.instances) >= 20
    from medsam_engine.pipeline.core.metrics import dice

    assert dice(labels > 0, reference > 0) > 0.7
    out = tmp_path / "nifti"
    assert main(["export", str(store), "--format", "nifti", "--out", str(out)]) == 0
    exported = np.asanyarray(nib.load(str(out / f"{case_id}.nii.gz")).dataobj)
    assert exported.shape == (256, 256, 1)
    assert np.array_equal(exported[:, :, 0].T, labels[0])


def test_bad_usage_exits_2(tmp_path, small_chest):
    with pytest.raises(SystemExit) as info:
        main(["annotate", str(small_chest[0])])  # --out missing
    assert info.value.code == 2
    assert main(["annotate", str(small_chest[0]), "--out", str(tmp_path)]) == 2  # no prompt source


def test_dicom_series_with_nifti_coarse_mask_exports_on_the_series_grid(
    small_chest_dicom, small_chest_nifti, tmp_path, box_fill
):
    store = tmp_path / "store"
    assert (
        main(
            [
                "annotate",
                str(small_chest_dicom),
                "--coarse-mask",
                str(small_chest_nifti[1]),
                "--out",
                str(store),
                "--config",
                str(_fixed_window(tmp_path, box_fill)),
            ]
        )
        == 0
    )
    out = tmp_path / "nifti"
    assert main(["export", str(store), "--format", "nifti", "--out", str(out)]) == 0
    (case_id,) = CaseStore(store).committed_cases()
    exported = nib.load(str(out / f"{case_id}.nii.gz"))
    series = read_volume(small_chest_dicom)
    assert exported.shape == (128, 128, 4)  # (columns, rows, slices) of the series
    mask = nib.load(str(small_chest_nifti[1]))
    assert np.allclose(exported.affine, mask.affine, atol=1e-3)  # both RAS, same voxel grid
    labels = np.asanyarray(exported.dataobj)
    reference = np.asanyarray(mask.dataobj)
    assert np.logical_and(labels == 3, reference == 3).sum() > 0.5 * (reference == 3).sum()
    assert series.geometry.source_format == "dicom"


def _fixed_window(folder, box_fill):
    path = folder / "config.yaml"
    path.write_text("intensity:\n  ct_window: fixed\n" + box_fill.read_text())
    return path


def test_unusable_model_options_exit_2(tmp_path, small_chest):
    base = [
        "annotate",
        str(small_chest[0]),
        "--coarse-mask",
        str(small_chest[1]),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main([*base, "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main([*base, "--checkpoint", str(bad)]) == 2


def test_every_engine_reports_a_run_in_the_same_lines(tmp_path, capsys):
    from medsam_engine.pipeline.cli.common import print_outcomes

    outcomes = [
        {"case_id": "a1", "status": "done", "stage": ""},
        {"case_id": "b2", "status": "failed", "stage": "io"},
        {"case_id": "c3", "status": "quarantined", "stage": "io"},
        {"case_id": "d4", "status": "skipped", "stage": ""},
    ]
    assert print_outcomes(outcomes, {"b2": "b.nii.gz: not a NIfTI file"}, str(tmp_path)) is True
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "done     a1",
        "failed   b2  b.nii.gz: not a NIfTI file",
        "quarantined c3  io",
        "skipped  d4",
    ]
    assert lines[4] == f"1 done, 1 skipped, 1 failed, 1 quarantined -> {tmp_path.resolve()}"
    assert print_outcomes(outcomes[:1], {}, str(tmp_path)) is False
    assert capsys.readouterr().out.splitlines()[-1] == f"1 done, 0 skipped, 0 failed -> {tmp_path.resolve()}"
