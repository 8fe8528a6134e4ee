"""`medsam-engine report STORE|--store STORE [--out DIR] [--worst N] [--cases N]`: the store's QC page.

Writes one self-contained HTML file, DIR/report.html (default DIR: STORE/_report), and prints its path:
the summary (cases, failures by stage, routes, label counts and volumes by name), the worst instances as
crops around their box prompts, then overlays per case (pipeline/report/store_report.py). Exit 0 when the
page is written, whatever the cases' states; 2 for bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsam_engine.pipeline.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    add_command,
    add_store_argument,
    out_problem,
)
from medsam_engine.pipeline.report.store_report import write_store_report
from medsam_engine.pipeline.store.case_store import CaseStore

DEFAULT_FOLDER = "_report"  # under a local store


def _count(text: str) -> int:
    """A whole number >= 0 for --worst and --cases."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def add_parsers(sub) -> None:
    """`report`."""
    rep = add_command(sub, "report", "one self-contained HTML page: summary, worst instances, overlays")
    add_store_argument(rep, "the store (a folder or an s3:// URL)")
    rep.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"folder for report.html (default: STORE/{DEFAULT_FOLDER}; required for an s3:// store)",
    )
    rep.add_argument(
        "--worst", type=_count, default=12, metavar="N", help="instances in the worst list (default 12)"
    )
    rep.add_argument(
        "--cases",
        type=_count,
        default=50,
        metavar="N",
        help="cases pictured one by one, the worst first (default 50)",
    )


def report_command(args) -> int:
    store = CaseStore(args.store)
    out = args.out
    if out is None:
        if not store.is_local:
            print("medsam-engine report: give --out DIR for a store on object storage", file=sys.stderr)
            return EXIT_USAGE
        out = str(Path(store.root) / DEFAULT_FOLDER)
    problem = out_problem(out, "a folder for the report") or (
        "--out must be a local folder" if "://" in out else None
    )
    if problem is not None:
        print(f"medsam-engine report: {problem}", file=sys.stderr)
        return EXIT_USAGE
    page = write_store_report(store, out, worst=args.worst, cases=args.cases)
    print(f"report: {page.resolve()}")
    return EXIT_OK
