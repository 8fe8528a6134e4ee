"""nnU-Net's multi-channel cases (``CASE_0000``, ``CASE_0001``, ... with a ``CASE`` prediction) as one case:
one channel segmented, the others checked for its grid, all of them in the manifest and the nnU-Net export.
Real data: nilearn's MNI152 T1 template and its grey- and white-matter maps as three channels of one case."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.geometry import to_source_grid
from medsam_engine.pipeline.io.discover import discover
from medsam_engine.pipeline.report.evaluate import match_references
from medsam_engine.pipeline.store.case_store import CaseStore

CHANNELS = ("t1", "gm", "wm")
SLICES = slice(80, 86)  # six axial slices through the lateral ventricles


@dataclass(frozen=True)
class Mni:
    """The three MNI images (cropped) in ``folder`` as <channel>.nii.gz, their arrays, and a prediction-like
    label map from the tissue maps (labels.nii.gz): 1 grey matter, 2 white matter (probability above half)."""

    folder: Path
    arrays: dict[str, np.ndarray]
    labels: np.ndarray


def _crop(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Six axial slices of an MNI image, placed where they were (the affine's origin moved with them)."""
    affine = image.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, SLICES.start], [0, 0, 0, 1]])
    return nib.Nifti1Image(np.asarray(image.dataobj)[:, :, SLICES], affine)


@pytest.fixture(scope="module")
def mni(tmp_path_factory) -> Mni:
    nilearn = pytest.importorskip(
        "nilearn", reason="the MNI152 template ships in nilearn (pip install .[test])"
    )
    data = Path(nilearn.__file__).parent / "datasets" / "data"
    images = {
        name: _crop(nib.load(str(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")))
        for name in CHANNELS
    }
    arrays = {name: np.asarray(image.dataobj) for name, image in images.items()}
    labels = np.zeros(arrays["t1"].shape, dtype=np.uint8)
    labels[arrays["gm"] > 127] = 1
    labels[arrays["wm"] > 127] = 2
    folder = tmp_path_factory.mktemp("mni")
    for name, image in images.items():
        nib.save(image, str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(labels, images["t1"].affine), str(folder / "labels.nii.gz"))
    return Mni(folder, arrays, labels)


def nnunet_dataset(
    root: Path, mni: Mni, *, channels: tuple[int, ...] = (0, 1, 2), dataset_json: bool = True
) -> Path:
    """An nnU-Net raw layout under ``root``: DATASET/imagesTs/brain_000k.nii.gz (k in ``channels``),
    predictions/brain.nii.gz and, with ``dataset_json``, DATASET/dataset.json naming channels and labels."""
    dataset = root / "Dataset501_MNI"
    (dataset / "imagesTs").mkdir(parents=True)
    (root / "predictions").mkdir()
    for k in channels:
        shutil.copy(mni.folder / f"{CHANNELS[k]}.nii.gz", dataset / "imagesTs" / f"brain_{k:04d}.nii.gz")
    shutil.copy(mni.folder / "labels.nii.gz", root / "predictions" / "brain.nii.gz")
    if dataset_json:
        meta = {
            "channel_names": {"0": "T1", "1": "GM", "2": "WM"},
            "labels": {"background": 0, "grey matter": 1, "white matter": 2},
            "file_ending": ".nii.gz",
        }
        (dataset / "dataset.json").write_text(json.dumps(meta))
    return dataset


def _annotate(dataset: Path, root: Path, box_fill: Path, *extra: str) -> int:
    argv = ["annotate", str(dataset / "imagesTs"), "--coarse-mask", str(root / "predictions")]
    return main([*argv, "--store", str(root / "store"), "--config", str(box_fill), *extra])


def _on_source_grid(store: CaseStore, case_id: str) -> np.ndarray:
    """The stored image in the input file's own (i, j, k) voxel order."""
    return to_source_grid(store.read_image(case_id), store.read_labels(case_id)[1].geometry)


def test_the_channels_of_an_nnunet_case_are_one_case(mni, tmp_path):
    dataset = nnunet_dataset(tmp_path, mni, dataset_json=False)  # the prediction's name shows the layout
    ids = CaseStore(tmp_path / "store").case_ids()
    (case,) = discover([dataset / "imagesTs"], ids, coarse_masks=[tmp_path / "predictions"])
    assert [Path(c).name for c in case.channels] == [f"brain_000{k}.nii.gz" for k in range(3)]
    assert Path(case.image).name == "brain_0000.nii.gz"
    assert Path(case.coarse_mask).name == "brain.nii.gz"
    assert case.channel_names == ()


def test_numbered_files_without_nnunet_evidence_stay_cases_of_their_own(mni, tmp_path):
    dataset = nnunet_dataset(tmp_path, mni, dataset_json=False)  # as frames of a sequence, frame_0000 ...
    cases = discover([dataset / "imagesTs"], CaseStore(tmp_path / "store").case_ids())
    assert len(cases) == 3
    assert not any(case.channels for case in cases)


def test_dataset_json_beside_the_images_makes_and_names_the_case(mni, tmp_path):
    dataset = nnunet_dataset(tmp_path, mni)
    (case,) = discover([dataset / "imagesTs"], CaseStore(tmp_path / "store").case_ids())
    assert case.channel_names == ("T1", "GM", "WM")
    assert len(case.channels) == 3


def test_channel_0_is_segmented_and_the_manifest_lists_every_channel(mni, tmp_path, box_fill, capsys):
    dataset = nnunet_dataset(tmp_path, mni)
    assert _annotate(dataset, tmp_path, box_fill) == 0
    assert "1 done" in capsys.readouterr().out
    store = CaseStore(tmp_path / "store")
    (case_id,) = store.committed_cases()
    manifest = store.manifest(case_id)
    assert [Path(c).name for c in manifest["channels"]] == [f"brain_000{k}.nii.gz" for k in range(3)]
    assert manifest["channel"] == 0
    assert manifest["channel_names"] == ["T1", "GM", "WM"]
    assert Path(manifest["image"]).name == "brain_0000.nii.gz"
    assert "channel" not in store.case_attrs(case_id)["signature"]  # channel 0: signatures as before
    assert np.array_equal(_on_source_grid(store, case_id), mni.arrays["t1"])


def test_a_channel_is_chosen_by_its_name_in_dataset_json(mni, tmp_path, box_fill, capsys):
    dataset = nnunet_dataset(tmp_path, mni)
    argv = ["--channel", "wm", "--labels", str(dataset / "dataset.json")]
    assert _annotate(dataset, tmp_path, box_fill, *argv) == 0
    store = CaseStore(tmp_path / "store")
    (case_id,) = store.committed_cases()
    assert store.manifest(case_id)["channel"] == 2
    assert store.case_attrs(case_id)["signature"]["channel"] == 2
    assert np.array_equal(_on_source_grid(store, case_id), mni.arrays["wm"])
    names = {p["label-value"]: p["name"] for p in store.label_properties(case_id)}
    assert names[1] == "grey matter"  # the label names of --labels dataset.json
    assert set(names.items()) <= {(1, "grey matter"), (2, "white matter")}
    capsys.readouterr()
    assert _annotate(dataset, tmp_path, box_fill) == 1  # channel 0 now: another result, not overwritten
    assert "--overwrite" in capsys.readouterr().out


def test_a_channel_off_the_grid_fails_its_case_naming_the_file(mni, tmp_path, box_fill, capsys):
    dataset = nnunet_dataset(tmp_path, mni)
    path = dataset / "imagesTs" / "brain_0001.nii.gz"
    moved = nib.load(str(path))
    shifted = moved.affine.copy()
    shifted[0, 3] += 2.0  # two millimetres to the side
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), shifted), str(path))
    assert _annotate(dataset, tmp_path, box_fill) == 1
    out = capsys.readouterr().out
    assert "brain_0001.nii.gz: not on the grid of brain_0000.nii.gz (its affine differs by up to 2 mm)" in out


def test_a_missing_channel_fails_its_case_with_the_files_it_has(mni, tmp_path, box_fill, capsys):
    dataset = nnunet_dataset(tmp_path, mni, channels=(0, 2), dataset_json=False)
    assert _annotate(dataset, tmp_path, box_fill) == 1
    out = capsys.readouterr().out
    assert "nnU-Net case brain: channel 0001 is missing (the folder holds brain_0000, brain_0002)" in out


def test_a_channel_the_case_lacks_fails_it_and_a_name_none_has_is_bad_usage(mni, tmp_path, box_fill, capsys):
    dataset = nnunet_dataset(tmp_path, mni)
    assert _annotate(dataset, tmp_path, box_fill, "--channel", "5") == 1
    out = capsys.readouterr().out
    assert "channel 5 was asked for (input.channel, --channel) but the case has 3 channels" in out
    argv = ["--channel", "FLAIR", "--labels", str(dataset / "dataset.json")]
    assert _annotate(dataset, tmp_path, box_fill, *argv) == 2
    assert "input.channel 'FLAIR' names no channel (0 T1, 1 GM, 2 WM)" in capsys.readouterr().err


def test_the_nnunet_export_keeps_the_case_name_and_its_channels(mni, tmp_path, box_fill):
    dataset = nnunet_dataset(tmp_path, mni)
    assert _annotate(dataset, tmp_path, box_fill, "--channel", "1") == 0
    out = tmp_path / "export"
    argv = ["export", str(tmp_path / "store"), "--format", "nnunet", "--out", str(out), "--name-by", "input"]
    assert main(argv) == 0
    written = json.loads((out / "dataset.json").read_text())
    assert written["channel_names"] == {"0": "T1", "1": "GM", "2": "WM"}
    assert written["medsam_cases"] == ["brain"]
    for k, name in enumerate(CHANNELS):
        image = nib.load(str(out / "imagesTr" / f"brain_{k:04d}.nii.gz"))
        assert np.array_equal(np.asarray(image.dataobj), mni.arrays[name])
    exported = np.asarray(nib.load(str(out / "labelsTr" / "brain.nii.gz")).dataobj)
    assert exported.shape == mni.labels.shape
    assert set(np.unique(exported).tolist()) <= {0, 1, 2}


def test_eval_pairs_an_nnunet_case_with_its_labels_by_case_name(mni, tmp_path, box_fill):
    dataset = nnunet_dataset(tmp_path, mni)  # dataset.json shows the layout: no prediction needed
    argv = [
        "annotate",
        str(dataset / "imagesTs"),
        "--detector",
        "intensity",
        "--store",
        str(tmp_path / "store"),
    ]
    assert main([*argv, "--config", str(box_fill)]) == 0
    references = tmp_path / "labelsTs"
    references.mkdir()
    shutil.copy(tmp_path / "predictions" / "brain.nii.gz", references / "brain.nii.gz")
    shutil.copy(tmp_path / "predictions" / "brain.nii.gz", references / "other.nii.gz")
    (case_id,) = CaseStore(tmp_path / "store").committed_cases()
    assert match_references(CaseStore(tmp_path / "store"), [references]) == {
        case_id: references / "brain.nii.gz"
    }
