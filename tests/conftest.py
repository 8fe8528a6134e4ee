"""Shared fixtures: real data that ships in PyPI packages, cropped to keep the suite fast, and one model."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MEDSAM_ENGINE_ID_KEY", "test-suite-key")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def prefect_server():
    """One real temporary Prefect server (and database) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def local_ray():
    """One real local Ray for the whole test session."""
    import ray

    ray.init(num_cpus=2, namespace="medsam-engine", include_dashboard=False,
             object_store_memory=256 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def slicerio_data() -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data"


@pytest.fixture(scope="session")
def chest_ct(slicerio_data) -> tuple[Path, Path]:
    """slicerio's real chest CT (LPS, negative in-plane directions) and its 7-label map."""
    return slicerio_data / "CTChest4.nrrd", slicerio_data / "Segmentation.seg.nrrd"


@pytest.fixture(scope="session")
def small_chest(tmp_path_factory, chest_ct) -> tuple[Path, Path]:
    """Four real slices (z 14..17) of the chest CT and labels as NRRD with the original geometry."""
    import nrrd

    folder = tmp_path_factory.mktemp("small_chest")
    paths = []
    for source, name in zip(chest_ct, ("ct.nrrd", "labels.nrrd")):
        data, header = nrrd.read(str(source))
        header = {k: v for k, v in header.items() if not k.startswith(("Segment", "sizes"))}
        origin = np.asarray(header["space origin"], dtype=float)
        header["space origin"] = origin + 14 * np.asarray(header["space directions"])[2]
        nrrd.write(str(folder / name), np.ascontiguousarray(data[:, :, 14:18]), header)
        paths.append(folder / name)
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def small_chest_nifti(tmp_path_factory, small_chest) -> tuple[Path, Path]:
    """The same four slices as NIfTI in RAS with (x, y, z) axes, as research pipelines write them."""
    import nibabel as nib

    from pipeline.readers import read_volume

    folder = tmp_path_factory.mktemp("small_chest_nifti")
    paths = []
    for source, name in zip(small_chest, ("ct.nii.gz", "labels.nii.gz")):
        volume = read_volume(source)
        ijk = np.moveaxis(volume.array, (0, 1, 2), (2, 1, 0)).astype(np.int16)
        nib.save(nib.Nifti1Image(ijk, volume.geometry.affine[:, [2, 1, 0, 3]]), str(folder / name))
        paths.append(folder / name)
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def nuclei_2d(tmp_path_factory) -> tuple[Path, Path]:
    """stardist's real fluorescence nuclei image cropped to 256x256, as 8-bit PNG, and its instance mask."""
    import cv2
    import stardist
    import tifffile

    data = Path(stardist.__file__).parent / "data" / "images"
    image = tifffile.imread(str(data / "img2d.tif"))[:256, :256]
    mask = tifffile.imread(str(data / "mask2d.tif"))[:256, :256]
    folder = tmp_path_factory.mktemp("nuclei")
    scaled = (image - image.min()) / max(float(image.max() - image.min()), 1e-6) * 255
    cv2.imwrite(str(folder / "nuclei.png"), scaled.astype(np.uint8))
    cv2.imwrite(str(folder / "nuclei_mask.png"), mask.astype(np.uint16))
    return folder / "nuclei.png", folder / "nuclei_mask.png"


@pytest.fixture(scope="session")
def runner():
    from pipeline.model import LiteMedSAMRunner, load_lite_medsam

    return LiteMedSAMRunner(load_lite_medsam())


def write_dicom_series(volume, folder: Path, *, series_uid: str = "1.2.826.0.1.3680043.8.498.1") -> Path:
    """Write a canonical CT Volume as a real multi-file DICOM series (one file per slice, shuffled names)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.geometry.affine  # (z, y, x) -> LPS
    row_dir = lps[:3, 2] / np.linalg.norm(lps[:3, 2])
    col_dir = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    _, dy, dx = volume.spacing
    order = np.random.default_rng(0).permutation(volume.shape[0])
    for z in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, series_uid + ".0"
        ds.PatientName, ds.ImageType = "Test^Patient", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(volume.shape[0] - z)  # deliberately reversed: readers must sort by position
        ds.ImagePositionPatient = [float(v) for v in (lps @ [z, 0, 0, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(dy), float(dx)]
        ds.SliceThickness = float(volume.spacing[0])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
        ds.PixelData = (volume.array[z] + 1024).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"IM{order[z]:04d}"), enforce_file_format=True)
    return folder


@pytest.fixture(scope="session")
def small_chest_dicom(tmp_path_factory, small_chest) -> Path:
    from pipeline.readers import read_volume

    return write_dicom_series(read_volume(small_chest[0]), tmp_path_factory.mktemp("dicom") / "series")


def make_archive(root: Path, small_chest, small_chest_nifti) -> tuple[Path, Path]:
    """An images/ folder (one NRRD, one NIfTI case) and a masks/ folder whose stems match it."""
    import shutil

    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    shutil.copy(small_chest[0], images / "chest_a.nrrd")
    shutil.copy(small_chest[1], masks / "chest_a.nrrd")
    shutil.copy(small_chest_nifti[0], images / "chest_b.nii.gz")
    shutil.copy(small_chest_nifti[1], masks / "chest_b.nii.gz")
    return images, masks
