"""A night annotates every study that has new marks: the nightly round (Prefect flow over the session's real
2-node Ray cluster) with ``marks: pacs`` takes from a real Orthanc the studies that hold GSPS/SR marks and
that the watermark has not seen as they are, and annotates them from their marks (the box-fill runner in the
model's place). No UID or mark text reaches the flow's logs or the Ray workers' logs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import complete_dicom_headers, release_warm_actors, write_ct_series
from marks_making import write_gsps
from orthanc import MISSING, ORTHANC, PASSWORD, PLUGIN, USER, running_orthanc

from medsam_engine.detectors.evaluation import recist_axes
from medsam_engine.pipeline.annotate.config import load_config
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.io.dicomweb import stow
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore

pytestmark = pytest.mark.skipif(ORTHANC is None or PLUGIN is None, reason=MISSING)

UID = "1.2.826.0.1.3680043.8.498.77"
STUDIES = (f"{UID}00", f"{UID}10")
SERIES = (f"{UID}01", f"{UID}11")
MARK_TEXT = "Doe^Jane node 4"
RIGHT_LUNG, LEFT_LUNG = 5, 6


def _cross(root: Path, name: str, images: list, labels: np.ndarray, spacing) -> Path:
    """A GSPS with a RECIST cross on the left lung's largest slice and a text on it."""
    z = int(np.argmax((labels == LEFT_LUNG).sum(axis=(1, 2))))
    long, short = recist_axes(labels[z] == LEFT_LUNG, spacing[1:])
    objects = [("POLYLINE", long, None), ("POLYLINE", short, None)]
    path = write_gsps(root / name, images, [{"image": images[z], "layer": "RECIST", "objects": objects}])
    state = pydicom.dcmread(path)
    state.ContentDescription = MARK_TEXT
    state.save_as(path)
    return path


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, chest_volume, small_chest):
    """Orthanc with two real chest CT studies; the first has a GSPS cross, the second none yet."""
    root = tmp_path_factory.mktemp("nightly_marks")
    labels = align_to(read_volume(small_chest[1]), chest_volume, what="reference")
    with running_orthanc(root) as url, pytest.MonkeyPatch.context() as env:
        env.setenv("MEDSAM_ENGINE_DICOMWEB_USER", USER)
        env.setenv("MEDSAM_ENGINE_DICOMWEB_PASSWORD", PASSWORD)
        images = {}
        for study, series in zip(STUDIES, SERIES, strict=True):
            write_ct_series(chest_volume, root / series, series_uid=series)
            complete_dicom_headers(root / series, frame_of_reference_uid=series + ".9")
            files, by_slice = sorted((root / series).iterdir()), {}
            for path in files:
                ds = pydicom.dcmread(path)
                ds.StudyInstanceUID, ds.PatientName = study, "Doe^Jane"
                ds.save_as(path, enforce_file_format=True)
                by_slice[int(str(ds.SOPInstanceUID).rpartition(".")[2]) - 1] = ds  # written as z + 1
            images[study] = [by_slice[z] for z in sorted(by_slice)]
            stow(f"{url}/dicom-web", files)
        stow(f"{url}/dicom-web", [_cross(root, "a.dcm", images[STUDIES[0]], labels, chest_volume.spacing)])
        yield {"url": url, "root": f"{url}/dicom-web", "images": images, "labels": labels, "folder": root}


@pytest.fixture
def nights(pacs, prefect_server, ray_cluster, tmp_path, box_fill, monkeypatch):
    """A new store and its nightly round over the PACS (marks: pacs, the box-fill runner, the session's Ray):
    ``(store, night)``, ``night()`` running one round and returning its record."""
    from medsam_engine.flows.annotate import RunOptions
    from medsam_engine.flows.round import flywheel_round
    from medsam_engine.pipeline.distributed.ray_pool import PoolOptions

    release_warm_actors()
    secrets = tmp_path / "dicomweb.yaml"  # the actors fetch marks and series themselves, with this login
    secrets.write_text(f"{pacs['url']}:\n  user: {USER}\n  password: {PASSWORD}\n")
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_CREDENTIALS", str(secrets))
    config = load_config(box_fill).with_overrides(prompts={"detector": "marks", "options": {"marks": "pacs"}})
    run = RunOptions(config=config, watermark="nightly", settle_seconds=0)
    store = CaseStore(tmp_path / "store")

    def night() -> dict:
        return flywheel_round(
            inputs=[pacs["root"]],
            store=str(store.root),
            run=run,
            pool=PoolOptions(address=ray_cluster.address),
        )

    return store, night


def _run_logs(run_id: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


@pytest.mark.slow
def test_a_night_annotates_every_study_that_has_new_marks(nights, pacs, ray_cluster, chest_volume):
    store, night = nights
    first = night()  # the study with marks; the other has none yet and is not taken
    assert first["cases"]["annotated"] == 1
    assert first["cases"]["failed"] == 0
    (case_id,) = store.committed_cases()
    assert store.manifest(case_id)["dicom"]["series_uid"] == SERIES[0]
    assert night()["cases"]["given"] == 0  # nothing new

    other = pacs["images"][STUDIES[1]]
    stow(pacs["root"], [_cross(pacs["folder"], "b.dcm", other, pacs["labels"], chest_volume.spacing)])
    third = night()  # the study with a new mark, alone
    assert third["cases"]["annotated"] == 1
    assert third["cases"]["given"] == 1
    new = (set(store.committed_cases()) - {case_id}).pop()
    _, attrs = store.read_labels(new)
    assert attrs.instances[0]["prompt_origin"]["rule"] == "long+short axis"

    logs = "".join(_run_logs(report["run"]["run_id"]) for report in (first, third))
    workers = Path(ray_cluster.head_node.get_logs_dir_path())
    assert list(workers.glob("worker-*"))
    logs += "".join(p.read_text(errors="replace") for p in workers.glob("worker-*") if p.is_file())
    assert "marks" in logs or "round" in logs  # the flow's logs were read
    for secret in (*STUDIES, *SERIES, "Doe^Jane", MARK_TEXT):
        assert secret not in logs


def test_a_night_adds_the_findings_reviewers_marked_in_a_reviewed_case(nights, pacs, tmp_path, chest_volume):
    """A reviewer accepts the night's mask of study A (the left lung, from its cross), then marks the right
    lung there: the next night keeps what was accepted, adds the right lung and finds the first cross to be
    the instance it made."""
    from medsam_engine.pipeline.flywheel.review import import_corrections

    store, night = nights
    night()
    (case_id,) = [c for c in store.committed_cases() if store.manifest(c)["dicom"]["study_uid"] == STUDIES[0]]
    accepted, before = store.read_labels(case_id)
    ijk = np.moveaxis(accepted, (0, 1, 2), (2, 1, 0)).astype(np.int16)
    correction = tmp_path / f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(ijk, before.geometry.affine[:, [2, 1, 0, 3]]), str(correction))
    assert list(import_corrections(store, [correction], reviewer="dr a").imported) == [case_id]

    images, missed = pacs["images"][STUDIES[0]], pacs["labels"] == RIGHT_LUNG
    z = int(np.argmax(missed.sum(axis=(1, 2))))
    long, short = recist_axes(missed[z], chest_volume.spacing[1:])
    cross = [
        {
            "image": images[z],
            "layer": "RECIST",
            "objects": [("POLYLINE", long, None), ("POLYLINE", short, None)],
        }
    ]
    stow(pacs["root"], [write_gsps(tmp_path / "right.dcm", images, cross)])
    second = night()
    marks = second["marks"]
    assert marks["added"] == 1
    assert marks["cases_amended"] == 1
    assert not marks["failed"]
    assert marks["cases"][case_id]["covered"][0]["label"] == before.instances[0]["label"]  # the first cross
    labels, attrs = store.read_labels(case_id)
    (new,) = [i for i in attrs.instances if i["round"] == second["round"]]
    assert np.array_equal(labels[accepted > 0], accepted[accepted > 0])  # what was accepted, as it was
    assert (labels[accepted == 0] == new["label"]).any()
    assert (new["label"], new["instance"]) == (before.instances[0]["label"], 2)  # the same layer's label
    assert attrs.review_status == "review"
    assert new["prompt_origin"]["key_slice"] == z
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the run's logs reach the server in batches
    logs = _run_logs(second["run"]["run_id"])
    assert "marks: 1 instance(s) added to 1 reviewed case(s)" in logs
    for secret in (*STUDIES, *SERIES, "Doe^Jane", MARK_TEXT):
        assert secret not in logs
