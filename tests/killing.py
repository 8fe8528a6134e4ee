"""SIGKILL at a chosen point: the command runs in a child process in which one function (``module:name`` or
``module:Class.method``) is wrapped so that, on its ``nth`` call, it says so in a file and waits; the parent
then kills the child with SIGKILL at that known moment (no guessed sleeps) and the test checks what is
left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import importlib, json, sys, time
from pathlib import Path


def main_with_stop(target, ready, nth, argv):
    module_name, _, attribute = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = [0]

    def stop_here(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            ready.write_text(target)
            time.sleep(600)  # killed long before this ends
        return real(*args, **kwargs)

    setattr(owner, name, stop_here)
    from medsam_engine.pipeline.cli.main import main
    return main(argv)


if __name__ == "__main__":  # worker processes started by spawn import this file too
    sys.exit(main_with_stop(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])))
"""


def kill_at(target: str, argv: list[str], tmp_path: Path, *, nth: int = 1, timeout_s: float = 600) -> None:
    """Run ``medsam-engine ARGV`` until the ``nth`` call of ``target``, then SIGKILL it there."""
    script, ready = tmp_path / "killed_child.py", tmp_path / f"ready-{time.monotonic_ns()}"
    script.write_text(CHILD)
    log = tmp_path / f"{ready.name}.log"
    with open(log, "wb") as sink:
        child = subprocess.Popen(
            [sys.executable, str(script), target, str(ready), str(nth), json.dumps(argv)],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if child.poll() is not None:
            raise AssertionError(f"the command ended before reaching {target}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the command did not reach {target} within {timeout_s} s")
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
