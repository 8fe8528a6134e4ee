"""What the store report says about a whole store, as values: cases by status with the failures by stage,
instances by quality route, cases by review status, and per label name the cases, instances and volume.

Read from the store's records and case attributes, and the label volumes from the label maps
(pipeline/store/volumes.py). A case whose group cannot be read (damaged metadata or chunks, an older
layout) is recorded with the reason, never raised: the report is how such a case is found.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from medsam_engine.pipeline.core.types import CaseAttributes
from medsam_engine.pipeline.store.case_store import CASE_SUFFIX, CaseStore
from medsam_engine.pipeline.store.inventory import UNROUTED, input_given
from medsam_engine.pipeline.store.labels_meta import (
    LabelMeaning,
    is_instance_map,
    label_colour,
    meanings_from_properties,
)
from medsam_engine.pipeline.store.records import QUARANTINE, list_records, read_record
from medsam_engine.pipeline.store.volumes import label_volumes_ml

log = logging.getLogger(__name__)

INSTANCE_MAP_ROW = "objects (instance maps)"  # the one label row of every instance map's objects


@dataclass(frozen=True)
class StoreCases:
    """The committed cases that could be read (``attrs`` and label ``meanings`` by case id, sorted) and
    ``unreadable``: case id -> why its group cannot be read."""

    attrs: dict[str, CaseAttributes]
    meanings: dict[str, dict[int, LabelMeaning]]
    unreadable: dict[str, str] = field(default_factory=dict)

    def colours(self, case_id: str) -> dict[int, tuple[int, int, int]]:
        """The case's label colours (RGB 0..255) by value, as its store metadata gives them."""
        return {value: meaning.rgb for value, meaning in self.meanings.get(case_id, {}).items()}


@dataclass(frozen=True)
class Failure:
    """A case that failed and is not committed: the ``stage`` and ``reason`` of its error record, its input
    as ``given``, and whether it is ``quarantined`` (runs skip it until its input, model or config change)."""

    case_id: str
    stage: str
    reason: str
    given: str
    quarantined: bool


@dataclass(frozen=True)
class LabelRow:
    """One label name over the store: its label ``values``, the colour of its first case (None for the
    instance-map row, whose objects each have their own), the cases and instances holding it, its total
    volume in mL over 3D cases and its total area in mm² over 2D images (None when no case of that kind
    holds it)."""

    name: str
    values: tuple[int, ...]
    rgb: tuple[int, int, int] | None
    cases: int
    instances: int
    volume_ml: float | None
    area_mm2: float | None


@dataclass(frozen=True)
class StoreSummary:
    """The report's summary: committed cases (``unreadable`` among them: id -> why), ``failures`` (failed or
    quarantined, not committed), instances, instances by quality route ({} when the store was never
    routed), committed cases by review status (``unrouted`` for none) and the label rows by name."""

    committed: int
    unreadable: dict[str, str]
    failures: tuple[Failure, ...]
    instances: int
    routes: dict[str, int]
    review: dict[str, int]
    labels: tuple[LabelRow, ...]

    def failures_by_stage(self) -> dict[str, list[Failure]]:
        """The failures grouped by the stage they failed at, the stage with the most first."""
        stages = Counter(f.stage for f in self.failures)
        return {stage: [f for f in self.failures if f.stage == stage] for stage, _ in stages.most_common()}


def reason_of(exc: BaseException) -> str:
    """An exception as one line for the page: its type and message, at most 300 characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def read_cases(store: CaseStore) -> StoreCases:
    """Every committed case's attributes and label meanings; the groups that cannot be read, with why."""
    attrs: dict[str, CaseAttributes] = {}
    meanings: dict[str, dict[int, LabelMeaning]] = {}
    unreadable: dict[str, str] = {}
    names = sorted(n[: -len(CASE_SUFFIX)] for n in store.list_names(store.root) if n.endswith(CASE_SUFFIX))
    for case_id in names:
        try:  # any fault of one case's metadata is that case's reason on the page
            found = store.attributes(case_id)
            if found is not None:
                meanings[case_id] = meanings_from_properties(store.label_properties(case_id))
                attrs[case_id] = found
        except Exception as exc:
            log.warning("case %s cannot be read: %s", case_id, reason_of(exc))
            unreadable[case_id] = f"metadata: {reason_of(exc)}"
    return StoreCases(attrs, meanings, unreadable)


def case_volumes(store: CaseStore, case_ids: list[str]) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """(case id -> label value -> mL, case id -> why its label map cannot be read): every label map read, all
    cases in one pass, and case by case when that pass fails, to find the damaged ones."""
    try:
        return label_volumes_ml(store, case_ids, from_maps=True), {}
    except Exception:  # one damaged label map: read the cases one by one to name it
        volumes, unreadable = {}, {}
        for case_id in case_ids:
            try:
                volumes.update(label_volumes_ml(store, [case_id], from_maps=True))
            except Exception as exc:
                log.warning("case %s: label map cannot be read: %s", case_id, reason_of(exc))
                unreadable[case_id] = f"label map: {reason_of(exc)}"
        return volumes, unreadable


def failures(store: CaseStore, committed: set[str]) -> tuple[Failure, ...]:
    """The failed and quarantined cases that are not committed, by case id."""
    errors = store.errors()
    held = {name[: -len(".json")] for name in list_records(store, QUARANTINE)}
    out = []
    for case_id in sorted((set(errors) | held) - committed):
        record = errors.get(case_id) or read_record(store, QUARANTINE, f"{case_id}.json") or {}
        out.append(
            Failure(
                case_id=case_id,
                stage=str(record.get("stage") or "unknown"),
                reason=str(record.get("reason") or "quarantined"),
                given=input_given(store, case_id),
                quarantined=case_id in held,
            )
        )
    return tuple(out)


def label_rows(cases: StoreCases, volumes: dict[str, dict[int, float]]) -> tuple[LabelRow, ...]:
    """One row per label name (by the case's metadata; ``label <v>`` where it has none), the objects of
    instance maps (nuclei, cells) in one row; sorted by label value, the instance-map row last."""
    rows: dict[str, dict] = {}
    for case_id, attrs in cases.attrs.items():
        flat = attrs.geometry.shape[0] == 1
        objects = Counter(int(inst["label"]) for inst in attrs.instances)
        instance_map = is_instance_map(list(objects.elements()), flat=flat)
        sizes = volumes.get(case_id, {})
        for value in sorted(set(objects) | set(sizes)):
            meaning = cases.meanings[case_id].get(value)
            name = INSTANCE_MAP_ROW if instance_map else meaning.name if meaning else f"label {value}"
            rgb = None if instance_map else meaning.rgb if meaning else label_colour(value)
            row = rows.setdefault(
                name, {"values": set(), "rgb": rgb, "cases": set(), "instances": 0, "ml": None, "mm2": None}
            )
            row["values"].add(value)
            row["cases"].add(case_id)
            row["instances"] += objects[value]
            ml = sizes.get(value, 0.0)
            if flat:
                row["mm2"] = (row["mm2"] or 0.0) + ml * 1000.0 / attrs.geometry.spacing[0]
            else:
                row["ml"] = (row["ml"] or 0.0) + ml
    built = [
        LabelRow(
            name=name,
            values=tuple(sorted(row["values"])),
            rgb=row["rgb"],
            cases=len(row["cases"]),
            instances=row["instances"],
            volume_ml=None if row["ml"] is None else round(row["ml"], 3),
            area_mm2=None if row["mm2"] is None else round(row["mm2"], 1),
        )
        for name, row in rows.items()
    ]
    return tuple(sorted(built, key=lambda r: (r.name == INSTANCE_MAP_ROW, r.values[0], r.name)))


def summarize(
    store: CaseStore, cases: StoreCases, volumes: dict[str, dict[int, float]], unreadable: dict[str, str]
) -> StoreSummary:
    """The summary of :class:`StoreSummary`; ``unreadable``: every committed case that could not be read
    (metadata, label map or image), with why."""
    instances = [inst for attrs in cases.attrs.values() for inst in attrs.instances]
    routes = Counter(route for inst in instances if (route := (inst.get("quality") or {}).get("route")))
    review = Counter(attrs.review_status or UNROUTED for attrs in cases.attrs.values())
    return StoreSummary(
        committed=len(set(cases.attrs) | set(unreadable)),
        unreadable=dict(sorted(unreadable.items())),
        failures=failures(store, set(cases.attrs) | set(unreadable)),
        instances=len(instances),
        routes=dict(routes.most_common()),
        review=dict(sorted(review.items())),
        labels=label_rows(cases, volumes),
    )
