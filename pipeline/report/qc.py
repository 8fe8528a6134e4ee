"""QC reports: HTML pages with overlay pictures and per-instance scores, worst first.

``write_report`` covers a whole store; ``write_review_report`` covers the review queue
(pipeline/flywheel/review.py), with each case's worst instances pictured on the slices where they are.
Instances are ordered by their quality score (pipeline/annotate/quality.py) when the case has one, else by the
model's predicted IoU.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.core.atomic import write_text_atomic
from medsam_engine.pipeline.core.intensity import IntensityConfig, to_uint8
from medsam_engine.pipeline.report.pictures import busiest_slices, display_modality, display_window, overlay
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.labels_meta import LabelMeaning, meanings_from_properties

SCORE_COLUMNS = (
    "score",
    "route",
    "predicted_iou",
    "stability",
    "jitter_iou",
    "coverage",
    "box_agreement",
    "slice_iou",
    "area_jump_max",
    "drift_max",
)


def _meanings(store: CaseStore, case_id: str) -> dict[int, LabelMeaning]:
    return meanings_from_properties(store.label_properties(case_id))


def legend(meanings: dict[int, LabelMeaning]) -> str:
    """An HTML legend: each label's colour swatch, value, name and SNOMED CT code."""
    rows = []
    for value, meaning in sorted(meanings.items()):
        red, green, blue = meaning.rgb
        code = f" (SCT {html.escape(meaning.code[0])})" if meaning.code else ""
        rows.append(
            f"<li><span style='display:inline-block;width:1em;height:1em;"
            f"background:rgb({red},{green},{blue})'></span> {value}: {html.escape(meaning.name)}{code}</li>"
        )
    return "<ul class='legend'>" + "".join(rows) + "</ul>" if rows else ""


def _rendered(store: CaseStore, case_id: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 image (z, y, x[, 3]), label map) of a case, or None when the store kept no image."""
    labels, attrs = store.read_labels(case_id)
    image = store.read_image(case_id)
    if image is None:
        return None
    window = display_window(attrs) or (40.0, 400.0)
    return to_uint8(image, display_modality(attrs), IntensityConfig(*window)), labels


def _save_pictures(
    case_id: str,
    rendered,
    slices: list[int],
    out: Path,
    colours: dict[int, tuple[int, int, int]] | None = None,
) -> list[str]:
    import cv2

    u8, labels = rendered
    names = []
    for z in slices:
        name = f"{case_id}_z{z:04d}.png"
        cv2.imwrite(
            str(out / name), cv2.cvtColor(overlay(u8[z], labels[z], colours=colours), cv2.COLOR_RGB2BGR)
        )
        names.append(name)
    return names


def _case_pictures(
    store: CaseStore,
    case_id: str,
    out: Path,
    per_case: int,
    colours: dict[int, tuple[int, int, int]] | None = None,
) -> list[str]:
    """Pictures of the ``per_case`` slices with the most labelled voxels."""
    rendered = _rendered(store, case_id)
    if rendered is None:
        return []
    return _save_pictures(case_id, rendered, busiest_slices(rendered[1], per_case), out, colours)


def instance_score(inst: dict) -> tuple[str, float] | None:
    """(what, value) an instance is ranked by: its quality score ("score"), else the model's predicted IoU
    ("predicted IoU"); None when its lineage record has neither (a reviewer's instance)."""
    value = (inst.get("quality") or {}).get("score")
    if value is not None:
        return "score", float(value)
    iou = inst.get("predicted_iou")
    return None if iou is None else ("predicted IoU", float(iou))


def _order_key(inst: dict) -> float:
    found = instance_score(inst)
    return 0.0 if found is None else found[1]


def _score_cells(inst: dict) -> str:
    quality = inst.get("quality") or {}
    values = {
        **(quality.get("features") or {}),
        "score": quality.get("score"),
        "route": quality.get("route"),
        "predicted_iou": inst.get("predicted_iou"),
        "stability": inst.get("stability"),
    }
    cells = []
    for key in SCORE_COLUMNS:
        value = values.get(key)
        text = f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))
        cells.append("" if value is None else text)
    return "".join(f"<td>{c}</td>" for c in cells)


def _header(first: list[str]) -> str:
    return (
        "<table border=1 cellpadding=3><tr>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in [*first, *SCORE_COLUMNS])
        + "</tr>"
    )


def write_report(store: CaseStore, out_dir: str | Path, *, per_case: int = 3) -> Path:
    """Write OUT/report.html (and its PNGs) for every committed case, worst instance first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case_id in store.committed_cases():
        attrs = store.attributes(case_id)
        for inst in attrs.instances if attrs is not None else ():
            rows.append((_order_key(inst), case_id, inst))
    rows.sort(key=lambda r: r[0])
    parts = [
        "<!doctype html><meta charset='utf-8'><title>MedSAM Engine QC</title>",
        "<h1>QC report</h1><h2>Instances, worst first</h2>",
        _header(["case", "label", "instance", "slices", "voxels", "prompt"]),
    ]
    for _, case_id, inst in rows:
        parts.append(
            f"<tr><td>{html.escape(case_id)}</td><td>{inst['label']}</td><td>{inst['instance']}</td>"
            f"<td>{len(inst['slices'])}</td><td>{inst['voxels']}</td>"
            f"<td>{html.escape(inst['prompt_source'])}</td>{_score_cells(inst)}</tr>"
        )
    parts.append("</table><h2>Overlays</h2>")
    for case_id in store.committed_cases():
        meanings = _meanings(store, case_id)
        pictures = _case_pictures(store, case_id, out, per_case, {v: m.rgb for v, m in meanings.items()})
        if pictures:
            parts.append(f"<h3>case {html.escape(case_id)}</h3>{legend(meanings)}")
        for name in pictures:
            parts.append(f"<figure><img src='{name}'><figcaption>{html.escape(name)}</figcaption></figure>")
    for case_id, error in store.errors().items():
        parts.append(f"<p>failed {html.escape(case_id)}: {html.escape(error['reason'])}</p>")
    path = out / "report.html"
    write_text_atomic(path, "\n".join(parts))
    return path


def _worst_slices(instances: list[dict], per_case: int) -> list[int]:
    """The middle slice of each of the worst instances, up to ``per_case`` distinct slices."""
    chosen: list[int] = []
    for inst in sorted(instances, key=_order_key):
        slices = inst.get("slices") or []
        if slices and slices[len(slices) // 2] not in chosen:
            chosen.append(int(slices[len(slices) // 2]))
        if len(chosen) == per_case:
            break
    return sorted(chosen)


def write_review_report(store: CaseStore, path: str | Path, queue: list[dict], *, per_case: int = 3) -> Path:
    """Write the review queue's HTML page at ``path`` (PNGs beside it): the ``queue`` entries of
    pipeline.flywheel.review in their order (worst first), each with its instance scores and overlays of the
    slices of its worst instances."""
    path = Path(path)
    pictures = path.parent / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!doctype html><meta charset='utf-8'><title>MedSAM Engine review queue</title>",
        f"<h1>Review queue: {len(queue)} case(s), worst first</h1>",
    ]
    for entry in queue:
        case_id = entry["case_id"]
        attrs = store.attributes(case_id)
        instances = sorted(attrs.instances if attrs is not None else (), key=_order_key)
        worst = entry.get("worst_score")
        parts.append(
            f"<h2>{entry.get('rank', '')}. case {html.escape(case_id)} — "
            f"{html.escape(str(entry.get('review_status')))}, worst score "
            f"{'' if worst is None else f'{worst:.3f}'}</h2>"
        )
        files = entry.get("files") or {}
        if files:
            parts.append(
                "<p>"
                + ", ".join(f"{html.escape(k)}: <code>{html.escape(str(v))}</code>" for k, v in files.items())
                + "</p>"
            )
        parts.append(_header(["label", "instance", "slices", "voxels"]))
        for inst in instances:
            parts.append(
                f"<tr><td>{inst['label']}</td><td>{inst['instance']}</td>"
                f"<td>{len(inst['slices'])}</td><td>{inst['voxels']}</td>{_score_cells(inst)}</tr>"
            )
        parts.append("</table>")
        rendered = _rendered(store, case_id)
        if rendered is not None:
            meanings = _meanings(store, case_id)
            parts.append(legend(meanings))
            colours = {v: m.rgb for v, m in meanings.items()}
            for name in _save_pictures(
                case_id, rendered, _worst_slices(instances, per_case), pictures, colours
            ):
                parts.append(
                    f"<figure style='display:inline-block'><img src='pictures/{name}'>"
                    f"<figcaption>{html.escape(name)}</figcaption></figure>"
                )
    write_text_atomic(path, "\n".join(parts))
    return path
