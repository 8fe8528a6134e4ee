"""`medsam-engine`: demo, annotate, export, eval (the command-line contract of docs/design.md).

Exit codes: 0 every case done; 1 some cases failed (each recorded with its reason); 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_CASES_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsam-engine", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="annotate bundled real data and report Dice")
    demo.add_argument("--out", default="medsam-demo", help="folder for the store, exports and report")

    ann = sub.add_parser("annotate", help="pre-annotate images with LiteMedSAM")
    ann.add_argument("inputs", nargs="+", metavar="INPUT")
    ann.add_argument("--out", required=True, metavar="STORE")
    ann.add_argument("--coarse-mask", nargs="+", default=[], metavar="MASK")
    ann.add_argument("--detector", default=None)
    ann.add_argument("--box-margin", type=int, default=None, metavar="PX")
    ann.add_argument("--mode", choices=["slice"], default=None)
    ann.add_argument("--checkpoint", default=None)
    ann.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    ann.add_argument("--config", default=None, metavar="FILE")
    ann.add_argument("--overwrite", action="store_true", help="replace cases committed with another signature")

    exp = sub.add_parser("export", help="export committed cases")
    exp.add_argument("store", metavar="STORE")
    exp.add_argument("--format", required=True, choices=["nifti"])
    exp.add_argument("--out", required=True, metavar="DIR")

    ev = sub.add_parser("eval", help="Dice and NSD against reference label maps")
    ev.add_argument("store", metavar="STORE")
    ev.add_argument("--reference", nargs="+", required=True, metavar="MASK")
    ev.add_argument("--json", action="store_true")
    return parser


def _annotate(args) -> int:
    from pydantic import ValidationError

    from pipeline.config import load_config
    from pipeline.discover import discover
    from pipeline.engine import annotate
    from pipeline.store import CaseStore

    try:
        config = load_config(args.config).with_overrides(
            prompts={"detector": args.detector, "box_margin": args.box_margin},
            model={"checkpoint": args.checkpoint, "device": args.device, "mode": args.mode})
    except (ValidationError, OSError, ValueError) as exc:
        print(f"medsam-engine annotate: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.prompts.detector == "coarse-mask" and not args.coarse_mask:
        print("medsam-engine annotate: the coarse-mask detector needs --coarse-mask", file=sys.stderr)
        return EXIT_USAGE
    problem = _model_problem(config)
    if problem:
        print(f"medsam-engine annotate: {problem}", file=sys.stderr)
        return EXIT_USAGE
    store = CaseStore(args.out)
    try:
        cases = discover(args.inputs, store, coarse_masks=args.coarse_mask)
    except ValueError as exc:
        print(f"medsam-engine annotate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from pipeline.model import CheckpointError

    try:
        summary = annotate(cases, store, config, overwrite=args.overwrite)
    except CheckpointError as exc:
        print(f"medsam-engine annotate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for outcome in summary.outcomes:
        line = f"{outcome.status:8s} {outcome.case_id}"
        print(line + (f"  {outcome.reason}" if outcome.status == "failed" else ""))
    print(f"{summary.count('done')} done, {summary.count('skipped')} skipped, {summary.count('failed')} failed "
          f"-> {Path(args.out).resolve()}")
    return EXIT_CASES_FAILED if summary.failed else EXIT_OK


def _model_problem(config) -> str | None:
    """Why the model options cannot work on this machine, or None."""
    if config.model.checkpoint and not Path(config.model.checkpoint).is_file():
        return f"checkpoint not found: {config.model.checkpoint}"
    if config.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "--device cuda was asked for but no CUDA device is visible"
    return None


def _export(args) -> int:
    from pipeline.export import export_nifti
    from pipeline.store import CaseStore

    written = export_nifti(CaseStore(args.store), args.out)
    print(f"wrote {len(written)} NIfTI label maps to {Path(args.out).resolve()}")
    return EXIT_OK


def format_scores(results: dict) -> str:
    lines = [f"{'case':18s} {'label':>5s} {'Dice':>7s} {'NSD':>7s}"]
    for case_id, labels in results.items():
        for label, scores in labels.items():
            lines.append(f"{case_id:18s} {label:5d} {scores['dice']:7.4f} {scores['nsd']:7.4f}")
    return "\n".join(lines)


def _eval(args) -> int:
    from pipeline.evaluate import evaluate_store
    from pipeline.store import CaseStore

    results = evaluate_store(CaseStore(args.store), args.reference)
    if not results:
        print("medsam-engine eval: no reference matched a committed case", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(results, indent=1) if args.json else format_scores(results))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from pipeline.demo import run_demo

        return run_demo(Path(args.out))
    handlers = {"annotate": _annotate, "export": _export, "eval": _eval}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
