"""The store's case groups are valid OME-Zarr 0.5: ome-zarr-models validates them, ome-zarr-py reads them."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import commit_from_source

from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture(scope="module")
def case(tmp_path_factory, small_chest, chest_label_names):
    store = CaseStore(tmp_path_factory.mktemp("ome") / "store")
    labels = read_volume(small_chest[1]).array
    instances = [
        {"label": v, "instance": 1, "prompt_source": "coarse-mask", "reviewer": "r1" if v == 5 else None}
        for v in chest_label_names
    ]
    case_id = commit_from_source(store, small_chest[0], labels, names=chest_label_names, instances=instances)
    return store, case_id, labels


def test_ome_zarr_models_validates_image_and_labels(case):
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    store, case_id, labels = case
    group = zarr.open_group(str(store.case_path(case_id)), mode="r")
    image = Image.from_zarr(group)
    assert [a.name for a in image.attributes.ome.multiscales[0].axes] == ["z", "y", "x"]
    assert image.labels is not None
    assert image.labels.attributes.ome.labels == ["medsam"]
    meta = ImageLabel.from_zarr(group["labels/medsam"]).attributes.ome.image_label
    present = sorted(int(v) for v in np.unique(labels) if v)
    assert [c.label_value for c in meta.colors] == present
    props = {p.label_value: p.model_dump(by_alias=True) for p in meta.properties}
    assert props[5]["name"] == "right lung"
    assert props[5]["snomed-ct-code"] == "3341006"
    assert props[5]["review-status"] == "reviewed"
    assert props[3]["review-status"] == "unreviewed"


def test_ome_zarr_py_reader_opens_the_case_and_its_labels(case):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    store, case_id, labels = case
    nodes = list(Reader(parse_url(str(store.case_path(case_id))))())
    image = next(
        n
        for n in nodes
        if any(isinstance(s, Multiscales) for s in n.specs) and not any(isinstance(s, Label) for s in n.specs)
    )
    label = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    assert image.data[0].shape == labels.shape
    assert np.array_equal(np.asarray(label.data[0]), labels)
    assert label.metadata["properties"][6]["name"] == "left lung"
    assert set(label.metadata["color"]) == {int(v) for v in np.unique(labels) if v}


def test_labels_validate_without_a_stored_image(tmp_path, small_chest):
    from ome_zarr_models.v05.image_label import ImageLabel

    store = CaseStore(tmp_path)
    case_id = commit_from_source(store, small_chest[0], read_volume(small_chest[1]).array, keep_image=False)
    group = zarr.open_group(str(store.case_path(case_id)), mode="r")
    meta = ImageLabel.from_zarr(group["labels/medsam"]).attributes.ome.image_label
    assert meta.properties[0].label_value == 1
    assert store.read_image(case_id) is None
