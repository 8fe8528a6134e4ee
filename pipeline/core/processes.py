"""This machine and its processes, as the records that outlive a process name them (case leases, staging
folders of cases being written, pins on cache entries).

``HOST`` is the host name and the kernel's boot id: a pid recorded before a reboot is never taken for a live
process. :func:`process_tag` is a short name of one process of this machine (a hash of ``HOST`` and the pid),
safe to put in file names.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


HOST = f"{socket.gethostname()}/{_boot_id()}"
MACHINE = hashlib.sha256(HOST.encode()).hexdigest()[:8]


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def process_tag(pid: int | None = None) -> str:
    """``<machine>-<pid>``: this machine's short hash and the pid (default: this process)."""
    return f"{MACHINE}-{os.getpid() if pid is None else pid}"


def tagged_process_gone(tag: str) -> bool:
    """Whether ``tag`` (:func:`process_tag`) names a process of this machine that no longer exists; False for
    another machine's process (its liveness cannot be seen from here) and for a name that is no tag."""
    machine, _, pid = tag.partition("-")
    return machine == MACHINE and pid.isdigit() and not process_alive(int(pid))
