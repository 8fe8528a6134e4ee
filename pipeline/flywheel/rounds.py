"""The data-engine round: annotate what is new or stale for the current model, route, export the review
queue, and report (`medsam-engine round run` / `round report`).

Store records of the flywheel (JSON, written whole; readers never see a partial file):

    STORE/_rounds/current.json        {"round": n}: the round in progress or last run
    STORE/_rounds/round-NNN.json      one report per round (see :func:`run_round`)
    STORE/_rounds/rounds.md, .png     the table and plot over all rounds
    STORE/_quality/calibration.json   the score calibration the routing uses (refit at each round)
    STORE/_models/<sha16>.json        registered fine-tuned models (pipeline/flywheel/finetune.py)
    STORE/_review/round-NNN/          the review queue exported at each round (pipeline/flywheel/review.py)

Per case, the annotate run stores quality scores with each instance and, when routing is on (round run),
the case's ``review_status`` (auto-accepted / review / rejected) and ``round``. Cases a person reviewed
(accepted, or sent back to review with instances added from marks) are never re-annotated by a round; a
round given marks adds the new findings the reviewers marked in them (pipeline/flywheel/marked_findings.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsam_engine.detectors.marks import MarksOptions
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.job import annotate
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.core.atomic import write_text_atomic
from medsam_engine.pipeline.core.outcome import CaseOutcome
from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.core.types import CaseAttributes
from medsam_engine.pipeline.flywheel.marked_findings import add_marked_findings
from medsam_engine.pipeline.flywheel.registry import current_model, registered_models
from medsam_engine.pipeline.flywheel.review import REVIEWED_STAGES, calibrate_store, export_queue
from medsam_engine.pipeline.io.cache import CacheLifecycle
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.queries import ACCEPTED
from medsam_engine.pipeline.store.records import (
    ROUNDS,
    current_round,
    list_records,
    read_record,
    write_record,
)

log = logging.getLogger(__name__)


# -- one round --------------------------------------------------------------------------------------------
@dataclass
class RoundResult:
    number: int
    report: dict
    report_path: str
    queue_dir: str | None
    failed: list = field(default_factory=list)
    committed: list[str] = field(default_factory=list)  # ids of the cases done or skipped (committed)


def reviewed(attrs: CaseAttributes) -> bool:
    """Whether a person reviewed the case: it is accepted, or holds instances a person accepted (a case sent
    back to review for the instances its marks added)."""
    return attrs.review_status == ACCEPTED or any(i.get("stage") in REVIEWED_STAGES for i in attrs.instances)


def split_accepted(store: CaseStore, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(ids to annotate, ids kept because a person reviewed them: :func:`reviewed`)."""
    todo, kept = [], []
    for case_id in case_ids:
        attrs = store.attributes(case_id)
        (kept if attrs is not None and reviewed(attrs) else todo).append(case_id)
    return todo, kept


@dataclass(frozen=True)
class RoundStart:
    """A round begun: its number (a round killed before its record is completed, not skipped), the model it
    uses and the configuration to annotate with (that model, routing on)."""

    number: int
    resumed: bool
    started_at: str
    checkpoint: str | None
    registered: bool
    config: EngineConfig
    calibration: dict


def begin_round(store: CaseStore, config: EngineConfig, *, checkpoint: str | None = None) -> RoundStart:
    """Refit the calibration on the reviews so far, pick the model (``checkpoint``, else the newest registered
    model, else the base model) and mark round n+1 as in progress (STORE/_rounds/current.json)."""
    number = current_round(store)
    resumed = number > 0 and read_record(store, ROUNDS, f"round-{number:03d}.json") is None
    number = number if resumed else number + 1
    started = utc_stamp()
    registered = current_model(store) if checkpoint is None else None
    checkpoint = checkpoint or (registered or {}).get("checkpoint")
    config = config.with_overrides(model={"checkpoint": checkpoint}, quality={"route": True})
    calibration = calibrate_store(store, threshold=config.quality.edit_dice_threshold)
    write_record(store, {"round": number, "started_at": started}, ROUNDS, "current.json")
    return RoundStart(number, resumed, started, checkpoint, bool(registered), config, calibration)


def finish_round(
    store: CaseStore,
    start: RoundStart,
    outcomes: list[CaseOutcome],
    *,
    given: int,
    kept: int,
    model_sha256: str,
    queue_dir: str | Path | None = None,
    runner_stats: dict | None = None,
    extra: dict | None = None,
) -> RoundResult:
    """Export the review queue (``queue_dir``, else STORE/_review/round-NNN for a local store), count the
    routes of the cases annotated now and write the round report and the table over rounds."""
    number = start.number
    queue_dir = (
        Path(queue_dir)
        if queue_dir
        else (Path(store.root) / "_review" / f"round-{number:03d}" if store.is_local else None)
    )
    queue = export_queue(store, queue_dir) if queue_dir is not None else None
    done = [o for o in outcomes if o.status == "done"]

    def count(status):
        return sum(o.status == status for o in outcomes)

    report = {
        "round": number,
        "started_at": start.started_at,
        "resumed": start.resumed,
        "finished_at": utc_stamp(),
        "model": {"sha256": model_sha256, "checkpoint": start.checkpoint, "registered": start.registered},
        "cases": {
            "given": given,
            "annotated": len(done),
            "skipped": count("skipped"),
            "failed": count("failed"),
            "quarantined": count("quarantined"),
            "kept_accepted": kept,
        },
        "seconds_per_case": round(float(np.mean([o.seconds for o in done])), 2) if done else None,
        "routing": _routing([o.case_id for o in done], store),
        "calibration": start.calibration,
        "queue": {"cases": len(queue.cases) if queue else 0, "folder": str(queue_dir) if queue_dir else None},
        "runner": runner_stats or {},
        **(extra or {}),
    }
    path = write_record(store, report, ROUNDS, f"round-{number:03d}.json")
    write_round_table(store)
    failed = [o for o in outcomes if o.status == "failed"]
    committed = [o.case_id for o in outcomes if o.status in ("done", "skipped")]
    return RoundResult(number, report, path, str(queue_dir) if queue_dir else None, failed, committed)


def run_round(
    cases: list,
    store: CaseStore,
    config: EngineConfig,
    *,
    checkpoint: str | None = None,
    queue_dir: str | Path | None = None,
    runner=None,
    on_outcome=None,
    cache: CacheLifecycle | None = None,
    marks: MarksOptions | None = None,
) -> RoundResult:
    """Round n+1 in this process: begin it, annotate the cases not reviewed by a person with its model
    (cases committed with the same signature are skipped), route them, add the new findings of ``marks``
    (the reviewers' GSPS/SR marks, read as the marks detector reads them) to the reviewed cases, export the
    review queue and write the round report. ``cases`` are CaseRefs (pipeline.io.discover); ``on_outcome``
    receives each case's outcome as it ends. What the cases read from the cache is removed after the review
    queue, whose DICOM SEGs read the source series, is exported (pipeline/io/cache.py), unless the caller
    passes its own deferred ``cache`` (and finishes it after its own readers). flows/round.py runs the same
    round over Ray."""
    start = begin_round(store, config, checkpoint=checkpoint)
    todo_ids, kept = split_accepted(store, [c.case_id for c in cases])
    wanted = set(todo_ids)
    todo = [c for c in cases if c.case_id in wanted]
    runner = runner or LazyRunner(start.config)
    lifecycle = cache or CacheLifecycle(
        store.cache_dir(), cases, keep=start.config.store.keep_cache, defer=True
    )
    try:
        summary = annotate(
            todo, store, start.config, overwrite=True, runner=runner, on_outcome=on_outcome, cache=lifecycle
        )
        extra = None
        if marks is not None:
            reviewed_cases = [c for c in cases if c.case_id not in wanted]
            found = add_marked_findings(
                reviewed_cases,
                store,
                start.config,
                marks,
                runner,
                number=start.number,
                run_id=f"round-{start.number:03d}-marks",
            )
            extra = {"marks": found}
        return finish_round(
            store,
            start,
            summary.outcomes,
            given=len(cases),
            kept=len(kept),
            model_sha256=runner.model_sha256,
            queue_dir=queue_dir,
            runner_stats=summary.runner_stats,
            extra=extra,
        )
    finally:
        if cache is None:
            lifecycle.finish()


def _routing(case_ids: list[str], store: CaseStore) -> dict:
    """Instance routes and case statuses of the cases annotated this round."""
    instances = {"auto-accepted": 0, "review": 0, "rejected": 0}
    statuses: dict[str, int] = {}
    for case_id in case_ids:
        attrs = store.attributes(case_id)
        if attrs is None:
            continue
        status = attrs.review_status or "none"
        statuses[status] = statuses.get(status, 0) + 1
        for inst in attrs.instances:
            chosen = (inst.get("quality") or {}).get("route")
            if chosen in instances:
                instances[chosen] += 1
    total = sum(instances.values())
    return {
        "instances": instances,
        "cases": statuses,
        "auto_acceptance_rate": round(instances["auto-accepted"] / total, 4) if total else None,
    }


# -- the table and plot over rounds ----------------------------------------------------------------------
def review_outcomes(store: CaseStore, *, threshold: float = 0.9) -> dict[int, dict]:
    """Per proposal round, from the accepted cases' records: instances reviewed, the share accepted without
    an edit and with minor edits (edit Dice >= threshold), the mean voxels changed, mean Dice and 1 - Dice of
    proposal vs correction, the mean distance between their boundaries (mm), the masks edited and the cases
    reviewed."""
    per_round: dict[int, list[dict]] = {}
    cases: dict[int, set[str]] = {}
    for case_id, attrs in store.all_attributes().items():
        if attrs.review_status != ACCEPTED:
            continue
        for inst in attrs.instances:
            if inst.get("edit_dice") is not None and inst.get("stage") != "manual":
                number = int(inst.get("round", 1))
                per_round.setdefault(number, []).append(inst)
                cases.setdefault(number, set()).add(case_id)
    out = {}
    for number, rows in sorted(per_round.items()):
        dices = np.array([r["edit_dice"] for r in rows], float)
        voxels = [r.get("edit_voxels") or 0 for r in rows]
        distances = [float(r["edit_boundary_mm"]) for r in rows if r.get("edit_boundary_mm") is not None]
        edited = sum(v > 0 for v in voxels)
        out[number] = {
            "reviewed": len(rows),
            "reviewed_cases": len(cases[number]),
            "unedited": round(1 - edited / len(rows), 4),
            "edited": edited,
            "accepted_minor_edit": round(float((dices >= threshold).mean()), 4),
            "mean_edit_voxels": round(float(np.mean(voxels)), 1),
            "mean_edit_dice": round(float(dices.mean()), 4),
            "mean_one_minus_dice": round(float(1 - dices.mean()), 4),
            "mean_boundary_mm": round(float(np.mean(distances)), 3) if distances else None,
        }
    return out


def round_rows(store: CaseStore) -> list[dict]:
    """One row per round, the data engine's figures as SA-1B and MedSAM2 report theirs: masks proposed and
    per case, the automatic (auto-accepted) and reviewed shares, the share of reviewed masks accepted without
    an edit, the edit size (1 - Dice and boundary distance between proposal and correction) and the effort it
    implies (masks edited per reviewed case), with the round's time per case. Instances added to reviewed
    cases from the reviewers' marks (``marks_added``, in ``marks_cases`` cases) count as proposed."""
    reviews = review_outcomes(store)
    rows = []
    for name in list_records(store, ROUNDS):
        if not name.startswith("round-"):
            continue
        report = read_record(store, ROUNDS, name) or {}
        number = int(report.get("round", 0))
        routing = report.get("routing", {})
        review = reviews.get(number, {})
        annotated = report.get("cases", {}).get("annotated")
        marks = report.get("marks") or {}
        amended = marks.get("cases_amended") or 0
        proposed = sum((routing.get("instances") or {}).values()) + (marks.get("added") or 0) or None
        proposed_for = (annotated or 0) + amended
        reviewed = review.get("reviewed", 0)
        rows.append(
            {
                "round": number,
                "model": str(report.get("model", {}).get("sha256", ""))[:12],
                "annotated": annotated,
                "seconds_per_case": report.get("seconds_per_case"),
                "proposed": proposed,
                "masks_per_case": round(proposed / proposed_for, 2) if proposed and proposed_for else None,
                "marks_added": marks.get("added"),
                "marks_cases": amended if marks else None,
                "auto_acceptance_rate": routing.get("auto_acceptance_rate"),
                "queued": report.get("queue", {}).get("cases"),
                "reviewed": reviewed,
                "reviewed_share": round(reviewed / proposed, 4) if proposed and reviewed else None,
                "unedited": review.get("unedited"),
                "accepted_minor_edit": review.get("accepted_minor_edit"),
                "mean_edit_voxels": review.get("mean_edit_voxels"),
                "mean_edit_dice": review.get("mean_edit_dice"),
                "mean_one_minus_dice": review.get("mean_one_minus_dice"),
                "mean_boundary_mm": review.get("mean_boundary_mm"),
                "edits_per_case": _per_case(review.get("edited"), review.get("reviewed_cases")),
            }
        )
    return rows


def _per_case(count: int | None, cases: int | None) -> float | None:
    return round(count / cases, 2) if count is not None and cases else None


def record_review_outcomes(store: CaseStore) -> list[int]:
    """Write each round's review outcomes (:func:`review_outcomes`) into its round record (``review``);
    returns the rounds updated. Called after corrections are imported and by `round report`."""
    updated = []
    for number, outcome in review_outcomes(store).items():
        name = f"round-{number:03d}.json"
        report = read_record(store, ROUNDS, name)
        if report is not None and report.get("review") != outcome:
            write_record(store, {**report, "review": outcome}, ROUNDS, name)
            updated.append(number)
    return updated


COLUMNS = (
    "round",
    "model",
    "annotated",
    "seconds_per_case",
    "proposed",
    "masks_per_case",
    "marks_added",
    "auto_acceptance_rate",
    "queued",
    "reviewed",
    "reviewed_share",
    "unedited",
    "accepted_minor_edit",
    "mean_one_minus_dice",
    "mean_boundary_mm",
    "edits_per_case",
)


def format_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """A Markdown table of :func:`round_rows` (empty cells where a figure does not exist yet)."""
    cell = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def finetune_rows(store: CaseStore) -> list[dict]:
    """One row per fine-tuning run and kind, oldest first: the round whose corrections it learned from, the
    model written (or none), the cases learned from, the kind's held-out boxes and Dice before (the parent)
    and after, and whether the model was promoted and why."""
    rows = []
    for entry in registered_models(store):
        per_kind = (entry.get("metrics") or {}).get("per_kind") or {}
        promotion = entry.get("promotion") or {}
        cases = (entry.get("data") or {}).get("cases") or []
        for kind, figures in sorted(per_kind.items()):
            rows.append(
                {
                    "round": entry.get("round"),
                    "model": str(entry.get("sha256") or "(none)")[:12],
                    "cases": len(cases),
                    "kind": kind,
                    "heldout_boxes": figures.get("boxes"),
                    "dice_before": figures.get("before"),
                    "dice_after": figures.get("after"),
                    "promoted": "yes" if promotion.get("promoted") else "no",
                    "why": promotion.get("why"),
                }
            )
    return rows


FINETUNE_COLUMNS = (
    "round",
    "model",
    "cases",
    "kind",
    "heldout_boxes",
    "dice_before",
    "dice_after",
    "promoted",
    "why",
)


def format_finetune_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`finetune_rows` (fine-tuning per round and kind)."""
    return format_table(rows, FINETUNE_COLUMNS)


def write_round_table(store: CaseStore) -> dict[str, str]:
    """STORE/_rounds/rounds.md (the rounds, then fine-tuning per kind) and rounds.png (the plot); local
    stores. Each round's record gets its review outcomes first."""
    record_review_outcomes(store)
    rows = round_rows(store)
    if not store.is_local:
        return {}
    folder = Path(store.root) / ROUNDS
    folder.mkdir(parents=True, exist_ok=True)
    tuned = finetune_rows(store)
    text = format_table(rows) + "\n"
    if tuned:
        text += (
            "\nFine-tuning per kind (held-out Dice from cross-validation):\n\n"
            + format_finetune_table(tuned)
            + "\n"
        )
    write_text_atomic(folder / "rounds.md", text)
    plot_rounds(rows, folder / "rounds.png")
    return {"table": str(folder / "rounds.md"), "plot": str(folder / "rounds.png")}


def plot_rounds(rows: list[dict], path: Path) -> None:
    """Write the PNG plot at ``path``: rates per round (auto-acceptance, accepted without an edit, accepted
    with minor edits, edit size as 1 - Dice) and seconds per case (matplotlib, a dependency, loaded here:
    only `round report` plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [r["round"] for r in rows]
    fig, (rates, seconds) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, name in (
        ("auto_acceptance_rate", "auto-accepted"),
        ("unedited", "accepted without an edit"),
        ("accepted_minor_edit", "minor edit only"),
        ("mean_one_minus_dice", "edit size (1 - Dice)"),
    ):
        values = [np.nan if r.get(key) is None else r[key] for r in rows]
        rates.plot(numbers, values, marker="o", label=name)
    rates.set(xlabel="round", ylim=(0, 1.02), title="review outcomes")
    rates.legend(fontsize=8)
    seconds.bar(numbers, [r.get("seconds_per_case") or 0 for r in rows])
    seconds.set(xlabel="round", ylabel="s per case", title="time per case")
    for axis in (rates, seconds):
        axis.set_xticks(numbers)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
