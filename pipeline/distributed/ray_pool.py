"""Ray actors that hold LiteMedSAM and annotate cases sent to them by path (CaseRef fields in, outcomes out).

* :func:`connect` joins an existing cluster (``address`` or $RAY_ADDRESS, with Ray's token auth when a token
  is given) or starts a local Ray.
* :func:`plan_actors` sizes the pool from the cluster: on GPU nodes one actor per 4 CPUs per GPU, up to 4
  sharing each GPU (:func:`actors_per_gpu`; or per ``gpus_per_actor`` share of one), else CPU actors of up to
  4 threads each; an actor never spans nodes.
* :class:`Annotator` loads the model once (lazily); it runs ``case_workers`` calls at a time (2 on a CPU
  actor; one per reserved CPU on a GPU actor, which takes its GPU share's part of the node's CPUs) so that
  reading (each call in a reader process of its own), prompts, post-processing and the commit of other cases
  overlap the model work on this one, which a lock keeps to one case at a time. Writes are idempotent: a case
  already committed with the same signature is skipped, so a call that Ray retries after the actor was lost is
  harmless.
* :func:`drive` keeps at most ``in_flight`` calls per actor with ``ray.wait`` and survives lost actors: Ray
  restarts an actor and retries its calls (``max_restarts``/``max_task_retries``); when an actor is gone for
  good its cases are retried one at a time on a fresh actor, and a case that kills a worker twice is failed
  and quarantined.

Each case runs through the one per-case driver (pipeline/annotate/driver.py) under the failure policy of
pipeline/annotate/policy.py with quarantine on.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.driver import RunContext, run_case
from medsam_engine.pipeline.annotate.job import MAX_GPU_CASE_WORKERS
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.annotate.policy import FailurePolicy
from medsam_engine.pipeline.annotate.signature import signature_or_none
from medsam_engine.pipeline.core.errors import RunError
from medsam_engine.pipeline.core.outcome import CaseOutcome
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.readers import warm_readers
from medsam_engine.pipeline.model.devices import GPU_SHARE_VARIABLE
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import quarantine

log = logging.getLogger(__name__)

NAMESPACE = "medsam-engine"
MAX_CPU_THREADS = 4  # torch's encoder scales poorly past ~4 threads; more CPUs make more actors instead
CPUS_PER_GPU_ACTOR = 4  # by default a GPU is shared by one actor per this many of its node's CPUs ...
MAX_ACTORS_PER_GPU = 4  # ... and at most this many (each holds a model and a CUDA context)
ACTOR_RESTARTS = 2
TASK_RETRIES = 2
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # volumes travel by path; the object store only carries records


class PoolOptions(BaseModel):
    """Where the actors run and how many; None means "size it from the cluster"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description="Ray cluster address (else $RAY_ADDRESS, else a local Ray)")
    actors: int | None = Field(None, ge=1, description="annotator actors (default: as many as fit)")
    cpus_per_actor: int | None = Field(None, ge=1, description="CPUs (torch threads) per actor")
    gpus_per_actor: float | None = Field(
        None, ge=0, le=8, description="GPU share per actor (None: see actors_per_gpu; 0: CPU only)"
    )
    in_flight: int | None = Field(
        None,
        ge=1,
        le=32,
        description="cases sent ahead to each actor; None: one more than the actor's case workers",
    )
    case_retries: int = Field(2, ge=0, le=10, description="retries of a case after a transient I/O error")
    keep_actors: bool = Field(
        False,
        description="keep the actors and their models for this process's next "
        "run (else they are released when the run ends)",
    )


# -- connecting ---------------------------------------------------------------------------------------------
def _enable_token_auth() -> None:
    """Ray sends its token to an explicit address only with RAY_AUTH_MODE=token; turn that on when a token for
    the cluster was given ($RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH). ~/.ray/auth_token alone does not count:
    Ray writes it for local clusters, and a token-mode driver is refused by a cluster without auth. The mode
    is read into Ray's cached config, which is refreshed here."""
    given = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if "RAY_AUTH_MODE" in os.environ or not given:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import Config
    except ImportError:  # a Ray without token authentication: nothing to refresh
        return
    Config.initialize("")


def connect(address: str | None = None, *, local_cpus: int | None = None) -> str:
    """Join the cluster at ``address`` (else $RAY_ADDRESS) or start a local Ray; returns the GCS address.

    A ``host:port`` address gets Ray's token authentication when a token is given ($RAY_AUTH_TOKEN or
    $RAY_AUTH_TOKEN_PATH; or set RAY_AUTH_MODE=token to use ~/.ray/auth_token). Idempotent within a process.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            if address != "auto" and not address.startswith("ray://"):
                _enable_token_auth()
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            ray.init(
                namespace=NAMESPACE,
                include_dashboard=False,
                num_cpus=local_cpus,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                log_to_driver=False,
            )
    return ray.get_runtime_context().gcs_address


# -- sizing the pool ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeResources:
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class ActorPlan:
    """``count`` actors, each reserving ``num_cpus`` CPUs and ``num_gpus`` GPUs; torch runs ``threads``;
    ``case_workers`` cases are in flight in each actor at once (read, prompted, cleaned and written in
    parallel while its model works on one case at a time)."""

    count: int
    num_cpus: int
    num_gpus: float
    threads: int
    case_workers: int = 2


def cluster_nodes() -> list[NodeResources]:
    import ray

    return [
        NodeResources(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def plan_actors(
    nodes: Iterable[NodeResources], options: PoolOptions, *, case_workers: int | None = None
) -> ActorPlan:
    """How many actors fit and what each reserves (see the module doc). More actors than fit are refused
    with a warning (Ray would leave them pending and their cases would never run). ``case_workers`` (the
    config's ``pipeline.case_workers``) overrides the cases each actor has in flight."""
    plan = _plan(list(nodes), options)
    return dataclasses.replace(plan, case_workers=case_workers) if case_workers else plan


def actors_per_gpu(nodes: list[NodeResources]) -> int:
    """Actors that share each GPU by default: one per :data:`CPUS_PER_GPU_ACTOR` CPUs the GPU nodes have per
    GPU, at most :data:`MAX_ACTORS_PER_GPU`. One process's case workers hold Python's interpreter lock for
    part of every case (measured: bench/gil_share.py, docs/benchmarks.md), which caps what one process can
    hand its GPU whatever its CPUs; several processes per GPU lift that cap, each with its own model and its
    share of the device's memory."""
    per_gpu = min(n.cpus / n.gpus for n in nodes if n.gpus > 0)
    return max(1, min(MAX_ACTORS_PER_GPU, int(per_gpu // CPUS_PER_GPU_ACTOR)))


def _plan(nodes: list[NodeResources], options: PoolOptions) -> ActorPlan:
    nodes = [n for n in nodes if n.cpus >= 1]
    if not nodes:
        raise ValueError("the Ray cluster has no node with a CPU")
    share = options.gpus_per_actor
    if share is None:
        share = 1.0 / actors_per_gpu(nodes) if any(n.gpus > 0 for n in nodes) else 1.0
    if share > 0 and any(n.gpus > 0 for n in nodes):
        # a GPU actor takes its GPU's whole share of the node's CPUs: they read, prompt and write the cases
        # that keep the GPU fed (one case worker per CPU); its own torch threads stay few
        per_node = {i: int(n.gpus / share + 1e-9) for i, n in enumerate(nodes) if n.gpus > 0}
        fair = min(int(nodes[i].cpus) // max(1, k) for i, k in per_node.items())
        cpus = options.cpus_per_actor or max(1, fair)
        slots = sum(min(k, int(nodes[i].cpus) // cpus) for i, k in per_node.items())
        plan = ActorPlan(
            slots, cpus, share, min(MAX_CPU_THREADS, cpus), max(2, min(MAX_GPU_CASE_WORKERS, cpus))
        )
        return _capped(plan, options.actors)
    cpus = options.cpus_per_actor or max(1, min(MAX_CPU_THREADS, int(max(n.cpus for n in nodes))))
    slots = sum(int(n.cpus) // cpus for n in nodes)
    return _capped(ActorPlan(slots, cpus, 0.0, cpus), options.actors)


def _capped(plan: ActorPlan, wanted: int | None) -> ActorPlan:
    if plan.count < 1:
        raise ValueError(f"no node can hold an actor of {plan.num_cpus} CPUs and {plan.num_gpus:g} GPUs")
    if wanted is not None and wanted > plan.count:
        log.warning("%d actors asked for but only %d fit the cluster", wanted, plan.count)
    return dataclasses.replace(plan, count=min(wanted or plan.count, plan.count))


def annotator_name(plan: ActorPlan, index: int, config_json: str) -> str:
    """``annotator-<driver job>-<hash of config and plan>-<index>``: actors belong to the process that made
    them (they die with it, so a killed run leaves no writer behind); a config change never reuses a model."""
    import ray

    key = hashlib.sha256(f"{config_json}|{plan}".encode()).hexdigest()[:12]
    return f"annotator-{ray.get_runtime_context().get_job_id()}-{key}-{index}"


# settings the driver's environment gives the actors, which download DICOMweb series themselves: where the
# credentials file is (a path, never a secret: tokens and passwords stay out of Ray's runtime environments, so
# the nodes need that file or their own MEDSAM_ENGINE_DICOMWEB_TOKEN/_USER/_PASSWORD) and the retry settings
FORWARDED_ENV = (
    "MEDSAM_ENGINE_DICOMWEB_CREDENTIALS",
    "MEDSAM_ENGINE_DICOMWEB_RETRIES",
    "MEDSAM_ENGINE_DICOMWEB_BACKOFF_S",
    "MEDSAM_ENGINE_DICOMWEB_TIMEOUT_S",
    "MEDSAM_ENGINE_CACHE",
)
_actors: dict[str, object] = {}  # this process's actors: a non-detached actor lives while a handle does
_actors_lock = threading.Lock()


def get_annotator(plan: ActorPlan, index: int, config_json: str, *, lost=None):
    """The ``index``-th annotator actor for this config and plan, created on first use and kept by this
    process (a handle found by name would not keep it alive). ``lost``: a handle whose calls failed because
    its actor is gone; unless another caller replaced it already, a new actor takes its place."""
    import ray

    name = annotator_name(plan, index, config_json)
    with _actors_lock:
        current = _actors.get(name)
        if current is not None and (lost is None or current is not lost):
            return current
        if current is not None:
            ray.kill(current)
            _wait_until_gone(name)
        actor_class = ray.remote(max_concurrency=plan.case_workers, concurrency_groups={"control": 1})(
            Annotator
        )
        forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        _actors[name] = actor_class.options(
            name=name,
            namespace=NAMESPACE,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=TASK_RETRIES,
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            runtime_env={"env_vars": forwarded} if forwarded else None,
        ).remote(config_json, plan.threads, plan.case_workers)
        return _actors[name]


def _wait_until_gone(name: str, timeout_s: float = 60.0) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)


def release_annotators(plan: ActorPlan, config_json: str) -> None:
    """End this process's annotator actors for ``plan`` and ``config_json`` (their models are unloaded)."""
    import ray

    for index in range(plan.count):
        name = annotator_name(plan, index, config_json)
        with _actors_lock:
            actor = _actors.pop(name, None)
            if actor is not None:
                ray.kill(actor)
                _wait_until_gone(name)  # the name is free again for this process's next run


# -- the actor -----------------------------------------------------------------------------------------------
class Annotator:
    """Holds one model (loaded on the first case that needs it); torch and CPU runtimes use ``threads``."""

    def __init__(self, config_json: str, threads: int = 1, case_workers: int = 2) -> None:
        import ray

        if not ray.get_runtime_context().get_accelerator_ids().get("GPU"):
            os.environ["CUDA_VISIBLE_DEVICES"] = (
                ""  # a CPU actor on a GPU node must not take the GPU's memory
            )
        else:  # a fraction of a GPU: batches sized by free memory take only this actor's part of it
            share = ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0)
            os.environ[GPU_SHARE_VARIABLE] = f"{min(1.0, share):g}"
        # the CPU runtimes read OMP_NUM_THREADS (pipeline/model/graph_cache.default_threads), and so does
        # torch when a case first needs it (eager torch, an export); a runner on cached graphs never imports
        # torch at all
        os.environ["OMP_NUM_THREADS"] = str(max(1, threads))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(max(1, threads))
        import cv2

        cv2.setNumThreads(
            1
        )  # the actor's case workers are its parallelism: OpenCV's own threads only contend
        self.config = EngineConfig.model_validate_json(config_json)
        self.runner = LazyRunner(self.config)
        self.threads = threads
        self._model_lock = threading.Lock()
        self._stores: dict[str, CaseStore] = {}
        # its reader processes start now, beside the model's load, not in its first cases
        warm_readers(case_workers)
        gc.freeze()  # the actor's imports stay out of the collector's scans (see annotate.job.frozen_heap)

    def _store(self, url: str) -> CaseStore:
        if url not in self._stores:
            self._stores[url] = CaseStore(url)
        return self._stores[url]

    def annotate_and_commit(
        self, case: CaseRef, store_url: str, run_id: str, *, overwrite: bool = False, retries: int = 2
    ) -> dict:
        """Annotate and commit one case through the one per-case driver; returns its outcome record. Never
        raises for a case's failure: it is recorded in STORE/_errors and quarantined unless transient."""
        run = RunContext(
            self._store(store_url),
            self.config,
            self.runner,
            run_id,
            policy=FailurePolicy(retries=retries, quarantine=True),
            overwrite=overwrite,
            model_lock=self._model_lock,
            node=_node,
        )
        return run_case(case, run).record()

    def info(self) -> dict:
        """Process id, node, threads and the runner's counters (served outside the annotate calls)."""
        return {"pid": os.getpid(), "node": _node(), "threads": self.threads, "runner": self.runner.stats()}


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


# -- driving actors ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """What :func:`drive` sends with every case: built once per run, the configuration parsed once
    (``config``; ``config_json`` names the run's actors and reaches them)."""

    store_url: str
    run_id: str
    config: EngineConfig
    overwrite: bool = False
    retries: int = 2

    @property
    def config_json(self) -> str:
        return self.config.model_dump_json()


def drive(
    cases: list[CaseRef],
    actor_factory: Callable[..., object],
    job: Job,
    *,
    in_flight: int = 2,
    on_outcome: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Annotate ``cases`` on the actor from ``actor_factory()``, ``in_flight`` at a time.

    A lost actor is Ray's to restart and retry; when it is gone for good (restarts spent)
    ``actor_factory(lost=handle)`` gives a fresh one, and the cases the lost one held are retried alone; a
    case that kills a second worker fails (stage "worker") and is quarantined. Returns one outcome per case.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    queue, pending, deaths = deque(cases), {}, Counter()
    outcomes: list[dict] = []
    actor = actor_factory()
    while queue or pending:
        while queue and _may_send(queue[0], pending, deaths, in_flight):
            case = queue.popleft()
            ref = actor.annotate_and_commit.remote(
                case, job.store_url, job.run_id, overwrite=job.overwrite, retries=job.retries
            )
            pending[ref] = (case, actor)
        ready, _ = ray.wait(list(pending), num_returns=1)
        case, held_by = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except RayActorError:
            if held_by is actor:  # the first of its calls to fail: replace the actor once
                actor = actor_factory(lost=actor)
            deaths[case.case_id] += 1
            if deaths[case.case_id] < 2:
                log.warning("the worker holding case %s was lost; retrying it alone", case.case_id)
                queue.appendleft(case)
                continue
            result = _worker_failure(case, job)
        except RayTaskError as exc:  # the actor's code itself broke: a bug, recorded against the case
            if isinstance(exc.cause, RunError):  # no usable store or model: every next case would fail alike
                for ref in pending:
                    ray.cancel(ref)
                raise exc.cause from None
            log.error("case %s: %s", case.case_id, type(exc.cause).__name__)
            result = CaseOutcome(case.case_id, "failed", stage="internal").record()
        outcomes.append(result)
        if on_outcome is not None:
            on_outcome(result)
    return outcomes


def _may_send(case: CaseRef, pending: dict, deaths: Counter, in_flight: int) -> bool:
    """Suspects (cases held by a worker that died) go alone; nothing goes with them."""
    if any(deaths[c.case_id] for c, _ in pending.values()):
        return False
    return not pending if deaths[case.case_id] else len(pending) < in_flight


def _worker_failure(case: CaseRef, job: Job) -> dict:
    store = CaseStore(job.store_url)
    reason = "the worker died twice while annotating this case (out of memory or a crash in native code)"
    store.record_error(case.case_id, stage="worker", reason=reason, run_id=job.run_id)
    signature = signature_or_none(case, job.config, LazyRunner(job.config).model_sha256)
    quarantine(store, case.case_id, stage="worker", signature=signature, run_id=job.run_id)
    log.error("case %s failed: %s", case.case_id, reason)
    return CaseOutcome(case.case_id, "failed", stage="worker").record()
