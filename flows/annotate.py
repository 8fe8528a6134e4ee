"""Prefect flow: discover -> skip committed -> shard -> annotate on Ray actors -> summarise.

The flow only wires pipeline steps. Ray actors hold the model (loaded once per actor); shards carry paths,
never arrays; each shard task returns the case ids it committed, so a rerun only does what is missing.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

ACTOR_NAMESPACE = "medsam-engine"


def _ensure_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or os.environ["RAY_ADDRESS"], namespace=ACTOR_NAMESPACE)
        else:
            ray.init(namespace=ACTOR_NAMESPACE, include_dashboard=False,
                     object_store_memory=512 * 1024 * 1024)


def _actor(index: int, actors: int, config_json: str, store_root: str):
    """The index-th of ``actors`` annotator actors for this config and store, created on first use.

    With GPUs in the cluster each actor takes one; otherwise the CPUs are split between the actors.
    """
    import ray

    from pipeline.ray_pool import Annotator

    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    threads = 1 if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, actors))
    key = hashlib.sha256(f"{config_json}|{store_root}".encode()).hexdigest()[:12]
    options = dict(name=f"annotator-{key}-{index}", namespace=ACTOR_NAMESPACE, get_if_exists=True,
                   max_restarts=2, max_task_retries=2, num_cpus=threads, num_gpus=gpus)
    return ray.remote(Annotator).options(**options).remote(config_json, store_root, threads)


@task(cache_policy=NO_CACHE)
def discover_cases(inputs: list[str], store_root: str, coarse_masks: list[str]) -> list[dict]:
    from pipeline.discover import discover
    from pipeline.store import CaseStore

    cases = discover(inputs, CaseStore(store_root), coarse_masks=coarse_masks)
    return [case.__dict__ for case in cases]


@task(cache_policy=NO_CACHE)
def shard_cases(cases: list[dict], shards: int) -> list[list[dict]]:
    """Round-robin cases into at most ``shards`` non-empty shards."""
    groups = [cases[i::max(1, shards)] for i in range(max(1, shards))]
    return [g for g in groups if g]


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def annotate_shard(shard: list[dict], index: int, actors: int, config_json: str, store_root: str,
                   ray_address: str | None) -> list[dict]:
    import ray

    _ensure_ray(ray_address)
    actor = _actor(index % max(1, actors), actors, config_json, store_root)
    return ray.get(actor.annotate.remote(shard))


@flow(name="annotate-archive", log_prints=True)
def annotate_archive(inputs: list[str], out: str, coarse_masks: list[str] | None = None,
                     config_path: str | None = None, shards: int = 2, actors: int = 1,
                     ray_address: str | None = None) -> dict:
    """Annotate every case under ``inputs`` into the store ``out``; returns counts per status."""
    from pipeline.config import load_config

    logger = get_run_logger()
    config_json = load_config(config_path).model_dump_json()
    store_root = str(Path(out).resolve())
    cases = discover_cases(inputs, store_root, list(coarse_masks or []))
    _ensure_ray(ray_address)
    futures = [annotate_shard.submit(shard, i, actors, config_json, store_root, ray_address)
               for i, shard in enumerate(shard_cases(cases, shards))]
    outcomes = [o for f in futures for o in f.result()]
    counts = {s: sum(o["status"] == s for o in outcomes) for s in ("done", "skipped", "failed")}
    create_table_artifact(key="annotate-summary", table=[{k: o[k] for k in ("case_id", "status", "reason")}
                                                          for o in outcomes])
    logger.info("annotate-archive: %s", counts)
    return counts
