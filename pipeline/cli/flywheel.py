"""The flywheel's commands: `review export|import|calibrate`, `finetune`, `model list|use`, `round run|report`
(see pipeline/cli/main.py for the others and the exit codes)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from medsam_engine.detectors.marks import marks_from_pacs
from medsam_engine.pipeline.annotate.plan import discover_inputs
from medsam_engine.pipeline.annotate.progress import RunProgress, case_line
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
    device_name,
    marks_lines,
    pacs_filters,
    push_and_print,
    run_config,
)
from medsam_engine.pipeline.cli.ray import round_on_ray
from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.flywheel.marked_findings import marks_options
from medsam_engine.pipeline.flywheel.registry import (
    current_model,
    is_promoted,
    registered_models,
    set_current,
)
from medsam_engine.pipeline.flywheel.review import FORMATS as REVIEW_FORMATS
from medsam_engine.pipeline.flywheel.review import (
    calibrate_store,
    export_queue,
    import_corrections,
    pull_corrections,
)
from medsam_engine.pipeline.flywheel.rounds import (
    finetune_rows,
    format_finetune_table,
    format_table,
    round_rows,
    run_round,
    write_round_table,
)
from medsam_engine.pipeline.io.cache import CacheLifecycle
from medsam_engine.pipeline.io.dicomweb import is_service_root
from medsam_engine.pipeline.io.discover import DiscoveryOptions
from medsam_engine.pipeline.model.checkpoint import CheckpointError
from medsam_engine.pipeline.model.devices import resolve_device
from medsam_engine.pipeline.store.case_store import CaseStore


def add_parsers(sub) -> None:
    """`review export|import|calibrate`, `finetune`, `model list|use`, `round run|report` (the flywheel)."""
    review = add_command(sub, "review", "review queue out, corrections in")
    review_sub = review.add_subparsers(dest="review_command", required=True, metavar="ACTION")
    out = add_command(review_sub, "export", "write the review queue (worst first) and its QC report")
    add_store_argument(out, "the store whose routed cases to export")
    out.add_argument("--out", required=True, metavar="DIR", help="folder for the queue")
    out.add_argument(
        "--format",
        "--formats",
        dest="formats",
        nargs="+",
        default=list(REVIEW_FORMATS),
        choices=list(REVIEW_FORMATS),
        help="what to write per case (default all): NIfTI, a named .seg.nrrd for 3D Slicer, the "
        "OME-Zarr group, DICOM SEG for OHIF and PACS",
    )
    out.add_argument("--limit", type=int, default=None, help="only the N worst cases")
    into = add_command(review_sub, "import", "ingest corrected masks and mark the cases accepted")
    add_store_argument(into, "the store the proposals came from")
    into.add_argument(
        "corrections",
        nargs="*",
        metavar="CORRECTION",
        help="label maps (NIfTI, NRRD, .seg.nrrd, DICOM SEG, OME-Zarr) or folders of them, or a "
        "DICOMweb service root (http://HOST/dicom-web): the reviewers' SEGs there that "
        "reference a case's series and are newer than its proposal",
    )
    into.add_argument("--reviewer", required=True, help="who reviewed (a name or id; never a patient's)")
    calibrate = add_command(review_sub, "calibrate", "refit the quality score on the reviews so far")
    add_store_argument(calibrate, "the store with reviewed cases")
    calibrate.add_argument(
        "--edit-dice-threshold",
        type=float,
        default=0.9,
        help="a proposal is good when the correction's Dice with it is at least this",
    )

    tune = add_command(sub, "finetune", "fine-tune LiteMedSAM on accepted masks or image/label pairs")
    source = tune.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", metavar="STORE", help="train on the store's person-accepted cases")
    source.add_argument("--images", nargs="+", metavar="IMG", help="train on these images (with --labels)")
    tune.add_argument(
        "--masks",
        "--labels",
        dest="labels",
        nargs="+",
        metavar="MASK",
        help="one label map per --images entry (--labels is its older name)",
    )
    tune.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write")
    tune.add_argument(
        "--parent",
        default=None,
        metavar="CKPT",
        help="start from this checkpoint (default: "
        "the store's current registered model, else the official weights)",
    )
    tune.add_argument(
        "--epochs",
        type=int,
        default=12,
        help="epochs at most: cross-validation chooses how many (0 to 12), then the model is "
        "trained that long on all the reviewed data",
    )
    tune.add_argument(
        "--minutes",
        type=float,
        default=9.0,
        help="time budget: the epochs allowed are cut, from the first one's time, so the run "
        "ends within it (default 9; 0: no budget)",
    )
    tune.add_argument(
        "--folds",
        type=int,
        default=2,
        metavar="N",
        help="cross-validation folds: whole cases when there are 4 or more and every kind is in "
        "two of them, else blocks of slices (or objects) within each case (default 2)",
    )
    tune.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="held-out Dice any kind (modality + label) with 5 or more boxes may lose against the "
        "parent for the model to be chosen and promoted (default 0.01)",
    )
    tune.add_argument("--holdout", type=float, default=None, help=argparse.SUPPRESS)  # before --folds
    tune.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    tune.add_argument("--max-slices", type=int, default=48, help="embedded slices per case")
    tune.add_argument(
        "--boxes-per-epoch",
        type=int,
        default=32,
        help="boxes drawn per epoch, as slices of up to 4 boxes each (default 32: 8 slices)",
    )
    tune.add_argument(
        "--eval-boxes",
        type=int,
        default=48,
        metavar="N",
        help="held-out boxes each fold is scored on after every epoch (default 48; fewer is "
        "faster and the choice of epochs noisier)",
    )
    tune.add_argument(
        "--device",
        type=device_name,
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to train (default auto: a visible GPU, else the CPU)",
    )
    tune.add_argument(
        "--whole-model",
        choices=["auto", "yes", "no"],
        default="auto",
        help="train the image encoder too (auto: yes on CUDA, no on CPU)",
    )
    tune.add_argument(
        "--encoder-stages",
        type=int,
        default=1,
        metavar="N",
        help="also train the image encoder's last N stages (1-3) and its neck, from activations "
        "computed once per slice (default 1; 2 costs about twice as much per step; 0: "
        "prompt encoder + mask decoder only)",
    )
    tune.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also train on the training slices flipped left-right, up-down, turned 90 degrees "
        "and with brighter mid-tones (boxes and masks follow; five times the embedding time)",
    )
    tune.add_argument(
        "--no-weight-by-edit",
        dest="weight_by_edit",
        action="store_false",
        help="draw every box evenly (default: boxes of labels the reviewer changed more, by edit "
        "Dice, are drawn more often)",
    )
    tune.add_argument(
        "--promote",
        choices=["if-better", "always", "never"],
        default="if-better",
        help="make the new model the store's current one: if it beats its parent (the current "
        "model) on the held-out reviewed cases (default), always, or never",
    )
    tune.add_argument(
        "--detector-out",
        default=None,
        metavar="ARTEFACT",
        help="retrain the learned detector on the same accepted masks (with --store)",
    )

    model = add_command(sub, "model", "the store's registered models: list them, choose the current one")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    listing = add_command(model_sub, "list", "registered models (oldest first) and why each was promoted")
    add_store_argument(listing, "the flywheel's store")
    use = add_command(model_sub, "use", "make a registered model (or the official weights) the current one")
    add_store_argument(use, "the flywheel's store")
    use.add_argument(
        "sha256",
        nargs="?",
        default=None,
        metavar="SHA256",
        help="the model's sha256 (a unique prefix) or 'base'",
    )
    use.add_argument(
        "--why", default="chosen by hand (medsam-engine model use)", help="recorded with the choice"
    )

    rnd = add_command(sub, "round", "one data-engine round: annotate, route, export the review queue")
    rnd_sub = rnd.add_subparsers(dest="round_command", required=True, metavar="ACTION")
    run = add_command(rnd_sub, "run", "annotate what is new or stale for the current model and route it")
    run.add_argument("inputs", nargs="*", metavar="INPUT", help="files or folders, as for annotate")
    run.add_argument("--store", required=True, metavar="STORE", help="the flywheel's store")
    add_prompt_options(run, checkpoint_help="default: the store's current registered model")
    add_run_options(run)
    run.add_argument("--review-out", default=None, metavar="DIR", help="default: STORE/_review/round-NNN")
    run.add_argument(
        "--marks",
        action="append",
        default=[],
        metavar="DIR",
        help="reviewers' marks on the cases a person reviewed: GSPS/SR files or folders (repeatable), or "
        "pacs: for DICOMweb inputs, those in each case's study. The new findings they mark are segmented "
        "as the marks detector does, added to the accepted instances and sent back to review (default: "
        "the marks detector's marks=, when it is the round's detector)",
    )
    add_pacs_options(run)
    add_engine_options(run)
    report = add_command(rnd_sub, "report", "the table and plot over all rounds")
    add_store_argument(report, "the flywheel's store")


def review(args) -> int:
    store = CaseStore(args.store)
    if not store.committed_cases():
        print(f"medsam-engine review: no committed case in {args.store}", file=sys.stderr)
        return EXIT_USAGE
    if args.review_command == "export":
        result = export_queue(store, args.out, formats=tuple(args.formats), limit=args.limit)
        for entry in result.cases:
            print(
                f"{entry['rank']:4d} {entry['case_id']}  {entry['review_status']:8s} worst score "
                f"{entry['worst_score'] if entry['worst_score'] is not None else float('nan'):.3f}"
            )
        for case_id, reason in result.skipped.items():
            print(f"skipped  {case_id}  {reason}")
        print(f"{len(result.cases)} case(s) to review -> {Path(args.out).resolve()}; report: {result.report}")
        return EXIT_OK
    if args.review_command == "calibrate":
        print(json.dumps(calibrate_store(store, threshold=args.edit_dice_threshold), indent=1))
        return EXIT_OK

    with tempfile.TemporaryDirectory(prefix="medsam-pulled-") as pulled:
        try:
            sources = _pull_from_pacs(store, args.corrections, Path(pulled))
            report = import_corrections(store, sources, reviewer=args.reviewer) if sources else None
        except ReadError as exc:
            print(f"medsam-engine review import: {exc.reason}", file=sys.stderr)
            return EXIT_CASES_FAILED
        except ValueError as exc:
            print(f"medsam-engine review import: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if report is None:
        print("nothing to import: no SEG in the PACS is newer than its case's proposal")
        return EXIT_OK
    if not (report.imported or report.already or report.errors):
        given = ", ".join(args.corrections)
        print(
            f"medsam-engine review import: no correction (label map or DICOM SEG of a case) in {given}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    for name, reason in report.errors.items():
        print(f"error    {name}  {reason}")
    for case_id, edit in report.imported.items():
        print(f"accepted {case_id}  {edit['edit_voxels']} voxels changed, Dice {edit['edit_dice']:.4f}")
    if report.imported:
        write_round_table(store)  # each round's record and table get the review outcomes of its proposals
    for case_id in report.already:
        print(f"already  {case_id}  holds this correction")
    if report.errors:
        print(
            "nothing imported: fix the files above and run the import again"
            if not report.imported
            else "the cases above were not imported: run the import again (imported cases are kept once)",
            file=sys.stderr,
        )
        return EXIT_CASES_FAILED
    return EXIT_OK


def _pull_from_pacs(store, sources: list[str], folder: Path) -> list[str]:
    """``sources`` with each DICOMweb service root replaced by the corrections pulled from it."""
    out = []
    for source in sources:
        if not is_service_root(source):
            out.append(source)
            continue
        files, left = pull_corrections(store, source, folder)
        for case_id, why in left.items():
            print(f"left     {case_id}  {why}")
        out += [str(f) for f in files]
    return out


def finetune(args) -> int:
    from medsam_engine.pipeline.flywheel.finetune import FinetuneOptions, finetune

    if args.images and (not args.labels or len(args.labels) != len(args.images)):
        print("medsam-engine finetune: give one --masks map per --images entry", file=sys.stderr)
        return EXIT_USAGE
    if args.detector_out and not args.store:
        print("medsam-engine finetune: --detector-out needs --store", file=sys.stderr)
        return EXIT_USAGE
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"medsam-engine finetune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    whole = device == "cuda" if args.whole_model == "auto" else args.whole_model == "yes"
    counts_bad = args.folds < 2 or args.eval_boxes < 1 or args.epochs < 0 or args.minutes < 0
    if counts_bad or not 0 <= args.tolerance < 1:
        print(
            "medsam-engine finetune: --folds must be at least 2, --eval-boxes at least 1, --epochs and "
            "--minutes at least 0 and --tolerance in [0, 1)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    options = FinetuneOptions(
        epochs=args.epochs,
        folds=args.folds,
        tolerance=args.tolerance,
        lr=args.lr,
        minutes=args.minutes,
        max_slices=args.max_slices,
        boxes_per_epoch=args.boxes_per_epoch,
        eval_boxes=args.eval_boxes,
        device=device,
        train_encoder=whole,
        promote=args.promote,
        encoder_stages=0 if whole else args.encoder_stages,
        augment=args.augment,
        weight_by_edit=args.weight_by_edit,
    )
    store = CaseStore(args.store) if args.store else None
    try:
        entry = finetune(
            args.out,
            store=store,
            images=args.images,
            label_maps=args.labels,
            parent=args.parent,
            options=options,
        )
    except (ValueError, CheckpointError) as exc:
        print(f"medsam-engine finetune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.detector_out and entry.get("sha256"):
        from medsam_engine.pipeline.flywheel.finetune import retrain_detector

        entry = retrain_detector(store, entry, args.detector_out)
    shown = {
        k: entry[k]
        for k in (
            "sha256",
            "parent_sha256",
            "checkpoint",
            "trained",
            "data",
            "metrics",
            "promotion",
            "seconds",
            "registry",
        )
        if k in entry
    }
    shown["metrics"] = {k: v for k, v in entry["metrics"].items() if k not in ("folds", "final_fit")}
    print(json.dumps(shown | ({"detector": entry["detector"]} if "detector" in entry else {}), indent=1))
    print(finetune_summary(entry), file=sys.stderr)
    return EXIT_OK


def finetune_summary(entry: dict) -> str:
    """One line: what was learned from what, and whether it was written and promoted."""
    learned = entry["data"].get("learned_from")
    if entry.get("sha256") is None:
        return f"medsam-engine finetune: {entry['promotion']['why']}"
    return (
        f"medsam-engine finetune: learned from {learned['boxes']} boxes on {learned['slices']} slices of "
        f"{len(learned['cases'])} case(s) ({len(entry['data']['kinds'])} kind(s)); wrote "
        f"{entry['checkpoint']} ({entry['sha256'][:12]}); {entry['promotion']['why']}"
    )


def model_lines(store) -> list[str]:
    """One line per registered model (oldest first): sha256, current / promoted / held, when, and why (with
    the held-out Dice it was judged on)."""
    current = (current_model(store) or {}).get("sha256")
    lines = []
    for entry in registered_models(store):
        if entry.get("sha256") is None and "sha256" in entry:  # a fine-tuning run that trained nothing
            lines.append(
                f"{'(none)':12s}  {'untrained':8s}  {entry.get('created_at', '')[:19]}  "
                f"{(entry.get('promotion') or {}).get('why', '')}"
            )
            continue
        mark = "current" if entry.get("sha256") == current else "promoted" if is_promoted(entry) else "held"
        why = (entry.get("promotion") or {}).get("why", "registered before promotion rules")
        lines.append(f"{str(entry.get('sha256'))[:12]}  {mark:8s}  {entry.get('created_at', '')[:19]}  {why}")
    if current is None:
        lines.append("the official LiteMedSAM weights are current")
    return lines


def model_command(args) -> int:
    store = CaseStore(args.store)
    if args.model_command == "use":
        try:
            entry = set_current(store, args.sha256, why=args.why)
        except ValueError as exc:
            print(f"medsam-engine model use: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"current model: {entry['sha256'] if entry else 'the official LiteMedSAM weights'}")
        return EXIT_OK
    print("\n".join(model_lines(store)))
    return EXIT_OK


def round_command(args) -> int:
    if args.round_command == "report":
        store = CaseStore(args.store)
        print(format_table(round_rows(store)))
        tuned = finetune_rows(store)
        if tuned:
            print("fine-tuning per kind (held-out Dice from cross-validation):")
            print(format_finetune_table(tuned))
        for kind, path in write_round_table(store).items():
            print(f"{kind}: {path}")
        print("models:")
        print("\n".join("  " + line for line in model_lines(store)))
        return EXIT_OK
    return _round_run(args, CaseStore(args.store))


def _round_run(args, store) -> int:
    # the learned detector defaults to the flywheel's current detector artefact, if the store has one
    artefact = ((current_model(store) or {}).get("detector") or {}).get("artefact")
    defaults = {"learned": {"artefact": artefact}} if artefact else None
    config = run_config(args, "round run", detector_defaults=defaults, checkpoint_in_config=False)
    if config is None:
        return EXIT_USAGE
    try:
        marks = marks_options(args.marks, config)
    except ValueError as exc:
        print(f"medsam-engine round run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.engine == "ray":
        return round_on_ray(args, config)
    try:
        options = DiscoveryOptions(
            keep_localizers=args.keep_localizers,
            keep_derived=args.keep_derived,
            pacs_query=pacs_filters(args.pacs_query),
            marks_from_pacs=config.prompts.marks_from_pacs(),
            study_marks=marks is not None and marks_from_pacs(marks),
        )
        cases = discover_inputs(args.inputs, store, coarse_masks=args.coarse_mask, options=options)
    except ValueError as exc:
        print(f"medsam-engine round run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    live = RunProgress(len(cases), verbose=args.verbose > 0, every_s=0 if args.quiet else None)
    # --push-seg reads the source series after the round: what the cases read from the cache goes after it
    keep = config.store.keep_cache
    cache = CacheLifecycle(store.cache_dir(), cases, keep=keep, defer=True) if args.push_seg else None
    with live:
        result = run_round(
            cases,
            store,
            config,
            checkpoint=args.checkpoint,
            queue_dir=args.review_out,
            on_outcome=lambda outcome: live.case_ended(outcome.record(), outcome.reason),
            cache=cache,
            marks=marks,
        )
    report = result.report
    for outcome in result.failed:
        if outcome.case_id not in live.reported:
            print(case_line(outcome.record(), outcome.reason))
    print(f"round {result.number}: {json.dumps(report['cases'])}; routing {json.dumps(report['routing'])}")
    marks_failed = bool(report.get("marks", {}).get("failed"))
    if "marks" in report:
        print("\n".join(marks_lines(report["marks"])))
    print(f"review queue: {report['queue']['cases']} case(s) -> {result.queue_dir}")
    print(f"round report: {result.report_path}")
    push_failed = push_and_print(store, result.committed, args.push_seg)
    if cache is not None:
        cache.finish()
    return EXIT_CASES_FAILED if result.failed or push_failed or marks_failed else EXIT_OK
