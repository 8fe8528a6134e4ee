"""Run risky calls (pixel decoders) in a persistent child process, so a crash fails one case, not the batch.

Decoders are native code: python-gdcm segfaults on some corrupt files and pylibjpeg-rle's Rust panics escape
``except Exception``. :class:`IsolatedWorker` keeps one ``spawn``-ed child alive and sends it one call at a
time; when the child dies (a signal, an abort) or overruns its time, the call raises :class:`WorkerCrash`
and the next call starts a fresh child. The child starts once per process (a fraction of a second of imports),
so the cost per case is sending the result back through a pipe. :class:`WorkerPool` lends one worker per
concurrent caller, so cases read by several threads at once decode in parallel processes.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPOOL_DIR = "/dev/shm"  # results travel through files here (tmpfs) when it exists, else the temp folder


class WorkerCrash(Exception):
    """The child process died or was stopped during a call; ``why`` says how ("signal SIGSEGV", ...)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError that keeps its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(inbox: Connection, outbox: Connection, initializer: Callable[[], None] | None) -> None:
    """Child loop: receive (function, args), send back ("ok", result) or ("error", exception)."""
    if initializer is not None:
        initializer()
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        function, args, spool = message
        try:
            reply: tuple[str, Any] = ("ok", function(*args))
        except BaseException as exc:
            reply = ("error", _portable(exc))
        try:
            _send_reply(outbox, reply, spool)
        except Exception as exc:
            error = RuntimeError(f"the result could not be sent back ({type(exc).__name__}: {exc})")
            _send_reply(outbox, ("error", error), spool)


def _send_reply(outbox: Connection, reply: tuple[str, Any], spool: str) -> None:
    """Pickle ``reply``; large array buffers go through files in ``spool`` (tmpfs), far faster than a pipe."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(reply, protocol=5, buffer_callback=buffers.append)
    paths: list[str] = []
    try:
        for index, buffer in enumerate(buffers):
            paths.append(os.path.join(spool, f"{os.getpid()}-{index}.bin"))
            with open(paths[-1], "wb") as handle:
                handle.write(buffer.raw())
    except OSError:  # a small or full /dev/shm: send everything through the pipe instead
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)
        data, paths = pickle.dumps(reply, protocol=5), []
    outbox.send((data, paths))


def _receive_reply(inbox: Connection) -> tuple[str, Any]:
    data, paths = inbox.recv()
    buffers = []
    for path in paths:
        with open(path, "rb") as handle:  # a private copy-on-write mapping: no copy until written to
            size = os.fstat(handle.fileno()).st_size
            buffers.append(mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) if size else bytearray())
        os.unlink(path)
    reply: tuple[str, Any] = pickle.loads(data, buffers=buffers)
    return reply


def _child_main(read_fd: int, write_fd: int) -> None:
    """Entry point of the child (``python -m medsam_engine.pipeline.io.isolate R W``): the parent's sys.path,
    then serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    sys.path[:] = inbox.recv()
    _serve(inbox, outbox, inbox.recv())


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class IsolatedWorker:
    """A persistent child process that runs one call at a time; thread-safe.

    The child is a fresh interpreter (``python -m pipeline.io.isolate``), not a fork: it shares no threads or
    locks with the parent, and unlike multiprocessing's 'spawn' it never re-imports the caller's script.
    """

    def __init__(self, *, initializer: Callable[[], None] | None = None) -> None:
        self._initializer = initializer
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._spool = ""
        self._pid = os.getpid()

    def _start(self) -> tuple[Connection, Connection]:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        )
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "medsam_engine.pipeline.io.isolate",
                    str(to_child_r),
                    str(from_child_w),
                ],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            os.close(to_child_w)  # no child: our ends of its pipes are closed too
            os.close(from_child_r)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        spool_root = SPOOL_DIR if os.path.isdir(SPOOL_DIR) else None
        self._spool = tempfile.mkdtemp(prefix="medsam-reader-", dir=spool_root)
        send, recv = Connection(to_child_w, readable=False), Connection(from_child_r, writable=False)
        send.send(list(sys.path))
        send.send(self._initializer)
        self._send, self._recv = send, recv
        return send, recv

    def _stop(self, *, kill: bool) -> int | None:
        process, send, recv = self._process, self._send, self._recv
        self._process = self._send = self._recv = None
        if process is None:
            return None
        if not kill and send is not None:
            with contextlib.suppress(OSError):
                send.send(None)
        try:
            if kill:
                process.kill()
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        for conn in (send, recv):
            if conn is not None:
                conn.close()
        if self._spool:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = ""
        return process.returncode

    def _running(self) -> tuple[Connection, Connection]:
        """The live child's pipes, a child started first if there is none (caller holds the lock)."""
        if self._pid != os.getpid():  # inherited through fork: that child belongs to the parent
            self._process = self._send = self._recv = None
            self._pid = os.getpid()
        if (
            self._process is None
            or self._process.poll() is not None
            or self._send is None
            or self._recv is None
        ):
            self._stop(kill=True)
            return self._start()
        return self._send, self._recv

    def start(self) -> None:
        """Start the child now unless it runs; returns at once, while the child imports what it needs and runs
        the initializer (a first call waits for that)."""
        with self._lock:
            self._running()

    def call(self, function: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> Any:
        """``function(*args)`` in the child; its exceptions are re-raised here; a dead child -> WorkerCrash.

        ``function`` and ``args`` must be picklable (a module-level function, plain values).
        """
        with self._lock:
            send, recv = self._running()
            try:
                send.send((function, args, self._spool))
                if not recv.poll(timeout_s):
                    self._stop(kill=True)
                    raise WorkerCrash(f"it took longer than {timeout_s:g} s and was stopped")
                status, payload = _receive_reply(recv)
            except (EOFError, OSError):
                process = self._process
                if process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=5)
                code = process.returncode if process is not None else None
                self._stop(kill=True)
                raise WorkerCrash(_describe_exit(code)) from None
        if status == "ok":
            return payload
        raise payload

    def close(self) -> None:
        with self._lock:
            self._stop(kill=False)


class WorkerPool:
    """Isolated workers lent one per concurrent caller: threads that read cases at the same time decode in
    as many child processes, in parallel. A worker goes back to the pool after each call and is reused;
    the pool grows to the most callers ever at once and its children end with :meth:`close`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[IsolatedWorker] = []
        self._all: list[IsolatedWorker] = []
        self._planned: tuple[int, Callable[[], None] | None] | None = None  # a warm() left for the first call

    @contextlib.contextmanager
    def borrow(self) -> Iterator[IsolatedWorker]:
        with self._lock:
            planned, self._planned = self._planned, None
        if planned is not None:
            self.warm(planned[0], preload=planned[1])
        with self._lock:
            if self._idle:
                worker = self._idle.pop()
            else:
                worker = IsolatedWorker()
                self._all.append(worker)
        try:
            yield worker
        finally:
            with self._lock:
                self._idle.append(worker)

    def warm(
        self, count: int, *, preload: Callable[[], None] | None = None, when_needed: bool = False
    ) -> int:
        """Start workers until the pool holds ``count``, their children started now and running ``preload``
        (a module-level function: the imports their calls will need), so that the first ``count`` callers
        at once don't each wait for an interpreter to start. Returns how many were added. ``when_needed``:
        not now but at the pool's first call (a run whose cases are all committed already starts none).
        Best effort: a child that cannot be started now (no memory, a process limit) is tried again by its
        first call."""
        if when_needed:
            with self._lock:
                self._planned = (count, preload)
            return 0
        with self._lock:
            added = [IsolatedWorker(initializer=preload) for _ in range(count - len(self._all))]
            self._all.extend(added)
            self._idle.extend(added)
        for worker in added:
            try:
                worker.start()
            except OSError as exc:
                log.warning(
                    "a reader process could not be started ahead (%s); it starts with its first case", exc
                )
        return len(added)

    def call(self, function: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> Any:
        """:meth:`IsolatedWorker.call` on a worker of the pool that no other caller holds."""
        with self.borrow() as worker:
            return worker.call(function, *args, timeout_s=timeout_s)

    def __len__(self) -> int:
        return len(self._all)

    def close(self) -> None:
        with self._lock:
            workers, self._all, self._idle = self._all, [], []
        for worker in workers:
            worker.close()


_default: WorkerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> WorkerPool:
    """This process's shared pool of isolated workers (created on first use, closed at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = WorkerPool()
            atexit.register(_default.close)
        return _default


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
