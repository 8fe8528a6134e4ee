"""The one failure policy: what is transient, retries, and the stages that are quarantined."""

from __future__ import annotations

import errno

import pytest

from medsam_engine.pipeline.annotate.policy import FailurePolicy, with_retries
from medsam_engine.pipeline.core.errors import ReadError, is_transient


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
        with_retries(
            lambda: (_ for _ in ()).throw(ValueError("a bug")), FailurePolicy(retries=5, retry_delay_s=0)
        )


def test_failures_are_sorted_into_quarantined_and_retried_next_run():
    from medsam_engine.pipeline.annotate.policy import RETRY_NEXT_RUN, failure_of
    from medsam_engine.pipeline.io.isolate import WorkerCrash

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
