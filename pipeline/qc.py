"""QC report: an HTML page per store with overlay pictures and per-instance scores, worst first."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from pipeline.preprocess import IntensityConfig, to_uint8
from pipeline.store import CaseStore

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]


def overlay(slice_u8: np.ndarray, labels: np.ndarray, *, scale: int = 3) -> np.ndarray:
    """An RGB picture of a (y, x) uint8 slice with each label's contour drawn in its own colour."""
    import cv2

    grey = slice_u8 if slice_u8.ndim == 3 else np.repeat(slice_u8[:, :, None], 3, axis=-1)
    size = (grey.shape[1] * scale, grey.shape[0] * scale)
    picture = cv2.resize(np.ascontiguousarray(grey), size, interpolation=cv2.INTER_LINEAR)
    big = cv2.resize(labels.astype(np.uint16), size, interpolation=cv2.INTER_NEAREST)
    for value in (int(v) for v in np.unique(big) if v != 0):
        contours, _ = cv2.findContours((big == value).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(picture, contours, -1, PALETTE[(value - 1) % len(PALETTE)], 1)
    return picture


def _case_pictures(store: CaseStore, case_id: str, out: Path, per_case: int) -> list[str]:
    import cv2
    import zarr

    labels, attrs = store.read_labels(case_id)
    group = zarr.open_group(str(store.case_path(case_id)), mode="r")
    if "0" not in group:
        return []
    image = np.asarray(group["0"][:])
    if image.ndim == 4:
        image = np.moveaxis(image, 0, -1)
    section = attrs.get("config", {}).get("intensity", {})
    u8 = to_uint8(image, attrs.get("modality", "OT"), IntensityConfig(
        section.get("ct_level", 40.0), section.get("ct_width", 400.0)))
    counts = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    names = []
    for z in sorted(np.argsort(counts)[::-1][:per_case]):
        if counts[z] == 0:
            continue
        name = f"{case_id}_z{z:04d}.png"
        cv2.imwrite(str(out / name), cv2.cvtColor(overlay(u8[z], labels[z]), cv2.COLOR_RGB2BGR))
        names.append(name)
    return names


def write_report(store: CaseStore, out_dir: str | Path, *, per_case: int = 3) -> Path:
    """Write OUT/report.html (and its PNGs) for every committed case, lowest predicted IoU first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case_id in store.committed_cases():
        attrs = store.case_attrs(case_id) or {}
        for inst in attrs.get("instances", []):
            rows.append((inst["predicted_iou"], case_id, inst))
    rows.sort(key=lambda r: r[0])
    parts = ["<!doctype html><meta charset='utf-8'><title>MedSAM Engine QC</title>",
             "<h1>QC report</h1><h2>Instances, worst predicted IoU first</h2>",
             "<table border=1 cellpadding=3><tr><th>case</th><th>label</th><th>instance</th>"
             "<th>slices</th><th>predicted IoU</th><th>voxels</th><th>prompt</th></tr>"]
    for iou, case_id, inst in rows:
        parts.append(f"<tr><td>{html.escape(case_id)}</td><td>{inst['label']}</td><td>{inst['instance']}</td>"
                     f"<td>{len(inst['slices'])}</td><td>{iou:.3f}</td><td>{inst['voxels']}</td>"
                     f"<td>{html.escape(inst['prompt_source'])}</td></tr>")
    parts.append("</table><h2>Overlays</h2>")
    for case_id in store.committed_cases():
        for name in _case_pictures(store, case_id, out, per_case):
            parts.append(f"<figure><img src='{name}'><figcaption>{html.escape(name)}</figcaption></figure>")
    for case_id, error in store.errors().items():
        parts.append(f"<p>failed {html.escape(case_id)}: {html.escape(error['reason'])}</p>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
