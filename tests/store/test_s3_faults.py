"""S3 faults under real runs: a fault-injecting proxy (tests/faults.py) between the engine and a real local S3
server (moto) answers 503 SlowDown, drops connections, or fails every write of mask chunks for a while.
Bursts cost retries, not cases; a lasting outage fails the cases it hits at stage "io" (never quarantined) or,
when not even the failure can be recorded, ends the run with exit 1 and a reason; nothing half-written is
taken as done, and a rerun after the outage commits masks identical to a run that never met a fault."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import use_s3
from faults import FaultProxy

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture
def proxied_s3(s3_endpoint, monkeypatch, quick_case_retries):
    """The S3 API reached through a fault proxy, with fewer SDK retries and the engine's retries of a case
    10 ms apart, so that outages show quickly."""
    import s3fs

    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_RETRY_MODE", "standard")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retries on top of the SDK's
        use_s3(monkeypatch, proxy.url, "faults")
        yield proxy


def _lasting(monkeypatch) -> None:
    """A lasting outage: the SDK tries each request once (its retry, up to a second of backoff per request,
    would only put off the failure the test is about)."""
    import s3fs

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()


def _annotate(two_tiles, url: str, box_fill) -> int:
    argv = ["annotate", str(two_tiles[0]), "--coarse-mask", str(two_tiles[1]), "--out", url]
    return main([*argv, "--config", str(box_fill)])  # as the box-fill tiles_reference was made


def _same_as_reference(url: str, reference: dict) -> None:
    s = CaseStore(url)
    assert sorted(s.committed_cases()) == sorted(reference)
    for case_id, labels in reference.items():
        assert np.array_equal(s.read_labels(case_id)[0], labels)
    assert not s.fs.exists(f"{s.root}/_previous")


def test_slowdown_bursts_and_dropped_connections_cost_retries_not_cases(
    two_tiles, tiles_reference, box_fill, proxied_s3, capsys
):
    proxied_s3.inject(4, method="PUT", status=503, headers={"Retry-After": "0"})
    proxied_s3.inject(2, method="GET", drop=True)
    url = "s3://faults/bursts"
    assert _annotate(two_tiles, url, box_fill) == 0
    assert proxied_s3.injected() == 6
    assert "2 done, 0 skipped, 0 failed" in capsys.readouterr().out
    _same_as_reference(url, tiles_reference)


@pytest.mark.slow
def test_an_outage_mid_commit_fails_the_cases_for_the_next_run(
    two_tiles, tiles_reference, box_fill, proxied_s3, capsys, monkeypatch
):
    _lasting(monkeypatch)
    url = "s3://faults/mid-commit"
    proxied_s3.inject(-1, method="PUT", path_part="/labels/medsam/0/c/", status=503)  # mask chunks refused
    assert _annotate(two_tiles, url, box_fill) == 1
    out = capsys.readouterr().out
    assert "0 done, 0 skipped, 2 failed" in out
    s = CaseStore(url)
    assert s.committed_cases() == []  # groups with their chunks missing are not cases
    errors = s.errors()
    assert len(errors) == 2
    assert {e["stage"] for e in errors.values()} == {"io"}
    assert not s.fs.exists(f"{s.root}/_quarantine")  # the store's fault, not the input's
    proxied_s3.heal()
    assert _annotate(two_tiles, url, box_fill) == 0
    assert "2 done" in capsys.readouterr().out
    _same_as_reference(url, tiles_reference)
    assert s.errors() == {}


def test_a_vanished_store_ends_the_run_with_a_reason(
    two_tiles, tiles_reference, box_fill, proxied_s3, capsys, monkeypatch
):
    _lasting(monkeypatch)
    url = "s3://faults/vanished"
    proxied_s3.inject(-1, status=503)  # every request: the S3 service is down
    assert _annotate(two_tiles, url, box_fill) == 1
    err = capsys.readouterr().err
    assert "cannot be written" in err
    assert "s3://faults/vanished" in err
    assert "Traceback" not in err
    proxied_s3.heal()
    assert _annotate(two_tiles, url, box_fill) == 0
    _same_as_reference(url, tiles_reference)
