"""The HTML of the store report (pipeline/report/store_report.py gathers what it shows): one page with its
styles inline, pictures as PNG data URIs, a table of contents, no script and nothing fetched.

Every text that comes from the store (case ids, label names, inputs, reasons) is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Collection
from dataclasses import dataclass

from medsam_engine.pipeline.report.summary import INSTANCE_MAP_ROW, StoreCases, StoreSummary
from medsam_engine.pipeline.store.labels_meta import is_instance_map, label_colour

STYLE = """
:root { color-scheme: light; }
body { margin: 0; background: #f4f6f8; color: #1c2430;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1220px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 28px; margin: 0 0 2px; }
h2 { font-size: 22px; margin: 44px 0 12px; padding-bottom: 4px; border-bottom: 2px solid #cfd6de; }
h3 { font-size: 17px; margin: 26px 0 8px; }
h4 { font-size: 15px; margin: 16px 0 6px; }
a { color: #1f5fbf; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.muted { color: #5b6675; }
nav.toc { background: #fff; border: 1px solid #d5dbe2; border-radius: 8px; padding: 10px 22px;
          margin: 18px 0; }
nav.toc ol { margin: 4px 0; padding-left: 22px; }
nav.toc ol.case-list { columns: 4 14em; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0 4px; }
.card { background: #fff; border: 1px solid #d5dbe2; border-radius: 8px; padding: 8px 16px;
        min-width: 110px; }
.card b { display: block; font-size: 26px; line-height: 1.2; }
.card.bad b { color: #b3261e; }
.card.good b { color: #1d7a3a; }
table { border-collapse: collapse; background: #fff; margin: 6px 0 14px; }
th, td { border: 1px solid #d5dbe2; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #e9edf2; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td { max-width: 640px; overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 13px; height: 13px; margin-right: 6px; vertical-align: -2px;
          border: 1px solid rgba(0, 0, 0, .35); border-radius: 3px; }
.swatch.many { background: conic-gradient(#e6194b, #ffe119, #3cb44b, #4363d8, #911eb4, #e6194b); }
.note { background: #fff6dc; border-left: 4px solid #e0a800; padding: 6px 12px; margin: 8px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(262px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #d5dbe2; border-radius: 8px; padding: 8px; }
figure img { display: block; max-width: 100%; height: auto; border-radius: 4px; background: #000; }
figcaption { font-size: 13px; margin-top: 6px; }
.case { background: #fff; border: 1px solid #d5dbe2; border-radius: 8px; padding: 4px 18px 14px;
        margin: 14px 0; }
.case h3 { margin-top: 12px; }
.slices { display: flex; flex-wrap: wrap; gap: 12px; }
.slices figure { border: none; padding: 0; }
ul.legend { list-style: none; padding: 0; margin: 6px 0 10px; display: flex; flex-wrap: wrap; gap: 4px 18px; }
footer { margin-top: 48px; font-size: 13px; color: #5b6675; }
"""


@dataclass(frozen=True)
class Ranked:
    """One instance of the worst list: what it is ranked by (``what``: "score" or "predicted IoU") and the
    value, its case and its lineage record."""

    value: float
    what: str
    case_id: str
    instance: dict


@dataclass(frozen=True)
class CasePictures:
    """A case's pictures as PNG data URIs: ``crops`` by (label, instance) with the slice they show,
    ``slices`` (z, picture) spread over its labelled slices; ``has_image``: False when the store kept no
    image (masks on grey); ``window``: the CT window of ``slices`` ("" for other modalities)."""

    crops: dict[tuple[int, int], tuple[int, str]]
    slices: list[tuple[int, str]]
    has_image: bool
    window: str


@dataclass(frozen=True)
class ReportContent:
    """Everything the page shows: the store's location, when and by what it was ``written``, the summary,
    the ``ranked`` worst instances, the ``pictured`` case ids (worst first), the cases' attributes and
    meanings, their pictures, label volumes (case id -> value -> mL) and inputs as given."""

    store: str
    written: str
    summary: StoreSummary
    ranked: tuple[Ranked, ...]
    pictured: tuple[str, ...]
    cases: StoreCases
    pictures: dict[str, CasePictures]
    volumes: dict[str, dict[int, float]]
    inputs: dict[str, str]


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _swatch(rgb: tuple[int, int, int] | None) -> str:
    if rgb is None:
        return "<span class='swatch many'></span>"
    return f"<span class='swatch' style='background:rgb({rgb[0]},{rgb[1]},{rgb[2]})'></span>"


def _amount(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _table(headers: list[str], rows: list[list[str]], numeric: Collection[int] = ()) -> str:
    """An HTML table; cells are HTML already; columns in ``numeric`` align right."""

    def cell(tag: str, index: int, text: str) -> str:
        return f"<{tag} class='num'>{text}</{tag}>" if index in numeric else f"<{tag}>{text}</{tag}>"

    head = "".join(cell("th", i, _e(h)) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _case_link(case_id: str, pictured: set[str]) -> str:
    code = f"<code>{_e(case_id)}</code>"
    return f"<a href='#case-{_e(case_id)}'>{code}</a>" if case_id in pictured else code


def _cards(summary: StoreSummary) -> str:
    stuck = [f for f in summary.failures if f.quarantined]
    cards = [
        ("good", summary.committed - len(summary.unreadable), "cases committed"),
        ("bad" if summary.failures else "", len(summary.failures) - len(stuck), "cases failed"),
        ("bad" if stuck else "", len(stuck), "quarantined"),
        ("bad" if summary.unreadable else "", len(summary.unreadable), "cannot be read"),
        ("", summary.instances, "instances"),
    ]
    cards += [("", n, route) for route, n in summary.routes.items()]
    return (
        "<div class='cards'>"
        + "".join(f"<div class='card {kind}'><b>{n:,}</b>{_e(what)}</div>" for kind, n, what in cards)
        + "</div>"
    )


def _labels(summary: StoreSummary) -> str:
    if not summary.labels:
        return "<p class='muted'>No label in any committed case.</p>"
    volume = any(r.volume_ml is not None for r in summary.labels)
    area = any(r.area_mm2 is not None for r in summary.labels)
    headers = ["label", "values", "cases", "instances"]
    headers += ["volume (mL)"] * volume + ["area (mm², 2D images)"] * area
    rows = []
    for row in summary.labels:
        values = ", ".join(str(v) for v in row.values[:6]) + (" …" if len(row.values) > 6 else "")
        cells = [f"{_swatch(row.rgb)}{_e(row.name)}", _e(values), f"{row.cases:,}", f"{row.instances:,}"]
        cells += [_amount(row.volume_ml)] * volume + [_amount(row.area_mm2)] * area
        rows.append(cells)
    note = (
        f"<p class='muted'>{_e(INSTANCE_MAP_ROW)}: cases whose label values each mark one object (nuclei, "
        "cells), counted together.</p>"
        if any(r.name == INSTANCE_MAP_ROW for r in summary.labels)
        else ""
    )
    return _table(headers, rows, {2, 3, 4, 5}) + note


def _routes(summary: StoreSummary) -> str:
    if not summary.routes:
        return "<p class='muted'>This store was never routed (no <code>round run</code>): no routes.</p>"
    routes = _table(["route", "instances"], [[_e(k), f"{v:,}"] for k, v in summary.routes.items()], {1})
    review = _table(["review status", "cases"], [[_e(k), f"{v:,}"] for k, v in summary.review.items()], {1})
    return routes + review


def _failures(summary: StoreSummary) -> str:
    if not summary.failures:
        return "<p class='muted'>No failed or quarantined case.</p>"
    parts = []
    for stage, failed in summary.failures_by_stage().items():
        parts.append(f"<h4>at stage <code>{_e(stage)}</code>: {len(failed)} case(s)</h4>")
        rows = [
            [
                f"<code>{_e(f.case_id)}</code>" + (" <b>quarantined</b>" if f.quarantined else ""),
                f"<code>{_e(f.given)}</code>",
                _e(f.reason),
            ]
            for f in failed
        ]
        parts.append(_table(["case", "input", "reason"], rows))
    return "".join(parts)


def _summary(content: ReportContent) -> str:
    summary = content.summary
    unreadable = (
        _table(
            ["case", "why it cannot be read"],
            [[f"<code>{_e(c)}</code>", _e(why)] for c, why in summary.unreadable.items()],
        )
        if summary.unreadable
        else "<p class='muted'>Every committed case could be read.</p>"
    )
    return (
        "<section id='summary'><h2>Summary</h2>"
        + _cards(summary)
        + "<h3 id='labels'>Labels</h3>"
        + _labels(summary)
        + "<h3 id='routes'>Routes</h3>"
        + _routes(summary)
        + "<h3 id='failures'>Failed cases</h3>"
        + _failures(summary)
        + "<h3 id='unreadable'>Cases that cannot be read</h3>"
        + unreadable
        + "</section>"
    )


def _label_name(content: ReportContent, case_id: str, label: int) -> tuple[str, tuple[int, int, int]]:
    meaning = content.cases.meanings.get(case_id, {}).get(label)
    return (meaning.name, meaning.rgb) if meaning else (f"label {label}", label_colour(label))


def _worst(content: ReportContent) -> str:
    if not content.ranked:
        return (
            "<section id='worst'><h2>Worst instances</h2><p class='muted'>No scored instance.</p></section>"
        )
    pictured = set(content.pictured)
    figures = []
    for rank, item in enumerate(content.ranked, 1):
        inst = item.instance
        label, number = int(inst["label"]), int(inst["instance"])
        name, rgb = _label_name(content, item.case_id, label)
        pictures = content.pictures[item.case_id]
        crop = pictures.crops.get((label, number))
        quality = inst.get("quality") or {}
        facts = [f"{item.what} <b>{item.value:.3f}</b>"]
        if item.what == "score" and inst.get("predicted_iou") is not None:
            facts.append(f"predicted IoU {float(inst['predicted_iou']):.3f}")
        if quality.get("route"):
            facts.append(_e(quality["route"]))
        where = f" · z {crop[0]}" if crop else ""
        image = (
            f"<img src='{crop[1]}' alt='{_e(name)} in case {_e(item.case_id)}, slice {crop[0]}'>"
            if crop
            else "<p class='note'>no slice to show: the instance has no box and no mask</p>"
        )
        grey = "" if pictures.has_image else "<br><span class='muted'>no image stored: mask on grey</span>"
        figures.append(
            f"<figure>{image}<figcaption><b>{rank}.</b> {_swatch(rgb)}<b>{_e(name)}</b> "
            f"<span class='muted'>(label {label}, instance {number})</span><br>{' · '.join(facts)}<br>"
            f"case {_case_link(item.case_id, pictured)}{where}{grey}</figcaption></figure>"
        )
    return (
        "<section id='worst'><h2>Worst instances</h2><p>The "
        f"{len(content.ranked)} instance(s) with the lowest quality score (else the lowest predicted IoU), "
        "lowest first: each a crop around its box prompt (white) on its key slice, the prompted slice with "
        "the largest box, with the masks in their label colours.</p>"
        f"<div class='grid'>{''.join(figures)}</div></section>"
    )


def _legend(content: ReportContent, case_id: str) -> str:
    attrs = content.cases.attrs[case_id]
    volumes = content.volumes.get(case_id, {})
    objects = [int(i["label"]) for i in attrs.instances]
    flat = attrs.geometry.shape[0] == 1
    unit = "mm²" if flat else "mL"
    scale = 1000.0 / attrs.geometry.spacing[0] if flat else 1.0
    if is_instance_map(objects, flat=flat):
        total = sum(volumes.values()) * scale
        return (
            f"<ul class='legend'><li>{_swatch(None)}{len(set(objects))} objects (an instance map), each in "
            f"its own colour: {_amount(total)} {unit} in all</li></ul>"
        )
    items = []
    for value in sorted(set(objects) | set(volumes)):
        name, rgb = _label_name(content, case_id, value)
        size = f"{_amount(volumes.get(value, 0.0) * scale)} {unit}" if value in volumes else "not in the map"
        items.append(
            f"<li>{_swatch(rgb)}<b>{_e(name)}</b> <span class='muted'>({value})</span>: "
            f"{objects.count(value)} instance(s), {size}</li>"
        )
    return f"<ul class='legend'>{''.join(items)}</ul>"


def _case(content: ReportContent, case_id: str) -> str:
    attrs, pictures = content.cases.attrs[case_id], content.pictures[case_id]
    z, y, x = attrs.geometry.shape
    spacing = " × ".join(f"{s:.3g}" for s in attrs.geometry.spacing)
    found = [(i.get("quality") or {}).get("score") for i in attrs.instances]
    scores = [float(s) for s in found if s is not None]
    facts = [
        _e(attrs.modality),
        f"{z} × {y} × {x} voxels (z, y, x)",
        f"spacing {spacing} mm",
        f"{len(attrs.instances)} instance(s)",
    ]
    facts += [f"worst score {min(scores):.3f}"] * bool(scores)
    facts += [f"review status {_e(attrs.review_status)}"] * bool(attrs.review_status)
    given = content.inputs.get(case_id)
    facts += [f"input <code>{_e(given)}</code>"] * bool(given)
    note = (
        ""
        if pictures.has_image
        else "<p class='note'>This store kept no image of the case (<code>store.write_image: false</code>): "
        "the masks are drawn on grey.</p>"
    )
    window = f" · CT {_e(pictures.window)}" if pictures.window else ""
    figures = "".join(
        f"<figure><img src='{uri}' alt='case {_e(case_id)}, slice {z_index}'>"
        f"<figcaption>slice z {z_index} of {z}{window}</figcaption></figure>"
        for z_index, uri in pictures.slices
    )
    return (
        f"<article class='case' id='case-{_e(case_id)}'><h3>case <code>{_e(case_id)}</code></h3>"
        f"<p class='muted'>{' · '.join(facts)}</p>{_legend(content, case_id)}{note}"
        f"<div class='slices'>{figures or '<p class=muted>No labelled slice.</p>'}</div></article>"
    )


def _cases(content: ReportContent) -> str:
    shown = len(content.pictured)
    total = len(content.cases.attrs)
    more = f" ({total - shown} more not pictured: <code>--cases N</code>)" if total > shown else ""
    return (
        f"<section id='cases'><h2>Cases</h2><p>{shown} of {total} readable committed case(s), the one with "
        f"the worst instance first{more}: slices spread over the labelled ones, masks in their label "
        "colours.</p>" + "".join(_case(content, c) for c in content.pictured) + "</section>"
    )


def _toc(content: ReportContent) -> str:
    cases = "".join(f"<li><a href='#case-{_e(c)}'><code>{_e(c)}</code></a></li>" for c in content.pictured)
    return (
        "<nav class='toc'><b>Contents</b><ol>"
        "<li><a href='#summary'>Summary</a>: <a href='#labels'>labels</a> · <a href='#routes'>routes</a> · "
        "<a href='#failures'>failed cases</a> · <a href='#unreadable'>cases that cannot be read</a></li>"
        f"<li><a href='#worst'>Worst instances</a> ({len(content.ranked)})</li>"
        f"<li><a href='#cases'>Cases</a> ({len(content.pictured)})<ol class='case-list'>{cases}</ol></li>"
        "</ol></nav>"
    )


def render_page(content: ReportContent) -> str:
    """The whole page as one HTML document."""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>MedSAM Engine report: {_e(content.store)}</title><style>{STYLE}</style></head><body><main>"
        f"<h1>MedSAM Engine report</h1><p class='muted'>store <code>{_e(content.store)}</code> · written "
        f"{_e(content.written)}</p>"
        + _toc(content)
        + _summary(content)
        + _worst(content)
        + _cases(content)
        + "<footer>Pictures are embedded in this file; it needs no network and no other file.</footer>"
        + "</main></body></html>\n"
    )
