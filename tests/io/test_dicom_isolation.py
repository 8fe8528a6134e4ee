"""Decoding runs in an isolated process: a decoder that segfaults, panics or hangs fails only its case.

This module doubles as a pydicom decoder plugin (``is_available``, ``DECODER_DEPENDENCIES`` and the decode
functions below) that the child process installs in place of the real RLE decoders.
"""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.isolate import IsolatedWorker, WorkerCrash
from medsam_engine.pipeline.io.readers import read_case, read_case_here

DECODER_DEPENDENCIES: dict = {}


def is_available(uid) -> bool:
    return True


class FakePanic(BaseException):
    """Stands in for pyo3's PanicException, which derives from BaseException, not Exception."""


def segfault(src, runner):
    os.kill(os.getpid(), signal.SIGSEGV)


def panic(src, runner):
    raise FakePanic("called `Option::unwrap()` on a `None` value")


def hang(src, runner):
    time.sleep(60)


def _replace_rle_decoder(function: str) -> None:
    from pydicom.pixels.decoders import RLELosslessDecoder

    for label in list(RLELosslessDecoder.available_plugins):
        RLELosslessDecoder.remove_plugin(label)
    RLELosslessDecoder.add_plugin(f"test-{function}", (__name__, function))


def install_segfaulting_rle_decoder() -> None:
    _replace_rle_decoder("segfault")


def install_panicking_rle_decoder() -> None:
    _replace_rle_decoder("panic")


def install_hanging_rle_decoder() -> None:
    _replace_rle_decoder("hang")


RLE = CaseRef("rle-case", get_testdata_file("MR_small_RLE.dcm"))
PLAIN = CaseRef("plain-case", get_testdata_file("CT_small.dcm"))


def test_a_segfaulting_decoder_fails_its_case_only():
    worker = IsolatedWorker(initializer=install_segfaulting_rle_decoder)
    try:
        with pytest.raises(ReadError, match=r"MR_small_RLE.dcm: the image decoder crashed \(signal SIGSEGV"):
            read_case(RLE, worker=worker)
        volume = read_case(PLAIN, worker=worker)  # a fresh child takes over
        assert volume.shape == (1, 128, 128)
        with pytest.raises(ReadError, match="SIGSEGV"):  # and it crashes again, still contained
            read_case(RLE, worker=worker)
    finally:
        worker.close()


def test_a_panicking_decoder_is_a_read_error_not_a_crash():
    worker = IsolatedWorker(initializer=install_panicking_rle_decoder)
    try:
        with pytest.raises(ReadError, match=r"could not be decoded .*FakePanic: called `Option::unwrap\(\)`"):
            read_case(RLE, worker=worker)
    finally:
        worker.close()


def test_a_hanging_decoder_is_stopped():
    worker = IsolatedWorker(initializer=install_hanging_rle_decoder)
    try:
        start = time.perf_counter()
        with pytest.raises(ReadError, match=r"took longer than 2 s"):
            read_case(RLE, worker=worker, timeout_s=2)
        assert time.perf_counter() - start < 10
        assert read_case(PLAIN, worker=worker).shape == (1, 128, 128)
    finally:
        worker.close()


def test_isolated_and_in_process_reads_agree():
    case = CaseRef("x", get_testdata_file("emri_small_jpeg_ls_lossless.dcm"))
    isolated, local = read_case(case), read_case(case, isolated=False)
    assert np.array_equal(isolated.array, local.array)
    assert isolated.array.flags.writeable
    assert np.array_equal(isolated.geometry.affine, local.geometry.affine)


def test_worker_reports_how_the_child_died():
    worker = IsolatedWorker()
    try:
        child = worker.call(os.getpid)
        assert child != os.getpid()
        with pytest.raises(WorkerCrash, match="signal SIGKILL"):
            worker.call(os.kill, child, signal.SIGKILL)
        assert worker.call(os.getpid) != child
    finally:
        worker.close()


def test_concurrent_callers_of_the_pool_read_in_processes_of_their_own():
    """Cases read by several threads at once decode in as many child processes; a returned worker is
    reused."""
    from medsam_engine.pipeline.io.isolate import WorkerPool

    pool = WorkerPool()
    try:
        with pool.borrow() as first, pool.borrow() as second:
            pids = {first.call(os.getpid), second.call(os.getpid)}
        assert len(pids) == 2
        assert os.getpid() not in pids
        assert pool.call(os.getpid) in pids
        assert len(pool) == 2  # no third child
    finally:
        pool.close()


def _imported(name: str) -> bool:
    import sys

    return name in sys.modules


def test_a_warmed_pool_starts_its_readers_at_once_with_the_readers_libraries_imported():
    """warm() starts the children before any call (they import while the caller goes on); each has run the
    preload, so its first case finds pydicom and nibabel loaded; warming again adds nothing."""
    from medsam_engine.pipeline.io.isolate import WorkerPool
    from medsam_engine.pipeline.io.readers import libraries_for, preload

    preload = functools.partial(preload, libraries_for(None))
    pool = WorkerPool()
    try:
        assert pool.warm(2, preload=preload) == 2
        assert len(pool) == 2
        with pool.borrow() as first, pool.borrow() as second:
            children = [first._process, second._process]
            assert all(child is not None and child.poll() is None for child in children)  # started, alive
            # (this module imports pydicom itself; nibabel and ISA-L only the preload does)
            assert all(
                w.call(_imported, "nibabel") and w.call(_imported, "isal.isal_zlib") for w in (first, second)
            )
            assert {first.call(os.getpid), second.call(os.getpid)} == {c.pid for c in children}
        assert pool.warm(2, preload=preload) == 0
        assert pool.warm(1) == 0
        assert len(pool) == 2
        case = CaseRef("x", get_testdata_file("CT_small.dcm"))
        assert np.array_equal(pool.call(read_case_here, case).array, read_case(case, isolated=False).array)
    finally:
        pool.close()


def test_a_crashed_warm_reader_is_replaced_with_its_preload():
    from medsam_engine.pipeline.io.isolate import WorkerPool
    from medsam_engine.pipeline.io.readers import libraries_for, preload

    pool = WorkerPool()
    try:
        pool.warm(1, preload=functools.partial(preload, libraries_for(None)))
        child = pool.call(os.getpid)
        with pytest.raises(WorkerCrash):
            pool.call(os.kill, child, signal.SIGKILL)
        assert pool.call(os.getpid) != child
        assert pool.call(_imported, "nibabel")
        assert len(pool) == 1
    finally:
        pool.close()


def test_readers_preload_the_libraries_of_the_run_s_inputs(tmp_path):
    from medsam_engine.pipeline.io.readers import libraries_for

    dicom = CaseRef("a", str(tmp_path / "series"), files=(str(tmp_path / "series" / "1.dcm"),))
    nifti, png = CaseRef("b", str(tmp_path / "ct.nii.gz")), CaseRef("c", str(tmp_path / "cells.png"))
    assert libraries_for([dicom]) == ("pydicom",)
    assert libraries_for([nifti, nifti]) == ("nibabel", "isal.isal_zlib")
    assert libraries_for([png, dicom]) == ("cv2", "pydicom")
    assert set(libraries_for(None)) == {"pydicom", "nibabel", "isal.isal_zlib"}


def test_a_reader_that_cannot_be_started_ahead_starts_with_its_first_call(monkeypatch, caplog):
    """warm() is best effort: when no process can be started (a process limit, no memory) the run goes on and
    the worker's first call starts it."""
    import subprocess

    from medsam_engine.pipeline.io.isolate import WorkerPool

    real_popen = subprocess.Popen

    def refused(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    pool = WorkerPool()
    try:
        monkeypatch.setattr(subprocess, "Popen", refused)
        open_fds = len(os.listdir("/proc/self/fd"))
        assert pool.warm(1) == 1
        assert "could not be started ahead" in caplog.text
        assert len(os.listdir("/proc/self/fd")) == open_fds  # the child's pipes were closed again
        monkeypatch.setattr(subprocess, "Popen", real_popen)
        assert pool.call(os.getpid) != os.getpid()
        assert len(pool) == 1
    finally:
        pool.close()


def test_a_pool_warmed_when_needed_starts_its_readers_at_its_first_call_only(tmp_path):
    """A run whose cases are all committed reads nothing and starts no reader; the first read starts all of
    them, each with its preload."""
    from medsam_engine.pipeline.io.isolate import WorkerPool
    from medsam_engine.pipeline.io.readers import libraries_for, preload

    pool = WorkerPool()
    try:
        assert pool.warm(2, preload=functools.partial(preload, libraries_for(None)), when_needed=True) == 0
        assert len(pool) == 0  # nothing started yet
        assert pool.call(os.getpid) != os.getpid()
        assert len(pool) == 2
        with pool.borrow() as first, pool.borrow() as second:
            assert all(w.call(_imported, "nibabel") for w in (first, second))
        assert pool.call(os.getpid)
        assert len(pool) == 2  # planned once
    finally:
        pool.close()
