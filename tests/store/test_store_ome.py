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


@pytest.fixture(scope="module")
def large_case(tmp_path_factory):
    """stardist's whole 512 x 512 nuclei image with its instance mask, committed as a case: a plane large
    enough for an overview level."""
    from pathlib import Path

    import cv2
    import stardist
    import tifffile

    data = Path(stardist.__file__).parent / "data" / "images"
    image = tifffile.imread(str(data / "img2d.tif")).astype(np.float64)
    scaled = ((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("ome-large")
    cv2.imwrite(str(root / "nuclei.png"), scaled)
    labels = tifffile.imread(str(data / "mask2d.tif")).astype(np.uint16)[None]
    store = CaseStore(root / "store")
    case_id = commit_from_source(store, root / "nuclei.png", labels)
    return store, case_id, labels, scaled


def test_viewers_get_overview_levels_at_the_case_position(large_case):
    from ome_zarr_models.v05.image import Image

    store, case_id, _, scaled = large_case
    group = zarr.open_group(str(store.case_path(case_id)), mode="r")
    multiscale = Image.from_zarr(group).attributes.ome.multiscales[0]
    assert [d.path for d in multiscale.datasets] == ["0", "1"]
    geometry = store.attributes(case_id).geometry
    spacing = geometry.spacing
    first, overview = (d.coordinateTransformations for d in multiscale.datasets)
    assert first[0].scale == pytest.approx(list(spacing))
    assert overview[0].scale == pytest.approx([spacing[0], 2 * spacing[1], 2 * spacing[2]])
    origin = np.asarray(geometry.affine)[:3, 3]
    assert np.linalg.norm(first[1].translation) == pytest.approx(np.linalg.norm(origin), abs=1e-5)
    assert overview[1].translation[1] - first[1].translation[1] == pytest.approx(spacing[1] / 2)
    assert group["1"].shape == (1, 256, 256)
    assert np.asarray(group["1"])[0, 10, 20] == pytest.approx(scaled[20:22, 40:42].mean(), abs=0.5)


def test_label_overviews_keep_label_values_and_read_in_ome_zarr_py(large_case):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    store, case_id, labels, _ = large_case
    nodes = list(Reader(parse_url(str(store.case_path(case_id))))())
    label = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    assert [tuple(level.shape) for level in label.data] == [(1, 512, 512), (1, 256, 256)]
    overview = np.asarray(label.data[1])
    assert np.array_equal(overview, labels[:, ::2, ::2])
    assert set(np.unique(overview)) <= set(np.unique(labels))
    assert store.read_labels(case_id)[0].shape == (1, 512, 512)  # the engine reads level 0


@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint8", "float32", "float64", "int32", "int8"])
def test_image_overviews_are_each_blocks_mean_rounded_half_up(chest_volume, dtype):
    from medsam_engine.pipeline.store.ome_zarr import halve

    ct = chest_volume.array[:4, :63, :65].astype(np.int32)  # real HU; odd sizes drop the last row/column
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    data = (np.clip(ct, info.min, info.max) if info else ct / 7).astype(dtype)
    data[0, :2, :2] = [[1, 2], [3, 0]] if info is None or info.min == 0 else [[-1, -2], [-3, 0]]  # x.5
    blocks = data[:, :62, :64].astype(np.float64).reshape(4, 31, 2, 32, 2).mean(axis=(2, 4))
    expected = np.floor(blocks + 0.5).astype(dtype) if info else blocks.astype(dtype)
    halved = halve(data, labels=False)
    assert halved.dtype == data.dtype
    assert halved.shape == (4, 31, 32)
    np.testing.assert_allclose(halved, expected, rtol=1e-6 if info is None else 0)
