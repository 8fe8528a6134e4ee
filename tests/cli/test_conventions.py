"""Command-line conventions: --version, help on every option, -v/-q on either side of the subcommand,
timestamped log lines and no third-party warnings in normal output."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import numpy as np
import pytest

from medsam_engine.pipeline.cli.main import _parser, main
from medsam_engine.pipeline.core.provenance import package_version


def _parsers(parser: argparse.ArgumentParser, path: str = "medsam-engine"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert capsys.readouterr().out.strip() == f"medsam-engine {package_version()}"


def test_every_option_of_every_command_has_help():
    missing = [
        f"{path}: {action.dest}"
        for path, parser in _parsers(_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert missing == []


def test_verbosity_is_accepted_before_and_after_the_subcommand():
    parser = _parser()
    after = parser.parse_args(["export", "S", "--format", "nifti", "--out", "D", "-v"])
    before = parser.parse_args(["-q", "export", "S", "--format", "nifti", "--out", "D"])
    deep = parser.parse_args(["review", "import", "S", "c.nii", "--reviewer", "r", "-vv"])
    assert (after.verbose, after.quiet) == (1, 0)
    assert (before.verbose, before.quiet) == (0, 1)
    assert deep.verbose == 2


@pytest.mark.slow
def test_log_lines_carry_a_timestamp_and_third_party_warnings_stay_out(tmp_path, nuclei_2d):
    """A real annotate run in eager torch (it imports timm, whose deprecation warnings used to show) with one
    unreadable case (an ERROR line) and one real nuclei crop."""
    import cv2

    image = cv2.imread(str(nuclei_2d[0]), cv2.IMREAD_UNCHANGED)[:96, :96]
    mask = cv2.imread(str(nuclei_2d[1]), cv2.IMREAD_UNCHANGED)[:96, :96]
    cv2.imwrite(str(tmp_path / "crop.png"), image)
    cv2.imwrite(str(tmp_path / "crop_mask.png"), mask.astype(np.uint16))
    (tmp_path / "broken.png").write_bytes(b"not a PNG")
    (tmp_path / "broken_mask.png").write_bytes(b"not a PNG either")
    (tmp_path / "config.yaml").write_text("model:\n  backend: torch\n")
    command = [
        sys.executable,
        "-m",
        "medsam_engine.pipeline.cli.main",
        "annotate",
        str(tmp_path / "crop.png"),
        str(tmp_path / "broken.png"),
        "--coarse-mask",
        str(tmp_path / "crop_mask.png"),
        str(tmp_path / "broken_mask.png"),
        "--out",
        str(tmp_path / "store"),
        "--config",
        str(tmp_path / "config.yaml"),
        "-v",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    log_lines = [
        line for line in done.stderr.splitlines() if re.match(r"\S+ (DEBUG|INFO|WARNING|ERROR) ", line)
    ]
    assert log_lines
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ", line) for line in log_lines)
    assert any(" ERROR medsam_engine.pipeline.annotate.driver: " in line for line in log_lines)
    for noise in ("FutureWarning", "Unclosed client session", "Traceback"):
        assert noise not in done.stderr
    assert re.search(r"^done\s+\w+  1 slices in [\d.]+ s \(read [\d.]+, ", done.stdout, re.M)  # -v: stages
    assert re.search(r"^failed\s+\w+\s+\S", done.stdout, re.M)


def test_a_flow_run_s_failure_reaches_the_console_without_its_traceback():
    """`--engine ray` filters Prefect's flow and task run records: the line stays, its traceback (which may
    name input files) goes."""
    import io
    import logging

    from medsam_engine.pipeline.cli.ray import _without_traceback

    try:
        raise RuntimeError("1 cases failed")
    except RuntimeError:
        record = logging.LogRecord(
            "prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception", None, sys.exc_info()
        )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(_without_traceback)
    handler.handle(record)
    assert stream.getvalue() == "Encountered exception\n"
