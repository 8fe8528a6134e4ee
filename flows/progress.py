"""Progress of a flow run: a Prefect progress artifact, on a terminal a progress bar (cases, slices/s), and
the run's live report (pipeline/annotate/progress.py): the console of the command that started the flow
(``attach_console``) prints each case's line as it ends and a progress line every 30 s; a flow run with no
console logs that progress line to its own run log.

Shard tasks run in threads of the flow's process; they find the run's board by flow-run id, so nothing
unpicklable travels as a task parameter.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from medsam_engine.pipeline.annotate.progress import RunProgress, progress_interval

log = logging.getLogger(__name__)

_boards: dict[str, ProgressBoard] = {}
_boards_lock = threading.Lock()
_console: RunProgress | None = None


def attach_console(console: RunProgress | None) -> None:
    """The live report of the command running flows in this process (None: none); boards opened from now on
    report their cases to it."""
    global _console
    _console = console


class ProgressBoard:
    """Counts finished cases of one run; updates the artifact at most every ``every_s`` seconds."""

    def __init__(self, total: int, *, every_s: float = 2.0, show_bar: bool | None = None) -> None:
        from tqdm.auto import tqdm

        self.total, self.finished, self.slices = total, 0, 0
        self._every_s, self._last = every_s, 0.0
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self.artifact: UUID | None = create_progress_artifact(
            progress=0.0 if total else 100.0,
            key="annotate-progress",
            description=f"cases annotated of {total} to do",
        )
        show = sys.stderr.isatty() if show_bar is None else show_bar
        self._bar = tqdm(total=total, desc="cases", unit="case", disable=not show)
        self.live = _console
        if self.live is not None:
            self.live.total = total
            self._own: RunProgress | None = None
        else:
            emit = get_run_logger().info
            self._own = RunProgress(total, out=None, emit=emit, every_s=progress_interval()).__enter__()
            self.live = self._own

    def advance(self, outcome: dict) -> None:
        self.live.case_ended(outcome)
        with self._lock:
            self.finished += 1
            self.slices += int(outcome.get("slices", 0))
            self._bar.update(1)
            rate = self.slices / max(time.perf_counter() - self._started, 1e-9)
            self._bar.set_postfix_str(f"{rate:.2f} slices/s")
            now = time.monotonic()
            if now - self._last < self._every_s and self.finished < self.total:
                return
            self._last = now
            progress = 100.0 * self.finished / max(self.total, 1)
        self._publish(progress)

    def _publish(self, progress: float) -> None:
        if self.artifact is None:
            return
        try:
            update_progress_artifact(self.artifact, progress=progress)
        except Exception as exc:
            log.warning("progress artifact not updated (%s)", type(exc).__name__)

    def close(self) -> None:
        self._bar.close()
        if self._own is not None:
            self._own.__exit__(None, None, None)
        with self._lock:
            progress = 100.0 * min(self.finished, self.total) / max(self.total, 1)
        self._publish(progress if self.total else 100.0)


def open_board(run_id: str, total: int) -> ProgressBoard:
    board = ProgressBoard(total)
    with _boards_lock:
        _boards[run_id] = board
    return board


def board_for(run_id: str) -> ProgressBoard | None:
    with _boards_lock:
        return _boards.get(run_id)


def close_board(run_id: str) -> None:
    with _boards_lock:
        board = _boards.pop(run_id, None)
    if board is not None:
        board.close()
