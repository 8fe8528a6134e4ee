"""COCO export for 2D cases: OUT/annotations.json with compressed RLE masks, OUT/images/<case_id>.png and
OUT/cases.csv (images named by input instead with ``name_by="input"``: pipeline/export/traceable.py).

One image per 2D case (a PNG of the stored image when the store kept an 8/16-bit one), one category per
store label value (id = the value, name and SNOMED category from the label metadata) and one annotation per
(case, label value): compressed RLE (pycocotools, column-major as COCO defines it), area, bbox [x, y, w, h],
``iscrowd`` 0, and ``score`` = the mean predicted IoU of the label's instances when the lineage has them.
Masks are in the image's pixel grid (row = y, column = x); 3D cases are skipped with the reason.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from medsam_engine.pipeline.core.atomic import atomic_file
from medsam_engine.pipeline.export.common import ExportCheckError, ExportReport
from medsam_engine.pipeline.export.traceable import case_sources, export_names
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.labels_meta import describe_labels, meanings_from_properties


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a (H, W) boolean mask: {"size": [H, W], "counts": str}."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """(H, W) boolean mask of a COCO compressed RLE as written by :func:`encode_rle`."""
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools' decoder predates numpy 2's __array__(copy=) protocol
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def _annotations(labels_yx: np.ndarray, image_id: int, instances: list[dict], first_id: int) -> list[dict]:
    from pycocotools import mask as mask_utils

    out = []
    for value in (int(v) for v in np.unique(labels_yx) if v != 0):
        rle = encode_rle(labels_yx == value)
        raw = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        ious = [
            float(r["predicted_iou"])
            for r in instances
            if int(r.get("label", -1)) == value and r.get("predicted_iou") is not None
        ]
        out.append(
            {
                "id": first_id + len(out),
                "image_id": image_id,
                "category_id": value,
                "segmentation": rle,
                "area": int(mask_utils.area(raw)),
                "bbox": [float(b) for b in mask_utils.toBbox(raw)],
                "iscrowd": 0,
                **({"score": round(float(np.mean(ious)), 5)} if ious else {}),
                "medsam_instances": sum(int(r.get("label", -1)) == value for r in instances),
            }
        )
    return out


def _write_png(store: CaseStore, case_id: str, folder: Path, name: str) -> str | None:
    """images/<name>.png from the stored image if it is 8/16-bit grey or RGB; its relative name or None."""
    import cv2

    image = store.read_image(case_id)
    if image is None or image.dtype not in (np.uint8, np.uint16):
        return None
    plane = image[0]
    if plane.ndim == 3:
        plane = cv2.cvtColor(np.ascontiguousarray(plane), cv2.COLOR_RGB2BGR)
    with atomic_file(folder / f"{name}.png") as temp:
        if not cv2.imwrite(str(temp), plane):
            raise ExportCheckError(f"case {case_id}: OpenCV could not write its PNG")
    return f"images/{name}.png"


def export_coco(store: CaseStore, out: Path, *, name_by: str = "id") -> ExportReport:
    """Write OUT/annotations.json (and images/) for every committed 2D case, re-read and compared, and
    OUT/cases.csv."""
    report = ExportReport(format="coco")
    sources = case_sources(store, store.committed_cases())
    names = export_names(sources, name_by)
    coco: dict = {
        "info": {"description": "LiteMedSAM pre-annotations exported by medsam-engine"},
        "images": [],
        "annotations": [],
        "categories": [],
    }
    expected: dict[int, np.ndarray] = {}
    meanings = {}
    for case_id in sources:
        labels, attrs = store.read_labels(case_id)
        if labels.shape[0] != 1:
            report.skipped[case_id] = (
                f"not a 2D image ({labels.shape[0]} slices): COCO RLE is for 2D "
                "images (export volumes with --format nifti or nnunet)"
            )
            continue
        image_id = len(coco["images"]) + 1
        png = _write_png(store, case_id, out / "images", names[case_id])
        file_name = png or f"{names[case_id]}.png"
        report.outputs[case_id] = ["annotations.json", *([png] if png else [])]
        coco["images"].append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": int(labels.shape[1]),
                "width": int(labels.shape[2]),
                "medsam_case_id": case_id,
            }
        )
        coco["annotations"] += _annotations(
            labels[0], image_id, list(attrs.instances), len(coco["annotations"]) + 1
        )
        expected[image_id] = labels[0]
        for value, meaning in meanings_from_properties(store.label_properties(case_id)).items():
            meanings.setdefault(value, meaning)
    values = sorted({a["category_id"] for a in coco["annotations"]})
    missing = describe_labels([v for v in values if v not in meanings])
    meanings.update({m.value: m for m in missing})
    coco["categories"] = [
        {"id": v, "name": meanings[v].name, "supercategory": meanings[v].category[1]} for v in values
    ]
    path = out / "annotations.json"
    with atomic_file(path) as temp:
        temp.write_text(json.dumps(coco))
        check_coco(temp, expected)
    report.written.append(str(path))
    report.written += [str(out / i["file_name"]) for i in coco["images"] if (out / i["file_name"]).is_file()]
    report.write_cases_csv(out, sources)
    return report


def check_coco(path: Path, expected: dict[int, np.ndarray]) -> None:
    """Re-read the JSON, rebuild each image's label map from its RLE annotations, compare with the store."""
    coco = json.loads(path.read_text())
    rebuilt = {i["id"]: np.zeros((i["height"], i["width"]), dtype=np.uint16) for i in coco["images"]}
    for annotation in coco["annotations"]:
        mask = decode_rle(annotation["segmentation"])
        target = rebuilt[annotation["image_id"]]
        if target[mask].any():
            raise ExportCheckError(f"{path.name}: annotation {annotation['id']} overlaps another")
        target[mask] = annotation["category_id"]
    for image_id, labels in expected.items():
        if not np.array_equal(rebuilt[image_id], labels):
            path.unlink()
            raise ExportCheckError(f"{path.name}: image {image_id} does not read back as the store's labels")
