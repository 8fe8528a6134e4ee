"""`medsam-engine`: demo, annotate, export, eval (the command-line contract of README.md).

Exit codes: 0 every case done; 1 some cases failed (each recorded with its reason); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.job import annotate
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.annotate.plan import discover_inputs
from medsam_engine.pipeline.annotate.progress import RunProgress
from medsam_engine.pipeline.cli import config as config_group
from medsam_engine.pipeline.cli import flywheel
from medsam_engine.pipeline.cli import report as report_group
from medsam_engine.pipeline.cli import store as store_group
from medsam_engine.pipeline.cli.common import (
    EXIT_CASES_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_command,
    add_engine_options,
    add_pacs_options,
    add_prompt_options,
    add_run_options,
    add_store_argument,
    configure_output,
    missing_inputs,
    out_problem,
    pacs_filters,
    print_outcomes,
    push_and_print,
    run_config,
    settle_inputs,
    settle_store,
    store_problem,
    verbosity_options,
)
from medsam_engine.pipeline.cli.demo import run_demo
from medsam_engine.pipeline.cli.ray import annotate_on_ray
from medsam_engine.pipeline.core.errors import StoreUnavailableError, resource_fault
from medsam_engine.pipeline.core.provenance import package_version
from medsam_engine.pipeline.export.common import ExportTargetError
from medsam_engine.pipeline.export.formats import FORMATS, export_store
from medsam_engine.pipeline.export.traceable import NAME_BY
from medsam_engine.pipeline.flywheel.detector_training import train_from_store
from medsam_engine.pipeline.io.cache import CacheLifecycle
from medsam_engine.pipeline.io.discover import DiscoveryOptions
from medsam_engine.pipeline.model.checkpoint import CheckpointError
from medsam_engine.pipeline.report.evaluate import evaluate_store
from medsam_engine.pipeline.store.case_store import CaseStore


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsam-engine", description=__doc__.splitlines()[0], parents=[verbosity_options(top_level=True)]
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"medsam-engine {package_version()}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = add_command(sub, "demo", "annotate bundled real data (a chest CT) and report Dice")
    demo.add_argument("--out", default="medsam-demo", help="folder for the store, exports and report")

    ann = add_command(sub, "annotate", "pre-annotate images with LiteMedSAM")
    ann.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="files or folders: DICOM, NIfTI, NRRD, PNG/JPEG/TIFF, zip/tar, DICOMweb or s3:// URLs",
    )
    ann.add_argument(
        "--store",
        "--out",
        dest="store",
        required=True,
        metavar="STORE",
        help="the store (a folder or an s3:// URL); --out is its older name",
    )
    add_prompt_options(
        ann, checkpoint_help="LiteMedSAM or MedSAM checkpoint (default: the bundled official LiteMedSAM)"
    )
    add_run_options(ann)
    ann.add_argument(
        "--overwrite", action="store_true", help="replace cases committed with another signature"
    )
    add_pacs_options(ann)
    add_engine_options(ann)

    exp = add_command(sub, "export", "export committed cases")
    add_store_argument(exp, "the store to export")
    exp.add_argument("--format", required=True, choices=list(FORMATS), help="what to write")
    exp.add_argument("--out", required=True, metavar="DIR", help="folder (or s3:// URL) to write into")
    exp.add_argument(
        "--dataset-id",
        type=int,
        default=None,
        metavar="N",
        help="nnunet: write nnU-Net's DIR/DatasetNNN_NAME (DIR is nnUNet_raw) instead of DIR itself",
    )
    exp.add_argument(
        "--dataset-name", default=None, metavar="NAME", help="nnunet: the dataset's name (default MedSAM)"
    )
    exp.add_argument(
        "--name-by",
        choices=list(NAME_BY),
        default="id",
        help="name the files by case id (default: no input name leaves the store) or by input file or "
        "series folder name; DIR/cases.csv maps every file to its case and input either way",
    )

    det = add_command(sub, "detector", "learned detector: train from a store's accepted masks")
    det_sub = det.add_subparsers(dest="detector_command", required=True, metavar="ACTION")
    train = add_command(det_sub, "train", "fit the learned detector on a store's accepted masks")
    train.add_argument("--store", required=True, metavar="STORE", help="store whose accepted masks to learn")
    train.add_argument("--out", required=True, metavar="ARTEFACT", help="file to write (e.g. detector.pt)")
    train.add_argument(
        "--label-values",
        "--labels",
        dest="labels",
        nargs="+",
        type=int,
        default=None,
        metavar="V",
        help="label values to learn (default all; --labels is its older name)",
    )
    train.add_argument("--epochs", type=int, default=200, help="training epochs at most (early stopping)")
    train.add_argument("--holdout", type=float, default=0.25, help="fraction of cases (or z) held out")
    train.add_argument("--parent", default=None, help="version of the artefact this one replaces")

    ev = add_command(sub, "eval", "Dice and NSD against reference label maps")
    add_store_argument(ev, "the store to score")
    ev.add_argument(
        "--reference",
        nargs="+",
        required=True,
        metavar="MASK",
        help="reference label maps, matched to cases by input file stem",
    )
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    flywheel.add_parsers(sub)
    store_group.add_parsers(sub)
    report_group.add_parsers(sub)
    config_group.add_parsers(sub)
    return parser


def _annotate(args) -> int:
    config = run_config(args, "annotate")
    if config is None:
        return EXIT_USAGE
    problem = out_problem(args.store, "a folder for the store") or missing_inputs(args.inputs)
    if problem is not None:
        print(f"medsam-engine annotate: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.engine == "ray":
        return annotate_on_ray(args, config)
    new_store = "://" not in args.store and not Path(args.store).exists()
    store = CaseStore(args.store)
    try:
        cases = discover_inputs(
            args.inputs,
            store,
            coarse_masks=args.coarse_mask,
            options=DiscoveryOptions(
                keep_localizers=args.keep_localizers,
                keep_derived=args.keep_derived,
                pacs_query=pacs_filters(args.pacs_query),
                marks_from_pacs=config.prompts.marks_from_pacs(),
            ),
        )
    except ValueError as exc:
        print(f"medsam-engine annotate: {exc}", file=sys.stderr)
        _forget(store, new_store)
        return EXIT_USAGE

    live = RunProgress(len(cases), verbose=args.verbose > 0, every_s=0 if args.quiet else None)
    # --push-seg reads the source series after the run: what the cases read from the cache goes after it
    keep = config.store.keep_cache
    cache = CacheLifecycle(store.cache_dir(), cases, keep=keep, defer=True) if args.push_seg else None
    try:
        with live:
            summary = annotate(
                cases,
                store,
                config,
                overwrite=args.overwrite,
                on_outcome=lambda outcome: live.case_ended(outcome.record(), outcome.reason),
                cache=cache,
            )
    except CheckpointError as exc:
        print(f"medsam-engine annotate: {exc}", file=sys.stderr)
        _forget(store, new_store)
        return EXIT_USAGE
    except StoreUnavailableError as exc:
        print(f"medsam-engine annotate: {exc}", file=sys.stderr)
        return EXIT_CASES_FAILED
    failed = print_outcomes(
        [o.record() for o in summary.outcomes],
        {o.case_id: o.reason for o in summary.outcomes},
        args.store,
        live=live,
    )
    push_failed = push_and_print(
        store, [o.case_id for o in summary.outcomes if o.status != "failed"], args.push_seg
    )
    if cache is not None:
        cache.finish()
    return EXIT_CASES_FAILED if failed or push_failed else EXIT_OK


def _forget(store: CaseStore, new: bool) -> None:
    """Remove a local store this command created when it stopped on a usage error before committing a case
    (a checkpoint that does not load, masks that cannot be paired): a mistake leaves no store behind."""
    if new and not store.committed_cases():
        shutil.rmtree(store.root, ignore_errors=True)


def _detector(args) -> int:
    store = CaseStore(args.store)
    if not store.committed_cases():
        print(f"medsam-engine detector train: no committed case in {args.store}", file=sys.stderr)
        return EXIT_USAGE
    if not 0 < args.holdout < 1:
        print("medsam-engine detector train: --holdout must be between 0 and 1", file=sys.stderr)
        return EXIT_USAGE
    runner = LazyRunner(EngineConfig()).get()
    meta = train_from_store(
        store,
        args.out,
        runner=runner,
        labels=args.labels,
        holdout=args.holdout,
        epochs=args.epochs,
        parent=args.parent,
    )
    print(
        json.dumps(
            {
                "artefact": str(Path(args.out).resolve()),
                "version": meta["version"],
                "labels": meta["labels"],
                "training": meta["training"],
                "metrics": meta["metrics"],
            },
            indent=1,
        )
    )
    return EXIT_OK


def _export(args) -> int:
    """Export every committed case; exit 1 when some cases could not be written (each printed with why)."""
    store = CaseStore(args.store)
    if not store.fs.exists(str(store.root)):
        print(f"medsam-engine export: no store at {args.store}", file=sys.stderr)
        return EXIT_USAGE
    options = {
        k: v
        for k, v in (("dataset_id", args.dataset_id), ("dataset_name", args.dataset_name))
        if v is not None
    }
    if options and args.format != "nnunet":
        print(
            "medsam-engine export: --dataset-id and --dataset-name are for --format nnunet", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        report = export_store(store, args.format, args.out, name_by=args.name_by, **options)
    except (ExportTargetError, ValueError) as exc:
        print(f"medsam-engine export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for case_id, reason in report.excluded.items():
        print(f"excluded {case_id}  {reason}")
    for case_id, reason in report.skipped.items():
        print(f"skipped  {case_id}  {reason}")
    print(
        f"{args.format}: wrote {len(report.written)} files, skipped {len(report.skipped)} cases, "
        f"excluded {len(report.excluded)} -> {args.out}"
    )
    print(f"cases: {report.cases_csv}")
    return EXIT_CASES_FAILED if report.skipped else EXIT_OK


def format_scores(results: dict) -> str:
    lines = [f"{'case':18s} {'label':>5s} {'Dice':>7s} {'NSD':>7s}"]
    for case_id, labels in results.items():
        for label, scores in labels.items():
            lines.append(f"{case_id:18s} {label:5d} {scores['dice']:7.4f} {scores['nsd']:7.4f}")
    return "\n".join(lines)


def _eval(args) -> int:
    """Scores per case and label; a reference that cannot be read or placed is named (exit 1), none
    matching a case is a usage error (exit 2)."""
    problems: dict[str, str] = {}
    results = evaluate_store(CaseStore(args.store), args.reference, problems=problems)
    for case_id, reason in problems.items():
        print(f"medsam-engine eval: case {case_id}: {reason}", file=sys.stderr)
    if not results and not problems:
        print("medsam-engine eval: no reference matched a committed case", file=sys.stderr)
        return EXIT_USAGE
    if results:
        print(json.dumps(results, indent=1) if args.json else format_scores(results))
    return EXIT_CASES_FAILED if problems else EXIT_OK


def _reads_a_store(args) -> bool:
    """Commands that read an existing store (annotate and round run create theirs)."""
    if args.command == "round":
        return args.round_command == "report"
    if args.command == "finetune":
        return bool(args.store)
    return args.command in ("export", "eval", "detector", "review", "model", "store", "report")


def _writes_a_folder(args) -> bool:
    """Commands whose --out is a folder they fill (annotate checks its own)."""
    return args.command == "export" or (args.command == "review" and args.review_command == "export")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_output(verbose=args.verbose, quiet=args.quiet)
    mistake = settle_store(args) or settle_inputs(args)
    if mistake is not None:
        print(f"medsam-engine {args.command}: {mistake}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "demo":
        return run_demo(Path(args.out))
    handlers = {
        "annotate": _annotate,
        "export": _export,
        "eval": _eval,
        "detector": _detector,
        "review": flywheel.review,
        "finetune": flywheel.finetune,
        "round": flywheel.round_command,
        "model": flywheel.model_command,
        "store": store_group.store_command,
        "report": report_group.report_command,
        "config": config_group.config_command,
    }
    problem = store_problem(args.store) if _reads_a_store(args) else None
    if problem is None and _writes_a_folder(args):
        problem = out_problem(args.out, "a folder for the export")
    if problem is not None:
        print(f"medsam-engine {args.command}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return handlers[args.command](args)
    except StoreUnavailableError as exc:
        print(f"medsam-engine {args.command}: {exc}", file=sys.stderr)
        return EXIT_CASES_FAILED
    except OSError as exc:  # a full, read-only or forbidden disk is a reason, not a traceback
        fault = resource_fault(exc)
        if fault is None:
            raise
        where = f" ({Path(exc.filename).name})" if getattr(exc, "filename", None) else ""
        print(f"medsam-engine {args.command}: cannot write{where}: {fault}", file=sys.stderr)
        return EXIT_CASES_FAILED


if __name__ == "__main__":
    sys.exit(main())
