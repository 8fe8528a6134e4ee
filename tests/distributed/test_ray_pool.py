"""The Ray pool on its own: sizing from the cluster, token auth, and the driver loop against actors that
die."""

from __future__ import annotations

import os

import pytest

from medsam_engine.pipeline.core.outcome import CaseOutcome
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.distributed.ray_pool import NodeResources, PoolOptions, plan_actors
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.mark.parametrize(
    "nodes, options, expected",
    [
        ([NodeResources(2)], {}, (1, 2, 0.0, 2, 2)),  # a laptop: one 2-thread actor
        ([NodeResources(1), NodeResources(1)], {}, (2, 1, 0.0, 1, 2)),  # an actor never spans nodes
        ([NodeResources(16)], {}, (4, 4, 0.0, 4, 2)),  # more CPUs: more actors
        ([NodeResources(16)], {"cpus_per_actor": 2, "actors": 3}, (3, 2, 0.0, 2, 2)),
        ([NodeResources(64, 8)], {}, (16, 4, 0.5, 4, 4)),  # 8 CPUs per GPU: two actors each
        ([NodeResources(16, 1)], {}, (4, 4, 0.25, 4, 4)),  # one GPU, 16 CPUs: four processes feed it
        (
            [NodeResources(16, 1)],
            {"gpus_per_actor": 1},
            (1, 16, 1.0, 4, 16),
        ),  # one actor with the whole GPU, asked
        ([NodeResources(8, 4)], {}, (4, 2, 1.0, 2, 2)),  # 2 CPUs per GPU: one actor per GPU
        (
            [NodeResources(24, 2), NodeResources(8)],
            {},
            (6, 4, 1 / 3, 4, 4),
        ),  # 12 CPUs per GPU: three actors each
        ([NodeResources(64, 8)], {"gpus_per_actor": 0.5}, (16, 4, 0.5, 4, 4)),  # two actors share a GPU
        (
            [NodeResources(64, 8), NodeResources(8)],
            {"gpus_per_actor": 0},
            (18, 4, 0.0, 4, 2),
        ),  # CPU only by choice
        ([NodeResources(2)], {"actors": 5}, (1, 2, 0.0, 2, 2)),  # what does not fit is not made
    ],
)
def test_plan_actors_sizes_the_pool_from_the_cluster(nodes, options, expected):
    """(actors, CPUs, GPUs, torch threads, cases in flight) per actor."""
    plan = plan_actors(nodes, PoolOptions(**options))
    assert (plan.count, plan.num_cpus, plan.num_gpus, plan.threads, plan.case_workers) == expected


def test_the_config_sets_the_cases_in_flight_per_actor():
    assert plan_actors([NodeResources(2)], PoolOptions(), case_workers=5).case_workers == 5


def test_plan_actors_refuses_a_cluster_without_cpus():
    with pytest.raises(ValueError, match="no node with a CPU"):
        plan_actors([NodeResources(0, 1)], PoolOptions())


def test_a_case_that_kills_two_workers_is_failed_and_quarantined_and_the_others_are_done(
    ray_cluster, tmp_path
):
    import ray

    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.distributed.ray_pool import Job, drive
    from medsam_engine.pipeline.store.records import quarantined

    class Fragile:  # defined here so that Ray ships it by value
        def annotate_and_commit(self, case, store_url, run_id, **_):
            if case.case_id == "poison":
                os._exit(1)  # as a segfault or the OOM killer would
            return CaseOutcome(case.case_id, "done").record()

    def fresh_actor(lost=None):
        return ray.remote(Fragile).options(num_cpus=0, max_restarts=0).remote()

    cases = [CaseRef(name, str(tmp_path / f"{name}.nii")) for name in ("a", "poison", "b")]
    job = Job(str(tmp_path / "store"), "run-1", EngineConfig())
    outcomes = {o["case_id"]: o for o in drive(cases, fresh_actor, job, in_flight=2)}

    assert {k: (o["status"], o["stage"]) for k, o in outcomes.items()} == {
        "a": ("done", ""),
        "b": ("done", ""),
        "poison": ("failed", "worker"),
    }
    store = CaseStore(tmp_path / "store")
    assert store.errors()["poison"]["stage"] == "worker"
    assert quarantined(store, "poison")["stage"] == "worker"


def test_a_given_ray_token_turns_on_token_auth_for_an_explicit_address(tmp_path):
    """Checked in a fresh interpreter: Ray's auth mode is process-wide."""
    import subprocess
    import sys

    token = tmp_path / "token"
    token.write_text("0" * 32)
    code = (
        "import os; from medsam_engine.pipeline.distributed.ray_pool import _enable_token_auth; "
        "_enable_token_auth(); "
        "from ray._raylet import AuthenticationMode, get_authentication_mode as mode; "
        "print(os.environ.get('RAY_AUTH_MODE'), mode() == AuthenticationMode.TOKEN)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    given = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "RAY_AUTH_TOKEN_PATH": str(token)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    absent = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert given.split() == ["token", "True"]
    assert absent.split() == ["None", "False"]  # ~/.ray/auth_token alone does not switch it on


def test_a_store_that_cannot_be_written_stops_the_ray_run_with_its_reason(ray_cluster, tmp_path):
    import ray

    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.core.errors import StoreUnavailableError
    from medsam_engine.pipeline.distributed.ray_pool import Job, drive

    class FullDisk:  # raises what the per-case driver raises when the store's disk is full
        def annotate_and_commit(self, case, store_url, run_id, **_):
            if case.case_id != "a":
                raise StoreUnavailableError(
                    f"case {case.case_id} could not be written to the store: no space left on the device"
                )
            return CaseOutcome(case.case_id, "done").record()

    def fresh_actor(lost=None):
        return ray.remote(FullDisk).options(num_cpus=0).remote()

    cases = [CaseRef(name, str(tmp_path / f"{name}.nii")) for name in ("a", "b", "c", "d")]
    job = Job(str(tmp_path / "store"), "run-1", EngineConfig())
    with pytest.raises(StoreUnavailableError, match="no space left"):  # not four "internal" failures
        drive(cases, fresh_actor, job, in_flight=1)


def test_a_cpu_actor_sees_no_gpu(ray_cluster):
    import ray

    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.distributed.ray_pool import Annotator

    probe = ray.remote(Annotator).options(num_cpus=0, num_gpus=0).remote(EngineConfig().model_dump_json(), 1)
    env = ray.get(probe.__ray_call__.remote(lambda self: os.environ.get("CUDA_VISIBLE_DEVICES")))
    assert env == ""
    ray.kill(probe)
