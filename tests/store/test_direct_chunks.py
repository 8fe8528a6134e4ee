"""A small case's group encoded without zarr (the in-memory write path) is what zarr itself writes: the same
keys, every chunk byte for byte and every node's zarr.json the same JSON document (compact where zarr's is
indented), for a real CT with a partial last chunk, a colour image, a 2D image, floats and a label map with
real attributes; and zarr reads it back."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import zarr
from zarr.storage import MemoryStore

from medsam_engine.pipeline.store.ome_zarr import encoded_case_group, write_case_group, write_local_group

ATTRS = {
    "geometry": {"spacing_zyx_mm": [2.5, 0.7, 0.7]},
    "case_id": "x",
    "score": math.nan,
    "instances": [{"label": 3, "name": "lung", "predicted_iou": 0.91, "slices": [0, 18]}],
    "note": "ünïcode",
}


def _objects(labels, image, direct: bool, attrs=ATTRS, voxels=None) -> dict[str, bytes]:
    if direct:
        return encoded_case_group(
            labels=labels, image=image, attrs=attrs, label_names={3: "lung"}, voxels=voxels
        )
    encoded: dict = {}
    write_case_group(
        MemoryStore(store_dict=encoded),
        labels=labels,
        image=image,
        attrs=attrs,
        label_names={3: "lung"},
        voxels=voxels,
    )
    return {key: value.to_bytes() for key, value in encoded.items()}


@pytest.mark.parametrize("kind", ["ct", "colour", "2d grey", "float", "labels only"])
def test_a_case_encoded_directly_equals_zarrs_own_objects(chest_volume, kind):
    ct = chest_volume.array  # real HU, int16
    ct = np.concatenate([ct] * 6)[:19]  # more planes than one chunk holds, and a partial last chunk
    ct = np.ascontiguousarray(np.pad(ct, ((0, 0), (0, 0), (0, 1536 - ct.shape[2]))))  # 3 MiB planes
    labels = (ct > -300).astype(np.uint16) * 3
    grey = np.clip(ct // 8, 0, 255).astype(np.uint8)
    image = {
        "ct": ct,
        "labels only": None,
        "colour": np.stack([grey] * 3, axis=-1),
        "2d grey": grey[:1],
        "float": ct[:2].astype(np.float32) / 7,
    }[kind]
    if kind in ("2d grey", "float"):
        labels = labels[: image.shape[0]]
    mine, zarrs = _objects(labels, image, True), _objects(labels, image, False)
    assert sorted(mine) == sorted(zarrs)
    if kind == "ct":
        assert sum(key.count("/c/") for key in mine) >= 2  # several chunks per array
    for key in zarrs:
        if key.endswith("zarr.json"):  # NaN kept as its name, so that documents with NaN compare equal
            assert json.loads(mine[key], parse_constant=str) == json.loads(zarrs[key], parse_constant=str), (
                key
            )
        else:
            assert mine[key] == zarrs[key], key
    group = zarr.open_group(
        MemoryStore(store_dict={k: zarr.core.buffer.cpu.Buffer.from_bytes(v) for k, v in mine.items()}),
        mode="r",
    )
    assert np.array_equal(group["labels/medsam/0"][...], labels)
    assert group.attrs["medsam"]["status"] == "committed"
    assert group.attrs["medsam"]["note"] == "ünïcode"
    if image is not None:
        assert np.array_equal(group["0"][...], image if image.ndim == 3 else np.moveaxis(image, -1, 0))


def test_an_image_type_without_a_direct_encoding_goes_through_zarr(tmp_path):
    labels = np.zeros((1, 8, 8), np.uint16)
    image = np.ones((1, 8, 8), np.complex64)
    assert encoded_case_group(labels=labels, image=image, attrs=ATTRS, label_names={}) is None
    write_local_group(tmp_path / "case", labels=labels, image=image, attrs=ATTRS, label_names={})
    group = zarr.open_group(str(tmp_path / "case"), mode="r")
    assert group["0"].dtype == np.complex64
    assert group.attrs["medsam"]["status"] == "committed"


def test_the_commit_records_each_labels_voxels_beside_the_map_it_writes():
    labels = np.zeros((3, 8, 8), np.uint16)
    labels[0, 1:3, 1:3], labels[2, 5, 5] = 4, 9
    attrs = {"geometry": {"spacing_zyx_mm": [1.0, 1.0, 1.0]}, "instances": [], "case_id": "x"}
    written = [
        json.loads(_objects(labels, None, direct, attrs, voxels)["zarr.json"])
        for direct in (True, False)
        for voxels in (None, {4: 4, 9: 1, 5: 0})  # counted, or known to the caller (a value it emptied)
    ]
    assert all(doc == written[0] for doc in written)
    assert written[0]["attributes"]["medsam"]["label_voxels"] == {"4": 4, "9": 1}
    label_meta = json.loads(_objects(labels, None, True, attrs)["labels/medsam/zarr.json"])
    assert [c["label-value"] for c in label_meta["attributes"]["ome"]["image-label"]["colors"]] == [4, 9]
