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
