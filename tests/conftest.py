"""Shared fixtures: real data that ships in PyPI packages, cropped to keep the suite fast, and one model."""

from __future__ import annotations

import os
from pathlib import Path

# Under pytest-xdist each worker gets its share of the cores for the threads of torch, OpenVINO, ONNX Runtime
# and BLAS, in this process and in those it starts (set before numpy or torch is imported): two workers
# whose threads each ask for every core spin against each other.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(max(1, _share)))

import numpy as np
import pytest

os.environ.setdefault("MEDSAM_ENGINE_ID_KEY", "test-suite-key")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# Fixtures built once per test run whose tests share one worker under pytest-xdist: the servers (one Prefect
# server, one Ray) and the exported graphs. Every other test runs with the rest of its file, so a file's
# module-scoped fixtures (an Orthanc, a reference flow run) are built once.
SESSION_SERVERS = {"prefect_server", "ray_cluster", "local_ray"}
SHARED = {"servers": SESSION_SERVERS, "graphs": {"exported_graphs"}}


def _group(item) -> str:
    used = set(item.fixturenames)
    shared = (name for name, fixtures in SHARED.items() if fixtures & used)
    return next(shared, item.nodeid.partition("::")[0])


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))


@pytest.fixture(scope="session")
def prefect_server():
    """One real temporary Prefect server (and database) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def local_ray(ray_cluster):
    """One real local Ray for the whole test session: the 2-node cluster below (a process can join only one
    Ray, so every test shares it)."""
    import ray

    yield ray


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
    for source, name in zip(chest_ct, ("ct.nrrd", "labels.nrrd"), strict=False):
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

    from medsam_engine.pipeline.io.readers import read_volume

    folder = tmp_path_factory.mktemp("small_chest_nifti")
    paths = []
    for source, name in zip(small_chest, ("ct.nii.gz", "labels.nii.gz"), strict=False):
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
def nuclei_tiles(tmp_path_factory) -> tuple[Path, Path]:
    """stardist's real 512x512 nuclei image as four 256x256 PNG tiles (one case each) and a folder of their
    instance masks under the same names."""
    import cv2
    import stardist
    import tifffile

    data = Path(stardist.__file__).parent / "data" / "images"
    image = tifffile.imread(str(data / "img2d.tif")).astype(np.float64)
    mask = tifffile.imread(str(data / "mask2d.tif"))
    scaled = ((image - image.min()) / max(float(image.max() - image.min()), 1e-6) * 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("tiles")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for row in (0, 1):
        for col in (0, 1):
            window = np.s_[row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256]
            cv2.imwrite(str(root / "images" / f"tile{row}{col}.png"), scaled[window])
            cv2.imwrite(str(root / "masks" / f"tile{row}{col}.png"), mask[window].astype(np.uint16))
    return root / "images", root / "masks"


@pytest.fixture(scope="session")
def two_tiles(nuclei_tiles, tmp_path_factory):
    """Two of the real nuclei tiles with their masks (two small 2D cases)."""
    import shutil

    images, masks = nuclei_tiles
    root = tmp_path_factory.mktemp("two-tiles")
    for folder in ("images", "masks"):
        (root / folder).mkdir()
    for name in ("tile00.png", "tile11.png"):
        shutil.copy(images / name, root / "images" / name)
        shutil.copy(masks / name, root / "masks" / name)
    return root / "images", root / "masks"


@pytest.fixture(scope="session")
def tiles_reference(two_tiles, box_fill, tmp_path_factory):
    """The label maps of a box-fill annotate run over ``two_tiles`` that met no fault, by case id."""
    from medsam_engine.pipeline.cli.main import main
    from medsam_engine.pipeline.store.case_store import CaseStore

    store = tmp_path_factory.mktemp("reference") / "store"
    argv = ["annotate", str(two_tiles[0]), "--coarse-mask", str(two_tiles[1]), "--out", str(store)]
    assert main([*argv, "--config", str(box_fill)]) == 0
    s = CaseStore(store)
    return {case_id: s.read_labels(case_id)[0] for case_id in s.committed_cases()}


@pytest.fixture(scope="session")
def s3_endpoint():
    """One real local S3 server (moto) on a loopback port for the test session; its URL."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def quick_case_retries(monkeypatch):
    """A local run's retries of a case after a transient error 10 ms apart instead of 1 s, 2 s, ... (the
    outage tests meet them in every case; how many retries there are stays as it is)."""
    from medsam_engine.pipeline.annotate.policy import LOCAL

    monkeypatch.setitem(vars(LOCAL), "retry_delay_s", 0.01)


def use_s3(monkeypatch, endpoint: str, bucket: str | None = None) -> str | None:
    """Point the standard AWS environment at ``endpoint`` (fresh s3fs clients) and make ``bucket``."""
    import fsspec
    import s3fs

    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    if bucket is None:
        return None
    fs = fsspec.filesystem("s3")
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def box_fill(tmp_path_factory) -> Path:
    """A configuration file for runs whose subject is not the model (reading, faults, stores, flows): the
    box-fill runner (pipeline/model/box_fill.py) in the network's place."""
    path = tmp_path_factory.mktemp("box-fill") / "box-fill.yaml"
    path.write_text("model:\n  runner: box-fill\n")
    return path


@pytest.fixture(scope="session")
def runner():
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

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
    from medsam_engine.pipeline.io.readers import read_volume

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


# -- store and export fixtures (issue 7): committed cases built from real data without the model ----------
def rotation(axis: int, degrees: float) -> np.ndarray:
    """A 4x4 rotation about world axis ``axis`` (0 = x, 1 = y, 2 = z) by ``degrees``."""
    angle = np.radians(degrees)
    out = np.eye(4)
    i, j = [a for a in range(3) if a != axis]
    out[i, i], out[i, j], out[j, i], out[j, j] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
    return out


def complete_dicom_headers(folder: Path, *, frame_of_reference_uid: str) -> Path:
    """Add what a scanner always writes and write_dicom_series leaves out (frame of reference, patient and
    study modules with anonymous values, series number)."""
    import pydicom

    for file in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(file))
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference_uid, ""
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "ANON0001", "Anon^Test", "", "O"
        ds.StudyID, ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "1", "", "20240101", "120000"
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.Manufacturer = "", 3, "test"
        ds.save_as(str(file), enforce_file_format=True)
    return folder


@pytest.fixture(scope="session")
def chest_label_names(chest_ct) -> dict[int, str]:
    """The segment names slicerio's chest segmentation carries (1 ribs ... 7 tissue)."""
    import nrrd

    header = nrrd.read_header(str(chest_ct[1]))
    return {
        int(header[f"Segment{i}_LabelValue"]): header[f"Segment{i}_Name"]
        for i in range(7)
        if f"Segment{i}_LabelValue" in header
    }


@pytest.fixture(scope="session")
def chest_series(tmp_path_factory, small_chest) -> dict[str, Path]:
    """The four real chest CT slices as complete multi-file DICOM series: axial, and oblique (rotated 20 deg
    about x and 12 deg about z, so every ImageOrientationPatient component is off-axis)."""
    from dataclasses import replace

    from medsam_engine.pipeline.io.readers import read_volume

    ct = read_volume(small_chest[0])
    tilted = rotation(0, 20) @ rotation(2, 12) @ ct.geometry.affine
    oblique = replace(ct, geometry=replace(ct.geometry, affine=tilted))
    root = tmp_path_factory.mktemp("chest_series")
    out = {}
    for n, (name, volume) in enumerate((("axial", ct), ("oblique", oblique))):
        folder = write_dicom_series(volume, root / name, series_uid=f"1.2.826.0.1.3680043.8.498.7{n}")
        out[name] = complete_dicom_headers(folder, frame_of_reference_uid=f"1.2.826.0.1.3680043.8.498.8{n}")
    return out


def commit_from_source(
    store,
    source: Path,
    labels: np.ndarray,
    *,
    names: dict[int, str] | None = None,
    instances: list[dict] | None = None,
    keep_image: bool = True,
    **attrs,
) -> str:
    """Commit a case as the engine would (manifest, signature, geometry, lineage), ``labels`` as its mask."""
    from medsam_engine.pipeline.io.discover import content_hash
    from medsam_engine.pipeline.io.readers import read_volume

    volume = read_volume(source)
    assert labels.shape == volume.shape
    digest = content_hash(source)
    case_id = store.case_id("sha256:" + digest)
    store.write_manifest(case_id, {"case_id": case_id, "image": str(source), "kind": "test"})
    values = [int(v) for v in np.unique(labels) if v != 0]
    records = (
        instances
        if instances is not None
        else [
            {
                "label": v,
                "instance": 1,
                "prompt_source": "coarse-mask",
                "predicted_iou": 0.9,
                "stage": "auto",
                "round": 1,
                "model": "lite_medsam",
                "reviewer": None,
                "edit_voxels": None,
            }
            for v in values
        ]
    )
    signature = {
        "input_sha256": digest,
        "model_sha256": "0" * 64,
        "config_hash": "test",
        "package_version": "0.1.0",
    }
    store.commit_case(
        case_id,
        labels=labels.astype(np.uint16),
        image=volume.array if keep_image else None,
        label_names=names,
        attrs={
            "case_id": case_id,
            "geometry": volume.geometry.to_json(),
            "modality": volume.modality,
            "signature": signature,
            "instances": records,
            "committed_at": "2024-01-01T00:00:00Z",
            **attrs,
        },
    )
    return case_id


# --- DICOM series, archives and malformed inputs (discovery and readers) ---------------------------------


def write_ct_series(
    volume,
    folder: Path,
    *,
    series_uid: str,
    affine_lps=None,
    syntax=None,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    sop_class=None,
    slices=None,
    spacing_between_slices=None,
    prefix: str = "IM",
) -> list[Path]:
    """Write a canonical (z, y, x) CT Volume as one file per slice; optional oblique affine, compression.

    ``affine_lps`` maps (z, y, x, 1) to LPS mm (default: the volume's own geometry). ``slices`` picks which z
    to write (to make gaps). Files get shuffled numbers and reversed InstanceNumbers.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.geometry.affine if affine_lps is None else affine_lps
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 2] / spacing[2], lps[:3, 1] / spacing[1]
    chosen = list(range(volume.shape[0]) if slices is None else slices)
    order = np.random.default_rng(1).permutation(len(chosen))
    uid_root = series_uid + ".9."
    written = []
    for n, z in enumerate(chosen):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class or CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{uid_root}{z + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, series_uid + ".0"
        ds.PatientName, ds.PatientID, ds.ImageType = "Doe^Jane", "PID-123", list(image_type)
        ds.InstanceNumber = int(volume.shape[0] - z)
        ds.ImagePositionPatient = [float(v) for v in (lps @ [z, 0, 0, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        if spacing_between_slices is not None:
            ds.SpacingBetweenSlices = float(spacing_between_slices)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
        ds.PixelData = (np.asarray(volume.array[z]) + 1024).astype(np.int16).tobytes()
        if syntax is not None:
            ds.compress(syntax)
        path = folder / f"{prefix}{order[n]:04d}"
        ds.save_as(str(path), enforce_file_format=True)
        written.append(path)
    return written


@pytest.fixture(scope="session")
def chest_volume(small_chest):
    """The four real chest CT slices as a canonical Volume (HU)."""
    from medsam_engine.pipeline.io.readers import read_volume

    return read_volume(small_chest[0])


@pytest.fixture(scope="session")
def multi_series_folder(tmp_path_factory, chest_volume) -> Path:
    """One folder holding two real CT series (one RLE-compressed), a localizer, a derived secondary capture
    and clutter (a README and a DICOMDIR-like non-image file)."""
    import pydicom
    from pydicom.uid import RLELossless, SecondaryCaptureImageStorage

    folder = tmp_path_factory.mktemp("multi") / "study"
    write_ct_series(chest_volume, folder / "a", series_uid="1.2.826.0.1.3680043.8.498.7001")
    write_ct_series(
        chest_volume, folder / "b", series_uid="1.2.826.0.1.3680043.8.498.7002", syntax=RLELossless
    )
    write_ct_series(
        chest_volume,
        folder / "a",
        series_uid="1.2.826.0.1.3680043.8.498.7003",
        slices=[1],
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        prefix="LOC",
    )
    write_ct_series(
        chest_volume,
        folder / "b",
        series_uid="1.2.826.0.1.3680043.8.498.7004",
        slices=[2],
        image_type=("DERIVED", "SECONDARY"),
        sop_class=SecondaryCaptureImageStorage,
        prefix="SC",
    )
    (folder / "README.txt").write_text("exported by a scanner\n")
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory (DICOMDIR)
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.7999"
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    directory = pydicom.Dataset()
    directory.file_meta = meta
    directory.save_as(str(folder / "DICOMDIR"), enforce_file_format=True)
    return folder


# --- the distributed engine (issue 8): one 2-node Ray cluster and a small lungs-only archive ---------------
@pytest.fixture(scope="session")
def ray_cluster():
    """A real 2-node Ray cluster (ray.cluster_utils.Cluster, 1 CPU per node) that this process is connected
    to; subprocesses join it through ``ray_cluster.address``."""
    import ray
    from ray.cluster_utils import Cluster

    store_bytes = 128 * 1024 * 1024
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": store_bytes, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, object_store_memory=store_bytes)
    ray.init(address=cluster.address, namespace="medsam-engine", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def release_warm_actors() -> None:
    """Free the cluster's CPUs held by this process's warm actors (the flow tests keep them between runs), for
    another driver's actors or a run with other settings."""
    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.distributed.ray_pool import (
        PoolOptions,
        cluster_nodes,
        plan_actors,
        release_annotators,
    )

    release_annotators(plan_actors(cluster_nodes(), PoolOptions()), EngineConfig().model_dump_json())


def lungs_only(labels: np.ndarray) -> np.ndarray:
    """The 4-slice chest label map (x, y, z) with only the lungs (5 right, 6 left) on the middle two slices:
    two compact targets, two slices for the model (the flow tests run it many times)."""
    out = np.where(np.isin(labels, (5, 6)), labels, 0).astype(labels.dtype)
    out[..., [0, -1]] = 0
    return out


@pytest.fixture(scope="session")
def flow_archive(tmp_path_factory, small_chest, small_chest_nifti) -> tuple[Path, Path]:
    """images/ with two real chest CT cases (NRRD and NIfTI, 4 slices each) and masks/ with their lung labels
    (matched by file stem)."""
    import shutil

    import nibabel as nib
    import nrrd

    root = tmp_path_factory.mktemp("flow_archive")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    shutil.copy(small_chest[0], images / "chest_a.nrrd")
    shutil.copy(small_chest_nifti[0], images / "chest_b.nii.gz")
    data, header = nrrd.read(str(small_chest[1]))
    nrrd.write(str(masks / "chest_a.nrrd"), lungs_only(data), header)
    image = nib.load(str(small_chest_nifti[1]))
    nib.save(
        nib.Nifti1Image(lungs_only(np.asarray(image.dataobj)), image.affine, image.header),
        str(masks / "chest_b.nii.gz"),
    )
    return images, masks


os.environ.setdefault("DO_NOT_TRACK", "1")  # no Prefect client telemetry from the test suite


@pytest.fixture(scope="session")
def exported_graphs(tmp_path_factory, runner) -> Path:
    """A cache root whose ``onnx/`` holds the official checkpoint's ONNX Runtime graphs, exported and
    parity-checked once for the test run (never in the user's cache). Copies keep the modification times
    (``shutil.copytree``), so their manifest vouches for them without hashing: a cache hit."""
    pytest.importorskip("onnxruntime")
    from medsam_engine.pipeline.model.build import load_graphs

    root = tmp_path_factory.mktemp("exported_graphs")
    load_graphs(runner.model, "onnxruntime", cache_root=root)
    return root


@pytest.fixture()
def seeded_graph_cache(exported_graphs, tmp_path, monkeypatch) -> Path:
    """This test's own graph cache (``$MEDSAM_ENGINE_CACHE``), holding a copy of the exported graphs."""
    import shutil

    root = tmp_path / "graph-cache"
    shutil.copytree(exported_graphs / "onnx", root / "onnx")
    monkeypatch.setenv("MEDSAM_ENGINE_CACHE", str(root))
    return root
