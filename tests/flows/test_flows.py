"""The annotate flow under a real temporary Prefect server, on a real 2-node Ray cluster, on real CT cases.

One flow run (module fixture) is the reference; the other tests rerun, break or kill runs and compare. Those
runs use the network: a kill must land while a case is being worked on, and the network's seconds per case
are that window (box-fill finishes a case in tens of milliseconds). The runs compared with nothing (`round
run`, privacy) use the box-fill runner in its place.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import release_warm_actors

from medsam_engine.pipeline.annotate.run_record import RECORD_KEYS
from medsam_engine.pipeline.store.case_store import CaseStore

pytestmark = pytest.mark.slow  # its module fixture starts Prefect and Ray and runs the engine

REPO = Path(__file__).resolve().parents[2]
WARM = {"keep_actors": True}  # keep the actors' models between the tests of this process


def run_flow(images: Path, masks: Path, store: Path, **options) -> dict:
    from medsam_engine.flows.annotate import RunOptions, RunPolicy, annotate_archive
    from medsam_engine.pipeline.distributed.ray_pool import PoolOptions

    return annotate_archive(
        inputs=[str(images)],
        store=str(store),
        coarse_masks=[str(masks)],
        run=RunOptions(**options.get("run", {})),
        pool=PoolOptions(**{**WARM, **options.get("pool", {})}),
        policy=RunPolicy(**options.get("policy", {})),
    )


def labels_of(store: Path) -> dict[str, np.ndarray]:
    cases = CaseStore(store)
    return {case_id: cases.read_labels(case_id)[0] for case_id in cases.committed_cases()}


def committed_once(store: Path) -> bool:
    """No case was committed twice: nothing was ever moved aside as a previous version."""
    return not (store / "_previous").exists()


def copy_store(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("_runs"))
    return dest


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, flow_archive, prefect_server, ray_cluster) -> dict:
    """The reference run: both cases annotated into a fresh store."""
    store = tmp_path_factory.mktemp("flow") / "store"
    report = run_flow(*flow_archive, store)
    return {"store": store, "report": report, "labels": labels_of(store)}


def _artifacts(key: str, run_id: str) -> list:
    """The artifacts under ``key`` of one flow run (the session's server holds every test's runs)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    only = ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
    )
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=only)


def _table(artifact) -> list[dict]:
    import json

    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_flow_shards_cases_over_both_nodes_and_commits_each(annotated):
    report = annotated["report"]
    assert report["counts"] == {"done": 2, "skipped": 0, "quarantined": 0, "failed": 0}
    assert report["actors"] == 2
    assert report["shards"] == 2
    assert len({case["node"] for case in report["cases"]}) == 2  # one actor on each node
    assert report["slices"] == 4
    assert sorted(annotated["labels"]) == sorted(case["case_id"] for case in report["cases"])
    assert all(
        set(np.unique(labels)) <= {0, 5, 6} and (labels > 0).any() for labels in annotated["labels"].values()
    )
    record = json.loads(
        (CaseStore(annotated["store"]).root / "_runs" / f"{report['run_id']}.json").read_text()
    )
    assert set(RECORD_KEYS) <= set(record)
    assert record["engine"] == "ray"  # the local engine's schema
    assert set(record["label_volumes_ml"]) == set(annotated["labels"])
    (summary,) = _artifacts("annotate-summary", report["run_id"])
    rows = _table(summary)
    assert {row["case"] for row in rows} == set(annotated["labels"])
    assert all(row["labels (mL)"].startswith("5: ") for row in rows)
    (progress,) = _artifacts("annotate-progress", report["run_id"])
    assert float(progress.data) == 100.0
    assert committed_once(annotated["store"])


def test_rerun_does_only_what_is_missing(annotated, flow_archive, tmp_path):
    store = copy_store(annotated["store"], tmp_path / "store")
    lost = sorted(annotated["labels"])[0]
    shutil.rmtree(CaseStore(store).case_path(lost))

    report = run_flow(*flow_archive, store)

    assert report["counts"]["done"] == 1
    assert report["counts"]["skipped"] == 1
    assert [c["case_id"] for c in report["cases"] if c["status"] == "done"] == [lost]
    again = labels_of(store)
    assert all(np.array_equal(again[c], annotated["labels"][c]) for c in annotated["labels"])
    assert committed_once(store)


def test_failures_are_recorded_quarantined_and_fail_the_run_only_above_the_fraction(
    annotated, flow_archive, tmp_path
):
    from medsam_engine.flows.annotate import TooManyFailures
    from medsam_engine.pipeline.store.records import quarantined

    images = Path(shutil.copytree(flow_archive[0], tmp_path / "images"))
    masks = Path(shutil.copytree(flow_archive[1], tmp_path / "masks"))
    (images / "corrupt_study.nii.gz").write_bytes(b"not a NIfTI file" * 64)
    shutil.copy(masks / "chest_b.nii.gz", masks / "corrupt_study.nii.gz")
    store = copy_store(annotated["store"], tmp_path / "store")

    first = run_flow(images, masks, store, policy={"max_failure_fraction": 1.0})
    assert first["counts"] == {"done": 0, "skipped": 2, "quarantined": 0, "failed": 1}
    (bad,) = [c["case_id"] for c in first["cases"] if c["status"] == "failed"]
    assert CaseStore(store).errors()[bad]["stage"] == "read"
    assert quarantined(CaseStore(store), bad)["stage"] == "read"

    second = run_flow(images, masks, store)  # quarantined: not tried again, so the run passes
    assert second["counts"] == {"done": 0, "skipped": 2, "quarantined": 1, "failed": 0}

    with pytest.raises(TooManyFailures) as failed:
        run_flow(images, masks, store, policy={"max_failure_fraction": 0.5, "retry_quarantined": True})
    assert failed.value.report["counts"]["failed"] == 1
    assert failed.value.report["failure_fraction"] == 1.0
    assert "corrupt_study" not in str(failed.value.report)  # no file names in reports or artifacts
    (summary,) = _artifacts("annotate-summary", failed.value.report["run_id"])
    assert "chest" not in str(_table(summary))


def _actor_pid(index: int) -> int:
    import ray

    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.distributed.ray_pool import (
        PoolOptions,
        cluster_nodes,
        get_annotator,
        plan_actors,
    )

    plan = plan_actors(cluster_nodes(), PoolOptions())
    actor = get_annotator(plan, index, EngineConfig().model_dump_json())
    return ray.get(actor.info.options(concurrency_group="control").remote())["pid"]


def _wait_for(condition, timeout_s: float = 300.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _busy(store: Path) -> bool:
    """Some case's model work has begun (its manifest is written) and no case is committed yet."""
    manifests = store / "_manifest"
    return manifests.is_dir() and any(manifests.iterdir()) and not CaseStore(store).committed_cases()


def test_an_actor_killed_mid_run_is_restarted_and_every_case_committed_once(
    annotated, flow_archive, tmp_path
):
    store = tmp_path / "store"
    before = _actor_pid(0)
    killed = []

    def chaos() -> None:
        if _wait_for(lambda: _busy(store)):
            os.kill(before, signal.SIGKILL)
            killed.append(before)

    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    report = run_flow(*flow_archive, store)
    killer.join(timeout=5)

    assert killed
    assert _actor_pid(0) != before  # Ray restarted the actor and retried its cases
    assert report["counts"] == {"done": 2, "skipped": 0, "quarantined": 0, "failed": 0}
    again = labels_of(store)
    assert sorted(again) == sorted(annotated["labels"])
    assert all(np.array_equal(again[c], annotated["labels"][c]) for c in again)
    assert committed_once(store)


def _child_env(ray_cluster) -> dict:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "RAY_ADDRESS": ray_cluster.address}


def test_a_run_killed_mid_way_is_finished_by_the_rerun_with_identical_masks(
    annotated, flow_archive, tmp_path, ray_cluster
):
    store = tmp_path / "store"
    release_warm_actors()
    command = [
        sys.executable,
        "-m",
        "medsam_engine.pipeline.cli.main",
        "annotate",
        str(flow_archive[0]),
        "--out",
        str(store),
        "--coarse-mask",
        str(flow_archive[1]),
        "--engine",
        "ray",
        "--ray-address",
        ray_cluster.address,
    ]
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        run = subprocess.Popen(command, env=_child_env(ray_cluster), cwd=REPO, stdout=out, stderr=out)
    try:
        assert _wait_for(lambda: _busy(store) or run.poll() is not None)
        assert run.poll() is None, log.read_text()[-4000:]
    finally:
        run.kill()  # SIGKILL: the driver dies mid-case; its actors die with it
        run.wait()

    report = run_flow(*flow_archive, store)

    assert report["counts"]["failed"] == 0
    assert report["counts"]["done"] >= 1
    again = labels_of(store)
    assert sorted(again) == sorted(annotated["labels"])
    assert all(np.array_equal(again[c], annotated["labels"][c]) for c in again)
    assert committed_once(store)


def test_watermark_takes_only_studies_new_since_the_last_successful_run(annotated, flow_archive, tmp_path):
    from medsam_engine.flows.watermark import read_mark

    images = Path(shutil.copytree(flow_archive[0], tmp_path / "images"))
    masks = Path(shutil.copytree(flow_archive[1], tmp_path / "masks"))
    store = copy_store(annotated["store"], tmp_path / "store")
    nightly = {"run": {"watermark": "nightly", "settle_seconds": 0}, "policy": {"max_failure_fraction": 1.0}}

    first = run_flow(images, masks, store, **nightly)
    assert first["counts"]["skipped"] == 2
    assert read_mark(CaseStore(store), "nightly") is not None
    time.sleep(0.05)
    (images / "late.nii.gz").write_bytes(b"arrived after the first night" * 32)
    second = run_flow(images, masks, store, **nightly)
    assert [c["status"] for c in second["cases"]] == ["failed"]  # only the new study was looked at
    third = run_flow(images, masks, store, **nightly)
    assert third["cases"] == []


def test_round_run_on_ray_from_the_command_line(
    flow_archive, tmp_path, prefect_server, ray_cluster, box_fill, capsys
):
    from medsam_engine.pipeline.cli.main import main
    from medsam_engine.pipeline.store.records import ROUNDS, read_record

    release_warm_actors()
    store = tmp_path / "store"
    argv = [
        "round",
        "run",
        str(flow_archive[0]),
        "--store",
        str(store),
        "--coarse-mask",
        str(flow_archive[1]),
        "--engine",
        "ray",
        "--ray-address",
        ray_cluster.address,
        "--config",
        str(box_fill),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "round 1:" in out
    assert "2 done" in out
    report = read_record(CaseStore(store), ROUNDS, "round-001.json")
    assert report["cases"]["annotated"] == 2
    assert report["run_id"]
    assert all(
        CaseStore(store).attributes(c).review_status in ("auto-accepted", "review", "rejected")
        for c in CaseStore(store).committed_cases()
    )  # routed
    assert main(argv) == 0  # round 2 with the same model: nothing is stale
    assert read_record(CaseStore(store), ROUNDS, "round-002.json")["cases"]["skipped"] == 2


def test_no_path_or_patient_name_reaches_prefect_or_ray(
    small_chest_dicom, small_chest, tmp_path, prefect_server, ray_cluster, box_fill, capsys
):
    """`annotate --engine ray` on a DICOM folder named like a patient: the flow run is given an opaque id of
    a run request kept in the store; the name is nowhere in Prefect's database or Ray's session logs."""
    import ray
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    from medsam_engine.pipeline.cli.main import main

    release_warm_actors()
    patient = "DOE^JANE_MRN_QX47"
    series = Path(shutil.copytree(small_chest_dicom, tmp_path / patient))
    mask = Path(shutil.copy(small_chest[1], tmp_path / f"{patient}_lungs.nrrd"))
    store = tmp_path / "store"
    argv = ["annotate", str(series), "--coarse-mask", str(mask), "--out", str(store), "--engine", "ray"]
    assert main([*argv, "--ray-address", ray_cluster.address, "--config", str(box_fill)]) == 0
    out, err = capsys.readouterr()
    assert "1 done" in out
    assert patient not in out + err
    (request,) = (store / "_requests").glob("*.json")
    assert json.loads(request.read_text())["inputs"] == [str(series.resolve())]  # kept in the store only

    database = Path(PREFECT_API_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    stored = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    assert request.stem.encode() in stored  # the flow run's parameter is the request's id
    assert b"DOE^JANE" not in stored
    assert b"QX47" not in stored
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert logs
    assert not [p.name for p in logs if b"DOE^JANE" in p.read_bytes()]
