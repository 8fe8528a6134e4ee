"""New findings in reviewed cases from the reviewers' marks (SA-1B's semi-automatic stage, MedSAM2's lesion
data engine).

A reviewer who finds a missed lesion in a reviewed case does not paint a mask: they draw a RECIST line, an
arrow or an ellipse on it in their viewer, stored as a GSPS graphic or a TID 1500 measurement. A round given
marks (`round run --marks DIR|pacs`) then, for every case a person reviewed
(pipeline/flywheel/rounds.py's ``split_accepted``):

1. keeps every instance the case holds as it is: its label map is only added to, where it is empty;
2. reads the marks made for the case that no earlier round used (PR/SR files or folders, or ``pacs``: those
   of a DICOMweb case's study), places them and groups them into findings as the marks detector does
   (detectors/marks.py). Marks drawn on images that are not the case's (another series in another Frame of
   Reference) belong to other cases and are left alone. A finding whose seed on its key slice lies mostly
   (``COVERED``: half its pixels or more) inside one instance's mask there is that instance: nothing new,
   unless its box there covers less than ``NESTED`` (a quarter) of that instance's area: then it is a finding
   within the instance (a lesion measured in an accepted organ), a new one. The seed is what the marks
   detector's seed map holds: the pixels along the finding's lines (a measured axis runs across its object,
   so a cross on an accepted organ lies in it whatever box the axes give), else its box (an arrow's square,
   an ellipse's box);
3. segments the new findings by the marks rules, propagated from their key slices
   (pipeline/annotate/driver.py's ``segment_detection``), adds them as new instances (lineage:
   ``prompt_origin`` as the marks detector records it, ``round``, and for a finding within an instance
   ``within``: that instance's label and number), and commits the case through the store with
   ``review_status: review``, so the round's queue sends it back to a person for the new instances only (the
   earlier version is kept under ``_previous/``). New instances are written where the case holds no label,
   and over the instances that findings lie within (a lesion's voxels leave its organ's mask, as in a label
   map of organs and their lesions; the organ's record then counts the voxels it keeps).

Label values of new findings: a finding named like a label of the case (an SR finding code, a GSPS layer)
takes that label's value and the next instance number; an unnamed finding or one with another name keeps the
value the marks detector gives it (``label``, 1) when the case does not use it, else the next value above
every value the case uses.

The case's attributes record the marks used (``marks_used``: keyed hashes of the SOP instance UID and the
mark's index in that object, so a mark is looked at once whatever folder or PACS it is read from again; a
mark refused for what it is, off the image or of an unknown graphic type, stays refused) and, per round,
what the marks gave (``mark_rounds``: instances added, findings covered by which instance, marks refused with
the reason). A case whose new marks add nothing is committed unchanged but for that record; the marks a case
was annotated from by the marks detector are found covered by the instances they made, the first time a round
looks at them. Logs name cases and counts, never a mark's UID or text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from medsam_engine.detectors.marks import (
    FROM_PACS,
    MarksDetector,
    MarksOptions,
    group_findings,
    marks_from_pacs,
    place_marks,
)
from medsam_engine.detectors.marks_files import ImagePlane, RawMark, case_planes
from medsam_engine.detectors.protocol import Detection
from medsam_engine.detectors.registry import validate_options
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.annotate.driver import segment_detection
from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
from medsam_engine.pipeline.annotate.quality import assess_instances, load_calibration
from medsam_engine.pipeline.core.errors import CaseError, PromptError, ReadError
from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.core.types import CaseAttributes, CaseRef, Volume
from medsam_engine.pipeline.io.discover import materialise
from medsam_engine.pipeline.io.readers import read_case
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.labels_meta import meanings_from_properties, spec_of
from medsam_engine.pipeline.store.leases import leased

log = logging.getLogger(__name__)

COVERED = 0.5  # a finding is an instance the case holds when this share of its seed lies in its mask
NESTED = 0.25  # ... unless its box covers less than this share of that instance's area: a finding within it


def marks_options(given: list[str], config: EngineConfig) -> MarksOptions | None:
    """The marks a round adds new findings from: ``given`` (``--marks``: paths, or ``pacs`` alone; with the
    marks detector's rules when it is the round's detector), else the marks detector's own options, else
    None. ValueError naming the option when they are invalid."""
    own = dict(config.prompts.options) if config.prompts.detector == "marks" else None
    if not given and own is None:
        return None
    pacs = [value for value in given if value.lower() in FROM_PACS]
    if pacs and len(given) > 1:
        raise ValueError("--marks pacs takes the marks of each case's study: give it alone, without paths")
    missing = [path for path in given if not pacs and not Path(path).exists()]
    if missing:
        raise ValueError(f"--marks: no such file or folder: {', '.join(missing)}")
    options = {**(own or {}), **({"marks": pacs[0] if pacs else list(given)} if given else {})}
    return cast(MarksOptions, validate_options("marks", options))


def mark_key(store: CaseStore, mark: RawMark) -> str:
    """The keyed hash that names a mark: its PR/SR's SOP instance UID and its index among that object's
    marks (no UID survives it)."""
    return store.case_id(f"mark|{mark.source_uid}|{mark.index}")


@dataclass
class CaseMarks:
    """What one case's marks gave in a round: instances added ({label, instance, key_slice, rule}), findings
    covered by an instance the case holds ({marks: names, label, instance}), marks refused ("name: why") and
    the keys of the marks used now."""

    added: list[dict[str, Any]] = field(default_factory=list)
    covered: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    used: list[str] = field(default_factory=list)

    def record(self, number: int) -> dict[str, Any]:
        return {"round": number, "added": self.added, "covered": self.covered, "refused": self.refused}


def covering(
    labels: np.ndarray, instances: tuple[dict, ...], z: int, seed: np.ndarray, *, share: float = COVERED
):
    """The (label, instance) whose mask on slice ``z`` of the (z, y, x) label map holds at least ``share``
    of the (y, x) boolean ``seed`` pixels, or None. Of a label's instances, the one whose slices include
    ``z``."""
    values, counts = np.unique(labels[z][seed], return_counts=True)
    inside = values > 0
    if not inside.any() or counts[inside].max() < share * max(int(seed.sum()), 1):
        return None
    value = int(values[inside][int(np.argmax(counts[inside]))])
    records = [i for i in instances if int(i["label"]) == value]
    on_slice = [i for i in records if z in i.get("slices", [])] or records
    return value, int(on_slice[0]["instance"]) if on_slice else 1


def within(box: tuple[int, int, int, int], host: np.ndarray) -> bool:
    """Whether a finding whose box on its key slice is ``box`` (x0, y0, x1, y1, inclusive) and whose seed
    lies in the instance whose (y, x) mask there is ``host`` is a finding within that instance (its box
    covers less than :data:`NESTED` of the instance's area) rather than that instance (a cross measuring an
    organ spans it)."""
    x0, y0, x1, y1 = box
    return (x1 - x0 + 1) * (y1 - y0 + 1) < NESTED * int(host.sum())


def own_marks(raw: list[RawMark], own: dict[str, ImagePlane], planes: dict[str, ImagePlane]) -> list[RawMark]:
    """The marks drawn on the case: on its own images, or in its Frame of Reference (3D coordinates, or
    images of another series found with the marks)."""
    frame = next(iter(own.values())).frame_of_reference
    out = []
    for mark in raw:
        if mark.image is not None:
            plane = own.get(mark.image) or planes.get(mark.image)
            mine = mark.image in own or (
                plane is not None and bool(frame) and plane.frame_of_reference == frame
            )
        else:
            mine = bool(frame) and mark.frame_of_reference == frame
        if mine:
            out.append(mark)
    return out


def fresh_marks(store: CaseStore, raw: list[RawMark], used: set[str]) -> tuple[list[RawMark], list[str]]:
    """The marks not used before (each once, though several files hold its PR/SR) and their keys."""
    marks, keys = [], []
    for mark in raw:
        key = mark_key(store, mark)
        if key not in used and key not in keys:
            marks.append(mark)
            keys.append(key)
    return marks, keys


class MarkSources:
    """The marks of the round's cases: a folder's files read once for every case, or (``pacs``) each
    DICOMweb case's study's marks, fetched with its series (pipeline/io/pacs_marks.py)."""

    def __init__(self, store: CaseStore, config: EngineConfig, options: MarksOptions) -> None:
        self.store, self.config, self.options = store, config, options
        self.pacs = marks_from_pacs(options)
        self.left_aside: list[str] = []  # files of the folders that hold no usable PR/SR, with why
        self._read: tuple[list[RawMark], dict[str, ImagePlane]] | None = None

    def detector(self, case: CaseRef) -> MarksDetector:
        return MarksDetector(rules=self.config.prompts.box_rules(), options=self.options, case=case)

    def local_case(self, case: CaseRef) -> CaseRef | None:
        """The case with its files local (a DICOMweb series downloaded, with its study's marks for
        ``pacs``), or None when it can have no marks: no marks in its study, or no DICOM series of its own
        (marks are placed through the series' headers)."""
        if self.pacs and not case.marks:
            return None
        case = materialise(case, self.store.cache_dir())
        return case if case.files else None

    def marks_of(self, case: CaseRef) -> tuple[list[RawMark], dict[str, ImagePlane], dict[str, ImagePlane]]:
        """The marks drawn on the case (:func:`own_marks`), the planes of the other images found with them
        and the planes of the case's own images; no marks for a case whose images have no plane of their
        own (multi-frame), unless the marks are its study's (``pacs``): then PromptError, as for
        unreadable marks."""
        detector = self.detector(case)
        try:
            if self.pacs:
                raw, planes, _ = detector.read()
            else:
                if self._read is None:
                    raw, planes, self.left_aside = detector.read()
                    self._read = (raw, planes)
                raw, planes = self._read
            own = case_planes(case.files)
            if not own and self.pacs:
                own = detector.own_planes()  # raises, naming why
        except ValueError as exc:
            raise PromptError(str(exc), case_id=case.case_id) from exc
        return (own_marks(raw, own, planes) if own else []), planes, own


def amend_case(
    case: CaseRef,
    store: CaseStore,
    sources: MarkSources,
    runner: LazyRunner,
    *,
    number: int,
    run_id: str,
) -> CaseMarks | None:
    """Add the new findings of a reviewed case's marks not used before (see the module doc) and commit it;
    None when it has no such marks (nothing beyond the marks' headers and the series' was read). Raises
    CaseError (PromptError for marks that cannot be read) for this case alone."""
    local = sources.local_case(case)
    if local is None:
        return None
    raw, planes, own = sources.marks_of(local)
    if not raw:
        return None
    with leased(store, case.case_id, run_id=run_id, ttl_s=sources.config.store.lease_ttl_s) as lease:
        if lease is None:
            raise CaseError(
                "the case is being annotated or reviewed by another run now", case_id=case.case_id
            )
        labels, attrs = store.read_labels(case.case_id)
        fresh, keys = fresh_marks(store, raw, set(attrs.raw.get("marks_used") or ()))
        if not fresh:
            return None
        volume = read_case(local)
        if volume.shape != labels.shape:
            raise ReadError(
                f"the input's grid {volume.shape} is no longer the reviewed case's {labels.shape}",
                case_id=case.case_id,
            )
        detector = sources.detector(local)
        found, new, hosts = _sort_findings(fresh, keys, planes, own, volume, labels, attrs, detector)
        additions = None
        if new:
            additions = _segment_new(
                new, hosts, volume, labels, attrs, local, found, sources, runner, number=number
            )
            found.added = [_added_entry(record) for record in additions.instances]
        _commit(store, case.case_id, labels, attrs, found, additions, sources.config, number=number)
    return found


def _sort_findings(
    fresh: list[RawMark],
    keys: list[str],
    planes: dict[str, ImagePlane],
    own: dict[str, ImagePlane],
    volume: Volume,
    labels: np.ndarray,
    attrs: CaseAttributes,
    detector: MarksDetector,
) -> tuple[CaseMarks, list, list[tuple[int, int] | None]]:
    """Place the fresh marks and group them into findings; returns what they gave so far (the findings an
    instance covers, the marks refused, the keys of the marks looked at), the new findings and, for each,
    the (label, instance) it lies within or None."""
    placed, refused = place_marks(fresh, planes, own, volume)
    found = CaseMarks(refused=[f"{mark.name}: {why}" for mark, why in refused], used=list(keys))
    new: list = []
    hosts: list[tuple[int, int] | None] = []
    for finding in group_findings(placed):
        detection = detector.detection([finding], volume, [])
        z, seed = _seed(detection, labels.shape[1:])
        hit = covering(labels, attrs.instances, z, seed)
        if hit is None or within(detection.prompts[0].box, labels[z] == hit[0]):
            new.append(finding)
            hosts.append(hit)
        else:
            names = [p.mark.name for p in finding.marks]
            found.covered.append({"marks": names, "key_slice": z, "label": hit[0], "instance": hit[1]})
    return found, new, hosts


def _seed(detection: Detection, shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
    """A one-finding Detection's key slice and its seed there as a (y, x) boolean mask: the pixels of its
    seed map (along its lines, else its box), else its box."""
    prompt = detection.prompts[0]
    if detection.label_map is not None:
        return prompt.z, detection.label_map[prompt.z] > 0
    x0, y0, x1, y1 = prompt.box
    seed = np.zeros(shape, dtype=bool)
    seed[y0 : y1 + 1, x0 : x1 + 1] = True
    return prompt.z, seed


def _label_specs(store: CaseStore, case_id: str) -> dict[int, dict]:
    """The case's label names, codes and colours as they are (to commit them again unchanged)."""
    return {
        value: spec_of(meaning)
        for value, meaning in meanings_from_properties(store.label_properties(case_id)).items()
    }


def fit_labels(
    detection: Detection, labels: np.ndarray, instances: tuple[dict, ...], specs: dict[int, dict]
) -> Detection:
    """The Detection renumbered into the case: label values and instance numbers by the rule of the module
    doc (``specs``: the case's label names by value)."""
    taken = set(specs) | {int(i["label"]) for i in instances} | {int(v) for v in np.unique(labels)}
    by_name = {str(s.get("name") or "").lower(): v for v, s in specs.items() if s.get("name")}
    value_of: dict[int, int] = {}
    for value in sorted({p.label for p in detection.prompts}):
        name = (detection.label_names.get(value) or "").lower()
        if name and name in by_name:
            value_of[value] = by_name[name]
        else:
            value_of[value] = value if value not in taken else max(taken) + 1
        taken.add(value_of[value])
    last: dict[int, int] = {}
    for record in instances:
        label = int(record["label"])
        last[label] = max(last.get(label, 0), int(record["instance"]))
    key_of = {}
    for prompt in detection.prompts:
        label = value_of[prompt.label]
        last[label] = last.get(label, 0) + 1
        key_of[(prompt.label, prompt.instance)] = (label, last[label])
    return renumbered(detection, value_of, key_of)


def renumbered(
    detection: Detection, value_of: dict[int, int], key_of: dict[tuple[int, int], tuple[int, int]]
) -> Detection:
    """The Detection with label values mapped by ``value_of`` and (label, instance) keys by ``key_of``."""

    def moved(item):
        label, instance = key_of[(item.label, item.instance)]
        return replace(item, label=label, instance=instance)

    seeds = None
    if detection.label_map is not None:
        table = np.zeros(max([*value_of, int(detection.label_map.max())]) + 1, dtype=np.uint16)
        for old, new in value_of.items():
            table[old] = new
        seeds = table[detection.label_map]
    return Detection(
        [moved(p) for p in detection.prompts],
        seeds,
        {value_of[v]: name for v, name in detection.label_names.items() if v in value_of},
        objects=None if detection.objects is None else [moved(o) for o in detection.objects],
        warnings=detection.warnings,
        origins={key_of[k]: origin for k, origin in detection.origins.items() if k in key_of},
        window_kinds={value_of[v]: kind for v, kind in detection.window_kinds.items() if v in value_of},
    )


@dataclass(frozen=True)
class Additions:
    """A case's new instances from marks: its (z, y, x) label map with them written (where it was empty or
    held an instance they lie within), the case's instances as they are now (a host's ``voxels`` counted
    again), the new instances' records (lineage, quality, round), the label specs of the whole case and the
    new instances' quality summary."""

    labels: np.ndarray
    before: list[dict]
    instances: list[dict]
    names: dict[int, Any]
    quality: dict


def _segment_new(
    new: list,
    hosts: list[tuple[int, int] | None],
    volume: Volume,
    labels: np.ndarray,
    attrs: CaseAttributes,
    case: CaseRef,
    found: CaseMarks,
    sources: MarkSources,
    runner: LazyRunner,
    *,
    number: int,
) -> Additions:
    """Segment the new findings (the marks detector's seeds, propagated), write them where the case holds no
    instance and, for a finding within an instance (``hosts``: that (label, instance) per finding, or None),
    over that instance's voxels inside the finding's own boxes; score them. A finding none of whose mask
    could be written is noted as covered instead."""
    notes: list[str] = []
    detection = sources.detector(case).detection(new, volume, notes)
    found.refused.extend(notes)  # marks of a finding off its key slice
    specs = _label_specs(sources.store, attrs.case_id)
    detection = fit_labels(detection, labels, attrs.instances, specs)
    segmented = segment_detection(volume, detection, sources.config, runner)
    merged = labels.copy()
    free = (labels == 0) & (segmented.labels > 0)
    finding_of = {(p.label, p.instance): f for p, f in zip(detection.prompts, new, strict=True)}
    host_of = {(p.label, p.instance): h for p, h in zip(detection.prompts, hosts, strict=True)}
    for record in segmented.records:  # a finding within an instance also takes that instance's voxels
        host = host_of[(int(record.label), int(record.instance))]
        if host is not None:
            free |= _boxed(record, labels.shape) & (segmented.labels == record.label) & (labels == host[0])
    host_values = sorted({host[0] for host in hosts if host is not None})
    merged[free] = segmented.labels[free]
    wrote = {int(v) for v in np.unique(merged[free])}
    records = []
    for record in segmented.records:
        key = (int(record.label), int(record.instance))
        if key[0] not in wrote:
            names = [p.mark.name for p in finding_of[key].marks]
            found.covered.append({"marks": names, "label": None, "why": "its mask lies within the case's"})
            continue
        entry = dict(record.to_json(), round=number, prompt_origin=detection.origins.get(key))
        if host_of[key] is not None:
            entry["within"] = {"label": host_of[key][0], "instance": host_of[key][1]}
        records.append(entry)
    instances, quality = assess_instances(
        merged,
        records,
        calibration=load_calibration(sources.store),
        thresholds=sources.config.quality.thresholds(),
    )
    table = sources.config.label_specs()
    for value in {int(r["label"]) for r in instances} - set(specs):
        spec = table.get(value) or detection.label_names.get(value)
        if spec:
            specs[value] = spec
    return Additions(merged, _recounted(attrs.instances, merged, host_values), instances, specs, quality)


def _boxed(record, shape: tuple[int, ...]) -> np.ndarray:
    """The (z, y, x) boolean map of an instance record's boxes on their slices (where it was prompted)."""
    region = np.zeros(shape, dtype=bool)
    for z, (x0, y0, x1, y1) in zip(record.slices, record.boxes, strict=True):
        region[z, int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
    return region


def _recounted(instances: tuple[dict, ...], labels: np.ndarray, values: list[int]) -> list[dict]:
    """The case's instance records with the ``voxels`` of each host label's instance counted again in
    ``labels`` (where the label has one instance; a label of several keeps their records as they were)."""
    single = {v for v in values if sum(int(i["label"]) == v for i in instances) == 1}
    counts = {v: int(np.count_nonzero(labels == v)) for v in single}
    return [dict(i, voxels=counts[int(i["label"])]) if int(i["label"]) in counts else i for i in instances]


def _added_entry(record: dict) -> dict[str, Any]:
    origin = record.get("prompt_origin") or {}
    return {
        "label": record["label"],
        "instance": record["instance"],
        "key_slice": origin.get("key_slice"),
        "rule": origin.get("rule"),
        "slices": len(record.get("slices", [])),
        **({"within": record["within"]} if "within" in record else {}),
    }


def _commit(
    store: CaseStore,
    case_id: str,
    labels: np.ndarray,
    attrs: CaseAttributes,
    found: CaseMarks,
    additions: Additions | None,
    config: EngineConfig,
    *,
    number: int,
) -> None:
    """Commit the case with its additions (sent back to review) or, when its new marks only covered its
    instances, as it was but for the record of the marks used."""
    new = {k: v for k, v in attrs.raw.items() if k != "status"}
    new.update(
        marks_used=sorted(set(attrs.raw.get("marks_used") or ()) | set(found.used)),
        mark_rounds=[*(attrs.raw.get("mark_rounds") or ()), found.record(number)],
    )
    if additions is not None and additions.instances:
        new.update(
            instances=[*additions.before, *additions.instances],
            review_status="review",
            round=number,
            quality=additions.quality,
            committed_at=utc_stamp(),
        )
        labels, names = additions.labels, additions.names
    else:
        names = _label_specs(store, case_id)
    store.commit_case(
        case_id,
        labels=labels,
        attrs=new,
        image=store.read_image(case_id),
        overwrite=True,
        label_names=names,
        keep_versions=config.store.keep_versions,
    )


def add_marked_findings(
    cases: list[CaseRef],
    store: CaseStore,
    config: EngineConfig,
    options: MarksOptions,
    runner: LazyRunner,
    *,
    number: int,
    run_id: str,
) -> dict[str, Any]:
    """:func:`amend_case` for each of ``cases`` (CaseRefs of reviewed cases); a case that fails is named with
    its reason and the others go on. Returns the round record's ``marks`` section: counts (cases amended,
    instances added, findings covered, marks refused) and, per case, what its marks gave."""
    sources = MarkSources(store, config, options)
    section: dict[str, Any] = {
        "source": "pacs" if sources.pacs else "files",
        "cases_with_new_marks": 0,
        "cases_amended": 0,
        "added": 0,
        "covered": 0,
        "refused": 0,
        "failed": {},
        "cases": {},
    }
    for case in cases:
        try:
            found = amend_case(case, store, sources, runner, number=number, run_id=run_id)
        except CaseError as exc:
            reason = exc.reason
            log.error("case %s: marks not added: %s", case.case_id, reason)
            section["failed"][case.case_id] = reason
            continue
        if found is None:
            continue
        section["cases_with_new_marks"] += 1
        section["cases_amended"] += bool(found.added)
        for key in ("added", "covered", "refused"):
            section[key] += len(getattr(found, key))
        section["cases"][case.case_id] = found.record(number)
        log.info(
            "case %s: %d instance(s) added from marks, %d finding(s) covered, %d mark(s) refused",
            case.case_id,
            len(found.added),
            len(found.covered),
            len(found.refused),
        )
    if sources.left_aside:
        section["files_left_aside"] = list(sources.left_aside)
    return section
