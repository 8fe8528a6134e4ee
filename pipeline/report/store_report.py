"""The store report (`medsam-engine report`): one self-contained HTML page for a whole store.

``OUT/report.html`` holds everything it shows (pictures as base64 PNG, its own styles, no script, nothing
fetched), so it opens from a file anywhere. In order:

1. the summary (pipeline/report/summary.py): cases committed, failed by stage with their reasons,
   quarantined, unreadable; instances; routes when the store was routed; per label name the cases,
   instances and volume in mL (area in mm² for 2D images), with the label's colour;
2. the worst instances (lowest quality score, else lowest predicted IoU), each a crop around its box prompt
   on its key slice (the prompted slice with the largest box): the image in the window the model saw it in,
   the box, the masks tinted and outlined in the store's colours;
3. per case (worst first, up to ``cases``): a few slices spread over its labelled ones, with a legend.

Without a stored image (``store.write_image: false``) the masks are drawn on grey, and the page says so. A
case that cannot be read is listed with the reason instead of its pictures.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.core.atomic import write_text_atomic
from medsam_engine.pipeline.core.provenance import package_version, utc_stamp
from medsam_engine.pipeline.report.html_page import CasePictures, Ranked, ReportContent, render_page
from medsam_engine.pipeline.report.pictures import (
    Box,
    display_modality,
    display_slices,
    display_window,
    instance_crop,
    png_data_uri,
    slice_picture,
    spread_slices,
)
from medsam_engine.pipeline.report.qc import instance_score
from medsam_engine.pipeline.report.summary import StoreCases, case_volumes, read_cases, reason_of, summarize
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.inventory import input_given

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"


def worst_instances(cases: StoreCases, count: int) -> list[Ranked]:
    """The ``count`` instances with the lowest quality score (else predicted IoU), lowest first; instances
    with neither (a reviewer's) are not ranked."""
    ranked = []
    for case_id, attrs in cases.attrs.items():
        for inst in attrs.instances:
            found = instance_score(inst)
            if found is not None:
                ranked.append(Ranked(found[1], found[0], case_id, inst))
    ranked.sort(key=lambda r: (r.value, r.case_id, int(r.instance["label"]), int(r.instance["instance"])))
    return ranked[: max(count, 0)]


def case_order(cases: StoreCases) -> list[str]:
    """Case ids, the one with the worst-ranked instance first; cases without a ranked instance last."""

    def key(case_id: str) -> tuple[float, str]:
        found = [instance_score(inst) for inst in cases.attrs[case_id].instances]
        values = [f[1] for f in found if f is not None]
        return (min(values) if values else float("inf"), case_id)

    return sorted(cases.attrs, key=key)


def key_slice(inst: dict, labels: np.ndarray) -> tuple[int, Box] | None:
    """(z, box) an instance is pictured on: of its prompted slices, the one with the largest box; without
    boxes (a reviewer's instance), the slice where its label has most voxels, boxed by its extent there;
    None when neither exists."""
    boxes = [
        (int(z), (int(b[0]), int(b[1]), int(b[2]), int(b[3])))
        for z, b in zip(inst.get("slices") or [], inst.get("boxes_xyxy") or [], strict=False)
        if 0 <= int(z) < labels.shape[0]
    ]
    if boxes:
        return max(boxes, key=lambda zb: ((zb[1][2] - zb[1][0] + 1) * (zb[1][3] - zb[1][1] + 1), -zb[0]))
    mask = labels == int(inst["label"])
    counts = mask.reshape(labels.shape[0], -1).sum(axis=1)
    if not counts.any():
        return None
    z = int(np.argmax(counts))
    ys, xs = np.nonzero(mask[z])
    return z, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def draw_case(
    store: CaseStore, case_id: str, cases: StoreCases, instances: list[dict], *, per_case: int
) -> CasePictures:
    """The crops of ``instances`` (of this case) and ``per_case`` overview slices, from one read of the
    case's label map and image."""
    attrs = cases.attrs[case_id]
    labels, _ = store.read_labels(case_id)
    image = store.read_image(case_id)
    colours = cases.colours(case_id)
    keys = {(int(i["label"]), int(i["instance"])): (key_slice(i, labels), int(i["label"])) for i in instances}
    overview = spread_slices(labels, per_case)
    default = display_window(attrs)
    wanted: dict = defaultdict(set)
    for found, label in keys.values():
        if found is not None:
            wanted[display_window(attrs, label)].add(found[0])
    wanted[default].update(overview)
    shown = {} if image is None else display_slices(image, display_modality(attrs), wanted)
    crops = {}
    for key, (found, label) in keys.items():
        if found is not None:
            z, box = found
            window = display_window(attrs, label)
            picture = instance_crop(shown.get((window, z)), labels[z], box, label=label, colours=colours)
            crops[key] = (z, png_data_uri(picture))
    slices = [
        (z, png_data_uri(slice_picture(shown.get((default, z)), labels[z], colours=colours)))
        for z in overview
    ]
    window = "" if default is None else f"L {default[0]:g} / W {default[1]:g}"
    return CasePictures(crops, slices, image is not None, window)


def write_store_report(
    store: CaseStore, out_dir: str | Path, *, worst: int = 12, cases: int = 50, per_case: int = 3
) -> Path:
    """Write OUT/report.html for the whole store (see the module doc): the ``worst`` lowest-ranked
    instances as crops, ``per_case`` slices of each of up to ``cases`` cases (worst first). Returns its
    path."""
    found = read_cases(store)
    volumes, unreadable = case_volumes(store, list(found.attrs))
    unreadable = {**found.unreadable, **unreadable}
    ranked = [r for r in worst_instances(found, worst) if r.case_id not in unreadable]
    pictured = [c for c in case_order(found) if c not in unreadable][: max(cases, 0)]
    pictures: dict[str, CasePictures] = {}
    for case_id in dict.fromkeys([r.case_id for r in ranked] + pictured):
        mine = [r.instance for r in ranked if r.case_id == case_id]
        try:  # a damaged image or label chunk: the case's reason on the page, not a traceback
            pictures[case_id] = draw_case(store, case_id, found, mine, per_case=per_case)
        except Exception as exc:
            log.warning("case %s cannot be pictured: %s", case_id, reason_of(exc))
            unreadable[case_id] = f"pictures: {reason_of(exc)}"
    summary = summarize(store, found, volumes, unreadable)
    content = ReportContent(
        store=store.url if "://" in store.url else str(Path(store.url).resolve()),
        written=f"{utc_stamp()} by medsam-engine {package_version()}",
        summary=summary,
        ranked=tuple(r for r in ranked if r.case_id in pictures),
        pictured=tuple(c for c in pictured if c in pictures),
        cases=found,
        pictures=pictures,
        volumes=volumes,
        inputs={case_id: input_given(store, case_id) for case_id in pictures},
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / REPORT_NAME, render_page(content))
