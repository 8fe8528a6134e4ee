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
the case's ``review_status`` (auto-accepted / review / rejected) and ``round``. Cases a person accepted
(``review_status == "accepted"``) are never re-annotated by a round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.job import annotate
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.core.atomic import write_text_atomic
from medsam_engine.pipeline.core.outcome import CaseOutcome
from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.flywheel.registry import current_model, registered_models
from medsam_engine.pipeline.flywheel.review import calibrate_store, export_queue
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


def split_accepted(store: CaseStore, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(ids to annotate, ids kept because a person accepted them)."""
    todo, kept = [], []
    for case_id in case_ids:
        attrs = store.attributes(case_id)
        (kept if attrs is not None and attrs.review_status == ACCEPTED else todo).append(case_id)
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
) -> RoundResult:
    """Round n+1 in this process: begin it, annotate the cases not accepted by a person with its model
    (cases committed with the same signature are skipped), route them, export the review queue and write
    the round report. ``cases`` are CaseRefs (pipeline.io.discover); ``on_outcome`` receives each case's
    outcome as it ends. What the cases read from the cache is removed after the review queue, whose DICOM
    SEGs read the source series, is exported (pipeline/io/cache.py), unless the caller passes its own
    deferred ``cache`` (and finishes it after its own readers). flows/round.py runs the same round over
    Ray."""
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
        return finish_round(
            store,
            start,
            summary.outcomes,
            given=len(cases),
            kept=len(kept),
            model_sha256=runner.model_sha256,
            queue_dir=queue_dir,
            runner_stats=summary.runner_stats,
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
    """Per proposal round: reviewed instances, the share accepted with minor edits (edit Dice >= threshold),
    mean voxels changed and mean Dice of proposal vs correction; from the accepted cases' records."""
    per_round: dict[int, list[dict]] = {}
    for attrs in store.all_attributes().values():
        if attrs.review_status != ACCEPTED:
            continue
        for inst in attrs.instances:
            if inst.get("edit_dice") is not None and inst.get("stage") != "manual":
                per_round.setdefault(int(inst.get("round", 1)), []).append(inst)
    out = {}
    for number, rows in sorted(per_round.items()):
        dices = np.array([r["edit_dice"] for r in rows], float)
        voxels = [r.get("edit_voxels") or 0 for r in rows]
        out[number] = {
            "reviewed": len(rows),
            "accepted_minor_edit": round(float((dices >= threshold).mean()), 4),
            "mean_edit_voxels": round(float(np.mean(voxels)), 1),
            "mean_edit_dice": round(float(dices.mean()), 4),
        }
    return out


def round_rows(store: CaseStore) -> list[dict]:
    """One row per round: its report's figures and the review outcomes of its proposals."""
    reviews = review_outcomes(store)
    rows = []
    for name in list_records(store, ROUNDS):
        if not name.startswith("round-"):
            continue
        report = read_record(store, ROUNDS, name) or {}
        number = int(report.get("round", 0))
        routing = report.get("routing", {})
        review = reviews.get(number, {})
        rows.append(
            {
                "round": number,
                "model": str(report.get("model", {}).get("sha256", ""))[:12],
                "annotated": report.get("cases", {}).get("annotated"),
                "seconds_per_case": report.get("seconds_per_case"),
                "auto_acceptance_rate": routing.get("auto_acceptance_rate"),
                "queued": report.get("queue", {}).get("cases"),
                "reviewed": review.get("reviewed", 0),
                "accepted_minor_edit": review.get("accepted_minor_edit"),
                "mean_edit_voxels": review.get("mean_edit_voxels"),
                "mean_edit_dice": review.get("mean_edit_dice"),
            }
        )
    return rows


COLUMNS = (
    "round",
    "model",
    "annotated",
    "seconds_per_case",
    "auto_acceptance_rate",
    "queued",
    "reviewed",
    "accepted_minor_edit",
    "mean_edit_voxels",
    "mean_edit_dice",
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
    stores."""
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
    """Write the PNG plot at ``path``: rates per round (auto-acceptance, accepted with minor edits, mean edit
    Dice) and seconds per case (matplotlib, a dependency, loaded here: only `round report` plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [r["round"] for r in rows]
    fig, (rates, seconds) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, name in (
        ("auto_acceptance_rate", "auto-accepted"),
        ("accepted_minor_edit", "minor edit only"),
        ("mean_edit_dice", "Dice proposal vs correction"),
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
