"""The data-engine loop as one scheduled system, end to end against real components: a real Orthanc (DICOMweb,
authentication on) holding a real CT study stored by STOW-RS with a coarse SEG from another tool; the
`nightly-round` deployment created from prefect.yaml and run by a real Prefect worker over the session's real
2-node Ray cluster; proposals pushed back as DICOM SEG; a reviewer's corrected SEG (made with highdicom from
the reference) stored in the PACS and pulled by `review import`; `finetune` registers a model; the next night
uses it, keeps the accepted case and re-annotates the stale one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import complete_dicom_headers, release_warm_actors, write_ct_series
from orthanc import MISSING, ORTHANC, PASSWORD, PLUGIN, USER, running_orthanc
from seg_making import reviewer_seg

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.flywheel.registry import current_model
from medsam_engine.pipeline.io.dicomweb import stow
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import ROUNDS, read_record

pytestmark = pytest.mark.skipif(ORTHANC is None or PLUGIN is None, reason=MISSING)

REPO = Path(__file__).resolve().parents[2]
STUDY = "1.2.826.0.1.3680043.8.498.7300"
SERIES = ("1.2.826.0.1.3680043.8.498.7301", "1.2.826.0.1.3680043.8.498.7302")
LUNGS = {5: "Right lung", 6: "Left lung"}


def _dated(path: Path, seconds_from_now: float) -> Path:
    """Date a SEG (ContentDate/ContentTime, UTC) so the test does not depend on the host's time zone."""
    ds = pydicom.dcmread(path)
    moment = time.gmtime(time.time() + seconds_from_now)
    ds.ContentDate, ds.ContentTime = time.strftime("%Y%m%d", moment), time.strftime("%H%M%S", moment)
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, chest_volume, small_chest):
    """Orthanc with one study (two real CT series, one RLE) stored through the engine's STOW-RS, and a coarse
    lungs SEG per series from another tool (an hour old)."""
    from pydicom.uid import RLELossless

    root = tmp_path_factory.mktemp("pacs")
    with running_orthanc(root) as url, pytest.MonkeyPatch.context() as env:
        env.setenv("MEDSAM_ENGINE_DICOMWEB_BACKOFF_S", "0.05")
        env.setenv("MEDSAM_ENGINE_DICOMWEB_USER", USER)
        env.setenv("MEDSAM_ENGINE_DICOMWEB_PASSWORD", PASSWORD)
        folders = {}
        for series, syntax, name in ((SERIES[0], None, "a"), (SERIES[1], RLELossless, "b")):
            files = write_ct_series(chest_volume, root / name, series_uid=series, syntax=syntax)
            complete_dicom_headers(
                root / name, frame_of_reference_uid=STUDY + ".9"
            )  # a scanner's full headers
            for path in files:
                ds = pydicom.dcmread(path)
                ds.StudyInstanceUID = STUDY
                ds.save_as(path, enforce_file_format=True)
            folders[series] = root / name
            reference = align_to(read_volume(small_chest[1]), read_volume(root / name))
            coarse = np.where(np.isin(reference, tuple(LUNGS)), reference, 0).astype(np.uint16)
            reviewer_seg(root / name, coarse, LUNGS, root / f"coarse-{name}.dcm")
            stow(f"{url}/dicom-web", [*files, _dated(root / f"coarse-{name}.dcm", -3600)])
        yield {"url": url, "root": f"{url}/dicom-web", "folders": folders}


def _segs(pacs: dict) -> list[dict]:
    import requests

    return requests.get(
        f"{pacs['root']}/studies/{STUDY}/series",
        params={"Modality": "SEG"},
        auth=(USER, PASSWORD),
        headers={"Accept": "application/dicom+json"},
        timeout=10,
    ).json()


@pytest.mark.slow
def test_nightly_round_from_the_pacs_reviewed_finetuned_and_the_next_night(
    pacs, prefect_server, ray_cluster, tmp_path, small_chest, monkeypatch
):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from medsam_engine.flows.annotate import RunOptions
    from medsam_engine.flows.round import flywheel_round
    from medsam_engine.flows.watermark import read_mark
    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.distributed.ray_pool import PoolOptions

    release_warm_actors()  # the worker's flow run is another driver: it needs the cluster's CPUs
    # the actors download the series themselves: they find the login in a credentials file (its path is
    # forwarded to them; a password in the environment never leaves the driver)
    secrets = tmp_path / "dicomweb.yaml"
    secrets.write_text(f"{pacs['url']}:\n  user: {USER}\n  password: {PASSWORD}\n")
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_CREDENTIALS", str(secrets))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "RAY_ADDRESS": ray_cluster.address}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="medsam-process", type="process"), overwrite=True)
    deploy = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "nightly-round"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    # night 1: a real worker runs the deployment; prompts from the PACS's coarse SEGs, proposals pushed back
    store = tmp_path / "store"
    run = {"watermark": "nightly", "settle_seconds": 0, "push_seg": pacs["root"]}
    parameters = {
        "inputs": [pacs["root"]],
        "store": str(store),
        "coarse_masks": ["from-pacs"],
        "run": run,
        "pool": {"address": ray_cluster.address},
    }
    flow_run = run_deployment("flywheel-round/nightly-round", parameters=parameters, timeout=0)
    worker = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            "medsam-process",
            "--run-once",
            "--limit",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
        deployment = client.read_deployment(flow_run.deployment_id)
    assert finished.state.is_completed(), finished.state
    assert deployment.schedules
    assert deployment.schedules[0].schedule.cron == "0 2 * * *"
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"

    cases = CaseStore(store)
    first = read_record(cases, ROUNDS, "round-001.json")
    assert first["cases"]["annotated"] == 2
    assert first["model"]["registered"] is False
    assert first["push"]["pushed"] == 2
    assert len(_segs(pacs)) == 4  # 2 coarse + 2 proposals
    assert sum(first["routing"]["instances"].values()) > 0
    assert Path(first["queue"]["folder"]).is_dir()
    for case_id in cases.committed_cases():  # the names came with the coarse SEGs
        assert {p.get("name") for p in cases.label_properties(case_id)} == set(LUNGS.values())
    assert read_mark(cases, "nightly") is not None
    mark = read_record(cases, "_watermarks", "nightly.json")
    assert STUDY not in str(mark)
    assert len(mark["pacs"]) == 1  # the study, by keyed hash only

    # the reviewer corrects series a (the reference lungs, dilated by hand) and stores the SEG in the PACS
    by_series = {}
    for case_id in cases.committed_cases():  # downloads go with the commits; the manifest keeps the UIDs
        by_series[cases.manifest(case_id)["dicom"]["series_uid"]] = case_id
    reviewed, stale = by_series[SERIES[0]], by_series[SERIES[1]]
    folder = pacs["folders"][SERIES[0]]
    reference = align_to(read_volume(small_chest[1]), read_volume(folder))
    corrected = np.where(np.isin(reference, tuple(LUNGS)), reference, 0).astype(np.uint16)
    reviewer_seg(folder, corrected, LUNGS, tmp_path / "correction.dcm")
    stow(pacs["root"], [_dated(tmp_path / "correction.dcm", 60)])
    assert main(["review", "import", str(store), pacs["root"], "--reviewer", "dr-a"]) == 0
    assert cases.attributes(reviewed).review_status == "accepted"
    assert cases.attributes(stale).review_status != "accepted"

    checkpoint = tmp_path / "night1.pth"  # one epoch of the decoder: what the next night needs is a new model
    assert (
        main(
            [
                "finetune",
                "--store",
                str(store),
                "--out",
                str(checkpoint),
                "--epochs",
                "1",
                "--lr",
                "2e-4",
                "--boxes-per-epoch",
                "4",
                "--eval-boxes",
                "12",
                "--max-slices",
                "4",
                "--encoder-stages",
                "0",
                "--promote",
                "always",
                "--no-augment",
            ]
        )
        == 0
    )
    tuned = current_model(cases)

    # night 2: the same flow, nothing edited: the new model, the accepted case kept, the stale one redone
    before = cases.attributes(stale).signature
    # in eager torch, which is no part of a case's signature: a graph runtime would first export the new
    # model's graphs (tests/model/test_graph_runtimes.py covers that)
    eager = EngineConfig().with_overrides(model={"backend": "torch"})
    report = flywheel_round(
        inputs=[pacs["root"]],
        store=str(store),
        coarse_masks=["from-pacs"],
        run=RunOptions(**run, config=eager),
        pool=PoolOptions(address=ray_cluster.address),
    )
    assert report["round"] == 2
    assert report["model"]["registered"]
    assert report["model"]["sha256"] == tuned["sha256"]
    assert report["cases"]["kept_accepted"] == 1
    assert report["cases"]["annotated"] == 1
    assert cases.attributes(stale).signature != before
    assert cases.attributes(stale).round == 2
    assert cases.attributes(reviewed).review_status == "accepted"
    assert read_record(cases, "_watermarks", "nightly.json")["model"] == tuned["sha256"]


def test_a_wrong_password_stops_the_night_with_one_clear_error_before_any_case(
    pacs, prefect_server, tmp_path, monkeypatch
):
    from medsam_engine.flows.annotate import RunOptions
    from medsam_engine.flows.round import flywheel_round
    from medsam_engine.pipeline.core.errors import ReadError

    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_PASSWORD", "not-the-password")
    store = tmp_path / "store"
    with pytest.raises(ReadError, match="refused the credentials") as raised:
        flywheel_round(
            inputs=[pacs["root"]],
            store=str(store),
            coarse_masks=["from-pacs"],
            run=RunOptions(watermark="nightly", settle_seconds=0),
        )
    assert "not-the-password" not in str(raised.value)
    assert CaseStore(store).errors() == {}
    assert CaseStore(store).committed_cases() == []
