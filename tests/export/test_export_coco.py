"""COCO RLE export of 2D cases, read back with pycocotools' own COCO API."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import commit_from_source

from medsam_engine.pipeline.export.coco import decode_rle, encode_rle
from medsam_engine.pipeline.export.formats import export_store
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore

# pycocotools' decoder predates numpy 2's __array__(copy=) protocol; the warning is harmless
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def coco(tmp_path_factory, nuclei_2d, small_chest):
    root = tmp_path_factory.mktemp("coco")
    store = CaseStore(root / "store")
    nuclei = read_volume(nuclei_2d[1]).array
    instances = [
        {"label": int(v), "instance": 1, "predicted_iou": 0.5 + (int(v) % 5) / 10}
        for v in np.unique(nuclei)
        if v
    ]
    ids = {
        "2d": commit_from_source(store, nuclei_2d[0], nuclei, instances=instances),
        "3d": commit_from_source(store, small_chest[0], read_volume(small_chest[1]).array),
    }
    return ids, nuclei[0], export_store(store, "coco", root / "out"), root / "out"


def test_pycocotools_reads_every_label_back(coco):
    from pycocotools.coco import COCO

    ids, nuclei, _report, out = coco
    api = COCO(str(out / "annotations.json"))
    (image,) = api.dataset["images"]
    assert (image["height"], image["width"]) == nuclei.shape
    assert image["medsam_case_id"] == ids["2d"]
    rebuilt = np.zeros_like(nuclei)
    for annotation in api.loadAnns(api.getAnnIds(imgIds=[image["id"]])):
        mask = api.annToMask(annotation).astype(bool)
        assert annotation["area"] == mask.sum()
        assert annotation["iscrowd"] == 0
        x, y, w, h = annotation["bbox"]
        rows, cols = np.nonzero(mask)
        assert (x, y) == (cols.min(), rows.min())
        assert (w, h) == (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
        assert annotation["score"] == pytest.approx(0.5 + (annotation["category_id"] % 5) / 10)
        rebuilt[mask] = annotation["category_id"]
    assert np.array_equal(rebuilt, nuclei)
    assert len(api.dataset["categories"]) == len(np.unique(nuclei)) - 1


def test_image_is_written_and_volumes_are_skipped(coco, nuclei_2d):
    ids, _, report, out = coco
    written = cv2.imread(str(out / "images" / f"{ids['2d']}.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(written, cv2.imread(str(nuclei_2d[0]), cv2.IMREAD_UNCHANGED))
    assert list(report.skipped) == [ids["3d"]]
    assert "not a 2D image" in report.skipped[ids["3d"]]


def test_rle_round_trip_on_a_tiny_mask():
    mask = np.zeros((3, 4), bool)
    mask[0, 1] = mask[2, 1:3] = True
    rle = encode_rle(mask)
    assert rle["size"] == [3, 4]
    assert isinstance(rle["counts"], str)
    assert np.array_equal(decode_rle(rle), mask)
