"""Chunks encoded directly (the in-memory write path) are byte for byte the objects zarr itself writes: every
key and every byte of a real CT with a partial last chunk, a colour image and a label map."""
from __future__ import annotations

import numpy as np
import pytest
from zarr.storage import MemoryStore

from pipeline.store.case_store import write_case_group


def _objects(labels, image, direct: bool) -> dict[str, bytes]:
    encoded: dict = {}
    attrs = {"geometry": {"spacing_zyx_mm": [2.5, 0.7, 0.7]}, "instances": [], "case_id": "x"}
    write_case_group(MemoryStore(store_dict=encoded), labels=labels, image=image, attrs=attrs,
                     label_names={1: "lung"}, direct=encoded if direct else None)
    return {key: bytes(value) if isinstance(value, bytes) else value.to_bytes() for key, value in encoded.items()}


@pytest.mark.parametrize("kind", ["ct", "colour", "labels only"])
def test_direct_chunks_equal_zarrs_own(chest_volume, kind):
    ct = chest_volume.array  # real HU, int16
    ct = np.concatenate([ct] * 6)[:19]  # more planes than one chunk holds, and a partial last chunk
    ct = np.ascontiguousarray(np.pad(ct, ((0, 0), (0, 0), (0, 1536 - ct.shape[2]))))  # 3 MiB planes
    labels = (ct > -300).astype(np.uint16) * 3
    image = {"ct": ct, "labels only": None,
             "colour": np.stack([np.clip(ct // 8, 0, 255).astype(np.uint8)] * 3, axis=-1)}[kind]
    mine, zarrs = _objects(labels, image, True), _objects(labels, image, False)
    assert sorted(mine) == sorted(zarrs)
    assert sum(key.count("/c/") for key in mine) >= 2  # several chunks per array
    for key in zarrs:
        assert mine[key] == zarrs[key], key


def test_label_values_given_by_the_caller_write_the_same_metadata_as_counted_ones():
    labels = np.zeros((3, 8, 8), np.uint16)
    labels[0, 1:3, 1:3], labels[2, 5, 5] = 4, 9
    attrs = {"geometry": {"spacing_zyx_mm": [1.0, 1.0, 1.0]}, "instances": [], "case_id": "x"}
    written = []
    for values in (None, [4, 9]):
        encoded: dict = {}
        write_case_group(MemoryStore(store_dict=encoded), labels=labels, image=None, attrs=attrs,
                         label_names={4: "liver"}, values=values, direct=encoded)
        written.append(encoded["labels/medsam/zarr.json"].to_bytes())
    assert written[0] == written[1] and b'"label-value": 9' in written[0]
