"""What a person (or an overnight log) sees while a run goes: each case's line as it ends, and a progress
line every ``every_s`` seconds when nobody watches a terminal.

The same reporter serves the local engine, ``--engine ray`` and the flows: a case line is ``STATUS CASE_ID``
(a failure adds its reason; with ``verbose`` a finished case adds its slices and per-stage seconds); the
progress line counts cases done / skipped / failed / left, slices per second and the time left at the rate
so far. Lines are flushed as written, so a cron, SLURM or nohup log fills while the run works.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from medsam_engine.pipeline.core.outcome import STATUSES

EVERY_S = 30.0  # seconds between progress lines when the output is not a terminal
EVERY_S_VARIABLE = "MEDSAM_ENGINE_PROGRESS_S"  # another interval, e.g. 300 for a quieter nightly log


def progress_interval() -> float:
    """Seconds between progress lines: $MEDSAM_ENGINE_PROGRESS_S, else 30."""
    try:
        return max(0.05, float(os.environ.get(EVERY_S_VARIABLE, EVERY_S)))
    except ValueError:
        return EVERY_S


def case_line(record: dict[str, Any], reason: str = "", *, verbose: bool = False) -> str:
    """One case's line: ``done     <id>``; a failed or quarantined case adds its reason (else its stage);
    ``verbose`` adds a finished case's slices and seconds per stage."""
    line = f"{record['status']:8s} {record['case_id']}"
    if record["status"] in ("failed", "quarantined"):
        line += f"  {reason or record.get('stage', '')}"
    elif verbose and record["status"] == "done":
        stages = record.get("stages") or {}
        timing = ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())
        line += f"  {record.get('slices', 0)} slices in {float(record.get('seconds', 0.0)):.1f} s"
        line += f" ({timing})" if timing else ""
    return line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class RunProgress:
    """Counts a run's cases as they end and reports them.

    ``case_ended`` prints the case's line at once on ``out`` (by default whatever ``sys.stdout`` is then;
    None: no case lines, as a flow's own logger reports only progress); ``reason_of(case_id)`` supplies a
    failure's reason when the record carries none, as records that crossed Ray do. While the reporter is open
    (a ``with`` block), ``emit`` receives a progress line every ``every_s`` seconds; ``every_s=None`` means
    every 30 s ($MEDSAM_ENGINE_PROGRESS_S) when ``out`` is not a terminal, none on a terminal (a progress bar
    shows there).
    """

    def __init__(
        self,
        total: int | None,
        *,
        out: TextIO | str | None = "stdout",
        emit: Callable[[str], None] | None = None,
        every_s: float | None = None,
        verbose: bool = False,
        reason_of: Callable[[str], str] | None = None,
    ) -> None:
        self.total = total
        self._out, self.verbose, self.reason_of = out, verbose, reason_of
        self.emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
        if every_s is None:
            every_s = None if self.out is not None and _is_terminal(self.out) else progress_interval()
        self.every_s = every_s
        self.counts = dict.fromkeys(STATUSES, 0)
        self.slices = 0
        self.reported: set[str] = set()
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def out(self) -> TextIO | None:
        """Where case lines go: the stream given, or the current ``sys.stdout``; None for none."""
        return sys.stdout if self._out == "stdout" else self._out  # type: ignore[return-value]

    def case_ended(self, record: dict[str, Any], reason: str = "") -> None:
        """Count a finished case and print its line (once per case id)."""
        with self._lock:
            if record["case_id"] in self.reported:
                return
            self.reported.add(record["case_id"])
            self.counts[record["status"]] = self.counts.get(record["status"], 0) + 1
            self.slices += int(record.get("slices", 0) or 0)
        if self.out is None:
            return
        if not reason and record["status"] in ("failed", "quarantined") and self.reason_of is not None:
            reason = self.reason_of(record["case_id"])
        print(case_line(record, reason, verbose=self.verbose), file=self.out, flush=True)

    def progress_line(self) -> str:
        """``progress: N of TOTAL cases (a done, b skipped, c failed), L left, R slices/s, about T left``;
        before the run knows its cases (``total`` None: a flow still discovering), how long it has been
        preparing."""
        with self._lock:
            counts, slices = dict(self.counts), self.slices
        elapsed = max(time.monotonic() - self._started, 1e-9)
        if self.total is None:
            return f"progress: preparing the run (discovery, plan), {_duration(elapsed)} so far"
        finished = sum(counts.values())
        left = max(self.total - finished, 0)
        failed = counts["failed"] + counts["quarantined"]
        done, skipped = counts["done"], counts["skipped"]
        line = (
            f"progress: {finished} of {self.total} cases ({done} done, {skipped} skipped, {failed} failed), "
            f"{left} left, {slices / elapsed:.2f} slices/s"
        )
        worked = counts["done"] + counts["failed"]  # skipped cases cost next to nothing
        if left and worked:
            line += f", about {_duration(elapsed / worked * left)} left"
        return line

    def __enter__(self) -> RunProgress:
        if self.every_s:
            self._thread = threading.Thread(target=self._beat, name="medsam-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        assert self.every_s is not None
        while not self._stop.wait(self.every_s):
            self.emit(self.progress_line())


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
