"""Live progress: each case's line as it ends, a progress line every interval when no terminal watches,
per-stage timings with -v; the same from the command line into a log file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

from medsam_engine.pipeline.annotate.progress import RunProgress, case_line


def _record(case_id: str, status: str = "done", **extra) -> dict:
    return {"case_id": case_id, "status": status, "stage": "", "slices": 4, "seconds": 2.0, **extra}


def test_a_case_line_is_printed_the_moment_its_case_ends():
    out = io.StringIO()
    live = RunProgress(3, out=out, every_s=0)
    live.case_ended(_record("a1"))
    assert out.getvalue() == "done     a1\n"
    live.case_ended(_record("b2", "failed", stage="read"), "b.nii.gz: not a NIfTI file")
    assert out.getvalue().splitlines()[-1] == "failed   b2  b.nii.gz: not a NIfTI file"
    live.case_ended(_record("a1"))  # a case is reported once
    assert len(out.getvalue().splitlines()) == 2
    assert live.reported == {"a1", "b2"}


def test_a_failure_without_its_reason_looks_it_up():
    """Outcomes that crossed Ray carry no reason (it may name files); the console reads it from the store."""
    out = io.StringIO()
    live = RunProgress(1, out=out, every_s=0, reason_of={"c3": "c.dcm: truncated"}.get)
    live.case_ended(_record("c3", "failed", stage="read"))
    assert out.getvalue() == "failed   c3  c.dcm: truncated\n"


def test_verbose_lines_carry_the_seconds_of_each_stage():
    record = _record("a1", stages={"read": 0.42, "model": 1.31, "commit": 0.2})
    expected = "done     a1  4 slices in 2.0 s (read 0.4, model 1.3, commit 0.2)"
    assert case_line(record, verbose=True) == expected
    assert case_line(record) == "done     a1"


def test_progress_lines_come_every_interval_while_the_run_works():
    lines: list[str] = []
    two = threading.Event()

    def emit(line: str) -> None:
        lines.append(line)
        if len(lines) >= 2:
            two.set()

    with RunProgress(4, out=io.StringIO(), emit=emit, every_s=0.05) as live:
        live.case_ended(_record("a1"))
        live.case_ended(_record("b2", "skipped"))
        assert two.wait(10)
    assert lines[-1].startswith("progress: 2 of 4 cases (1 done, 1 skipped, 0 failed), 2 left, ")
    assert "slices/s, about " in lines[-1]
    count = len(lines)
    threading.Event().wait(0.2)
    assert len(lines) == count  # the beat stops with the block


def test_on_a_terminal_the_bar_shows_instead_of_progress_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert RunProgress(1, out=Terminal()).every_s is None
    assert RunProgress(1, out=io.StringIO()).every_s == 30.0


def test_a_nightly_log_gets_case_and_progress_lines(two_tiles, box_fill, tmp_path):
    """The command's output going to a file, as under cron or nohup: case lines on stdout, progress lines
    with counts on stderr, nothing waiting for a terminal."""
    log, errors = tmp_path / "night.log", tmp_path / "night.err"
    argv = [sys.executable, "-m", "medsam_engine.pipeline.cli.main", "annotate", str(two_tiles[0])]
    argv += ["--coarse-mask", str(two_tiles[1]), "--out", str(tmp_path / "store"), "--config", str(box_fill)]
    env = {**os.environ, "MEDSAM_ENGINE_PROGRESS_S": "0.05"}
    with log.open("w") as out, errors.open("w") as err:
        done = subprocess.run([*argv, "-v"], stdout=out, stderr=err, env=env, timeout=300)
    assert done.returncode == 0, errors.read_text()[-2000:]
    lines = log.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["done", "done", "2"]
    assert all(" slices in " in line and "(read " in line for line in lines[:2])
    progress = [line for line in errors.read_text().splitlines() if line.startswith("progress: ")]
    assert progress
    assert progress[0].startswith("progress: ")
    assert " of 2 cases (" in progress[-1]


def test_before_a_flow_knows_its_cases_the_line_says_it_prepares():
    live = RunProgress(None, out=io.StringIO(), every_s=0)
    assert live.progress_line().startswith("progress: preparing the run (discovery, plan), ")
    live.total = 2
    assert live.progress_line().startswith("progress: 0 of 2 cases (0 done, 0 skipped, 0 failed), 2 left")
