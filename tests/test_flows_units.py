"""The distributed engine's parts on their own: pool sizing, shards, retries, watermarks, the summary, and the
driver loop against actors that die."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from flows.sharding import balance, estimate_slices
from flows.watermark import Entry, check_name, next_mark, read_mark, select_new, study_entries, write_mark
from pipeline.annotate.policy import FailurePolicy, with_retries
from pipeline.core.errors import ReadError, is_transient
from pipeline.core.outcome import CaseOutcome
from pipeline.core.types import CaseRef
from pipeline.distributed.ray_pool import NodeResources, PoolOptions, plan_actors
from pipeline.store.case_store import CaseStore


@pytest.mark.parametrize("nodes, options, expected", [
    ([NodeResources(2)], {}, (1, 2, 0.0)),                                  # a laptop: one 2-thread actor
    ([NodeResources(1), NodeResources(1)], {}, (2, 1, 0.0)),                # an actor never spans nodes
    ([NodeResources(16)], {}, (4, 4, 0.0)),                                 # more CPUs: more actors
    ([NodeResources(16)], {"cpus_per_actor": 2, "actors": 3}, (3, 2, 0.0)),
    ([NodeResources(64, 8)], {}, (8, 4, 1.0)),                              # one actor per GPU
    ([NodeResources(64, 8)], {"gpus_per_actor": 0.5}, (16, 4, 0.5)),        # two actors share a GPU
    ([NodeResources(64, 8), NodeResources(8)], {"gpus_per_actor": 0}, (18, 4, 0.0)),  # CPU only by choice
    ([NodeResources(2)], {"actors": 5}, (1, 2, 0.0)),                       # what does not fit is not made
])
def test_plan_actors_sizes_the_pool_from_the_cluster(nodes, options, expected):
    plan = plan_actors(nodes, PoolOptions(**options))
    assert (plan.count, plan.num_cpus, plan.num_gpus) == expected
    assert plan.threads == plan.num_cpus


def test_plan_actors_refuses_a_cluster_without_cpus():
    with pytest.raises(ValueError, match="no node with a CPU"):
        plan_actors([NodeResources(0, 1)], PoolOptions())


def test_balance_groups_cases_into_shards_of_near_equal_slices():
    weights = [40, 3, 3, 30, 10, 10]
    groups = balance(weights, 2)
    totals = sorted(sum(weights[i] + 1 for i in group) for group in groups)
    assert totals == [50, 52] and sorted(i for g in groups for i in g) == list(range(6))
    assert balance([5, 5], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="'shards'"):
        balance([1], 0)


def test_slice_counts_come_from_headers(small_chest, small_chest_nifti, small_chest_dicom, nuclei_2d):
    assert estimate_slices(CaseRef("a", str(small_chest[0]), kind="nrrd")) == 4
    assert estimate_slices(CaseRef("b", str(small_chest_nifti[0]), kind="nii.gz")) == 4
    files = tuple(str(p) for p in sorted(small_chest_dicom.iterdir()))
    assert estimate_slices(CaseRef("c", str(small_chest_dicom), kind="dicom-series", files=files)) == 4
    assert estimate_slices(CaseRef("d", str(nuclei_2d[0]), kind="png")) == 1
    assert estimate_slices(CaseRef("e", "gone.nii", kind="unreadable", error="gone")) == 0


def test_only_io_hiccups_are_transient():
    assert is_transient(OSError(errno.EIO, "Input/output error"))
    assert is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError(errno.ENOENT, "No such file"))
    assert not is_transient(ValueError("bad header"))
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except ConnectionResetError as exc:
            raise ReadError("ct.nii: unreadable") from exc
    except ReadError as chained:
        assert is_transient(chained)
    # a reader error that crossed the isolated reader's process boundary keeps only its text
    assert is_transient(ReadError("ct.nii: unreadable .nii (OSError: [Errno 5] Input/output error)"))
    assert not is_transient(ReadError("ct.nii: unreadable .nii (OSError: [Errno 2] No such file)"))


def test_with_retries_repeats_transient_failures_only():
    calls = []

    def flaky() -> dict:
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.ESTALE, "Stale file handle")
        return {"status": "done"}

    assert with_retries(flaky, FailurePolicy(retries=2, retry_delay_s=0)) == {"status": "done"}
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(OSError):
        with_retries(flaky, FailurePolicy(retries=1, retry_delay_s=0))
    with pytest.raises(ValueError):
        with_retries(lambda: (_ for _ in ()).throw(ValueError("a bug")), FailurePolicy(retries=5, retry_delay_s=0))


def test_watermark_selects_settled_studies_changed_since_the_mark(tmp_path):
    inbox = tmp_path / "incoming"
    (inbox / "study1" / "series").mkdir(parents=True)
    (inbox / "study1" / "series" / "IM1").write_bytes(b"x")
    (inbox / "study2.zip").write_bytes(b"x")
    (inbox / ".partial").write_bytes(b"x")
    os.utime(inbox / "study2.zip", (1_000, 1_000))  # an old mtime (rsync -a) does not hide a new arrival
    entries = study_entries([str(inbox), "https://pacs.example/dicomweb/studies/1"])
    assert [os.path.basename(e.path) for e in entries][:2] == ["study1", "study2.zip"]
    assert entries[0].changed >= os.lstat(inbox / "study1" / "series" / "IM1").st_mtime
    assert entries[1].changed > 1_000 and entries[2].changed == float("inf")

    dated = [Entry("old", 50.0), Entry("new", 150.0), Entry("copying", 250.0), Entry("url", float("inf"))]
    assert [e.path for e in select_new(dated, since=100.0, until=200.0)] == ["new", "url"]
    assert [e.path for e in select_new(dated, since=None, until=200.0)] == ["old", "new", "url"]
    assert next_mark(200.0, [Entry("retry me", 150.0)]) < 150.0 and next_mark(200.0, []) == 200.0

    store = CaseStore(tmp_path / "store")
    assert read_mark(store, "nightly") is None
    write_mark(store, "nightly", 123.5, run_id="r1")
    assert read_mark(store, "nightly") == 123.5
    with pytest.raises(ValueError, match="watermark"):
        check_name("Nightly run")


def test_summary_counts_label_volumes_lazily_from_the_store(tmp_path, small_chest):
    import nrrd
    from conftest import commit_from_source

    from flows.summary import label_volumes_ml
    from pipeline.io.readers import read_volume

    store = CaseStore(tmp_path / "store")
    labels = read_volume(small_chest[1]).array.astype(np.uint16)
    case_id = commit_from_source(store, small_chest[0], labels)
    volumes = label_volumes_ml(store, [case_id, "not-committed"])
    directions = nrrd.read_header(str(small_chest[0]))["space directions"]
    voxel_ml = abs(float(np.linalg.det(np.asarray(directions, dtype=float)))) / 1000
    expected = {int(v): (labels == v).sum() * voxel_ml for v in np.unique(labels) if v}
    assert list(volumes) == [case_id]
    assert volumes[case_id] == pytest.approx(expected, rel=1e-3)


def test_a_case_that_kills_two_workers_is_failed_and_quarantined_and_the_others_are_done(ray_cluster,
                                                                                          tmp_path):
    import ray

    from pipeline.annotate.config import EngineConfig
    from pipeline.distributed.ray_pool import Job, drive
    from pipeline.store.records import quarantined

    class Fragile:  # defined here so that Ray ships it by value
        def annotate_case(self, case, store_url, run_id, **_):
            if case["case_id"] == "poison":
                os._exit(1)  # as a segfault or the OOM killer would
            return CaseOutcome(case["case_id"], "done").record()

    def fresh_actor(lost=None):
        return ray.remote(Fragile).options(num_cpus=0, max_restarts=0).remote()

    cases = [{"case_id": name, "image": str(tmp_path / f"{name}.nii")} for name in ("a", "poison", "b")]
    job = Job(str(tmp_path / "store"), "run-1", EngineConfig().model_dump_json())
    outcomes = {o["case_id"]: o for o in drive(cases, fresh_actor, job, in_flight=2)}

    assert {k: (o["status"], o["stage"]) for k, o in outcomes.items()} == {
        "a": ("done", ""), "b": ("done", ""), "poison": ("failed", "worker")}
    store = CaseStore(tmp_path / "store")
    assert store.errors()["poison"]["stage"] == "worker"
    assert quarantined(store, "poison")["stage"] == "worker"


def test_ray_options_need_the_ray_engine(tmp_path, small_chest):
    from pipeline.cli.main import main

    code = main(["annotate", str(small_chest[0]), "--out", str(tmp_path / "s"), "--coarse-mask",
                 str(small_chest[1]), "--actors", "2"])
    assert code == 2


def test_failures_are_sorted_into_quarantined_and_retried_next_run():
    from pipeline.annotate.policy import RETRY_NEXT_RUN, failure_of
    from pipeline.io.isolate import WorkerCrash

    def read_error(why: str) -> ReadError:
        try:
            raise ReadError("ct.dcm: the image decoder crashed") from WorkerCrash(why)
        except ReadError as exc:
            return exc

    assert failure_of(read_error("signal SIGSEGV"))[0] == "read"  # the decoder crashed on this input
    assert failure_of(read_error("signal SIGKILL"))[0] == "killed"  # killed from outside: not the input
    assert failure_of(OSError(errno.EIO, "Input/output error"))[0] == "io"
    assert failure_of(KeyError("a bug")) == ("internal", "KeyError: 'a bug'")
    assert set(RETRY_NEXT_RUN) == {"io", "killed"}


def test_a_given_ray_token_turns_on_token_auth_for_an_explicit_address(tmp_path):
    """Checked in a fresh interpreter: Ray's auth mode is process-wide."""
    import subprocess
    import sys

    token = tmp_path / "token"
    token.write_text("0" * 32)
    code = ("import os; from pipeline.distributed.ray_pool import _enable_token_auth; _enable_token_auth(); "
            "from ray._raylet import AuthenticationMode, get_authentication_mode as mode; "
            "print(os.environ.get('RAY_AUTH_MODE'), mode() == AuthenticationMode.TOKEN)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    given = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_AUTH_TOKEN_PATH": str(token)},
                           capture_output=True, text=True, check=True).stdout
    absent = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True).stdout
    assert given.split() == ["token", "True"]
    assert absent.split() == ["None", "False"]  # ~/.ray/auth_token alone does not switch it on
