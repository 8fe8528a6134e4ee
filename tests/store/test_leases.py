"""Per-case leases on a local store and on a real local S3 server: one holder at a time, renewal, expiry, and
immediate takeover from a killed holder on the same machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import use_s3

from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.leases import acquire, holder, leased, read_lease


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return CaseStore(tmp_path / "store")
    bucket = use_s3(monkeypatch, request.getfixturevalue("s3_endpoint"), "leases")
    return CaseStore(f"{bucket}/{tmp_path.name}")


def test_one_holder_at_a_time_and_release(store):
    first = acquire(store, "case-a", run_id="run-1", ttl_s=60)
    assert first is not None
    assert acquire(store, "case-a", run_id="run-2", ttl_s=60) is None
    assert holder(store, "case-a")["run_id"] == "run-1"
    assert acquire(store, "case-b", run_id="run-2", ttl_s=60) is not None  # other cases are free
    first.release()
    assert holder(store, "case-a") is None
    assert acquire(store, "case-a", run_id="run-2", ttl_s=60) is not None


def test_an_expired_lease_is_taken_over_and_its_old_holder_learns_it(store):
    old = acquire(store, "case-a", run_id="run-1", ttl_s=60)
    record, _ = read_lease(store, "case-a")
    record["expires_at"] = time.time() - 1  # the holder stopped renewing a while ago
    store.fs.pipe_file(old.path, json.dumps(record).encode())
    new = acquire(store, "case-a", run_id="run-2", ttl_s=60)
    assert new is not None
    assert holder(store, "case-a")["run_id"] == "run-2"
    assert not old.renew()
    assert old.lost
    old.release()  # releasing a lost lease leaves the new holder's alone
    assert holder(store, "case-a")["run_id"] == "run-2"


def test_renewal_keeps_a_long_case_leased_beyond_its_ttl(store):
    with leased(store, "case-a", run_id="run-1", ttl_s=1.5) as lease:
        assert lease is not None
        time.sleep(3.5)  # more than twice the TTL: the background renewals keep it
        assert acquire(store, "case-a", run_id="run-2", ttl_s=1.5) is None
        assert not lease.lost
    assert holder(store, "case-a") is None  # given back at the end of the block


def _race(store, case_id: str, runs: int) -> list[str]:
    """``runs`` threads released together, each trying to take the case's lease; the names of the winners."""
    won: list[str] = []
    barrier = threading.Barrier(runs)

    def claim(name: str) -> None:
        barrier.wait()
        if acquire(store, case_id, run_id=name, ttl_s=60) is not None:
            won.append(name)

    threads = [threading.Thread(target=claim, args=(f"run-{i}",)) for i in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_racing_runs_get_exactly_one_lease(store):
    won = _race(store, "contended", 6)
    assert len(won) == 1
    assert holder(store, "contended")["run_id"] == won[0]


def test_racing_takeovers_of_one_stale_lease_have_one_winner(store):
    acquire(store, "stale", run_id="dead", ttl_s=60)
    record, _ = read_lease(store, "stale")
    store.fs.pipe_file(
        str(store.root / "_leases" / "stale.json"), json.dumps(dict(record, expires_at=0)).encode()
    )
    won = _race(store, "stale", 4)
    assert len(won) == 1
    assert holder(store, "stale")["run_id"] == won[0]


def test_a_killed_holder_on_this_machine_frees_its_cases_at_once(tmp_path):
    store = CaseStore(tmp_path / "store")
    code = (
        "import sys, time; from medsam_engine.pipeline.store.case_store import CaseStore; "
        "from medsam_engine.pipeline.store.leases import acquire; "
        "acquire(CaseStore(sys.argv[1]), 'case-a', run_id='killed', ttl_s=3600); "
        "print('held', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(store.root)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    assert acquire(store, "case-a", run_id="mine", ttl_s=60) is None  # alive: its lease holds
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    lease = acquire(store, "case-a", run_id="mine", ttl_s=60)  # an hour of TTL left, yet taken over now
    assert lease is not None
    assert holder(store, "case-a")["run_id"] == "mine"
