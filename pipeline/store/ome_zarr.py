"""A case as an OME-Zarr 0.5 (zarr v3) group: its nodes, chunking, codecs and metadata, written through zarr
or, for plain dtypes, encoded directly into the same bytes zarr writes (tests/store/test_direct_chunks.py
compares them).

The group holds the image "0" (optional) and ``labels/medsam/0`` (uint16, z, y, x), each with overview levels
"1", "2", ... (y and x halved per level while a plane is larger than 256 pixels) that viewers open in place.
The root's ``ome`` attributes carry the multiscales (axes in mm; each level's voxel size and the world
position of its first voxel, so cases on one scanner frame overlap where they lie); ``labels/medsam`` the
``image-label`` metadata (colours; per label: name, SNOMED CT code where known, review status); the root's
``medsam`` attributes the case's record, whose ``status`` is written last (pipeline/store/case_store.py
commits it).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from medsam_engine.pipeline.core.metrics import label_voxels
from medsam_engine.pipeline.store.labels_meta import describe_labels

if TYPE_CHECKING:
    from numcodecs.abc import Codec
    from zarr.core.array_spec import ArrayConfigParams
    from zarr.storage import StoreLike

STATUS_COMMITTED = "committed"


OVERVIEW_PIXELS = 256  # overview levels halve y and x while a plane is larger than this


def pyramid_factors(shape_yx: tuple[int, ...]) -> list[int]:
    """The downsampling factor of every level, 1 first: each further level halves y and x while the plane
    stays larger than :data:`OVERVIEW_PIXELS` on its longer side (a 512 x 512 slice: 1, 2)."""
    factors = [1]
    while max(shape_yx) // factors[-1] > OVERVIEW_PIXELS and min(shape_yx) // (factors[-1] * 2) >= 1:
        factors.append(factors[-1] * 2)
    return factors


AREA_DTYPES = frozenset({"uint8", "uint16", "int16", "float32", "float64"})  # OpenCV's INTER_AREA takes these


def halve(data: np.ndarray, *, labels: bool) -> np.ndarray:
    """``data`` (..., y, x) with y and x halved (whole 2 x 2 blocks only): a label map keeps each block's
    first voxel (values stay labels), an image each block's mean, rounded half up, in its own dtype (OpenCV's
    area resampling plane by plane where it takes the dtype: the same means, without numpy's temporaries)."""
    height, width = data.shape[-2] // 2, data.shape[-1] // 2
    first = data[..., : 2 * height : 2, : 2 * width : 2]
    if labels:
        return np.ascontiguousarray(first)
    if data.dtype.name in AREA_DTYPES and height and width:
        import cv2

        out = np.empty((*data.shape[:-2], height, width), dtype=data.dtype)
        planes, halves = data.reshape(-1, *data.shape[-2:]), out.reshape(-1, height, width)
        for plane, half in zip(planes, halves, strict=True):
            half[...] = cv2.resize(
                plane[: 2 * height, : 2 * width], (width, height), interpolation=cv2.INTER_AREA
            )
        return out
    exact = data.dtype.kind in "iu"
    total: np.ndarray = first.astype(  # sums of four fit exactly (64-bit integers: past 2**61 they wrap)
        (np.int32 if data.itemsize <= 2 else np.int64) if exact else np.float64
    )
    total += data[..., 1 : 2 * height : 2, : 2 * width : 2]
    total += data[..., : 2 * height : 2, 1 : 2 * width : 2]
    total += data[..., 1 : 2 * height : 2, 1 : 2 * width : 2]
    mean = np.right_shift(total + 2, 2) if exact else total / 4  # integers: rounded half up
    return np.ascontiguousarray(mean.astype(data.dtype))


def origin_zyx(affine: np.ndarray) -> list[float]:
    """The world position of voxel (0, 0, 0) along each array axis (z, y, x) in mm: the origin projected on
    each axis' direction, so that cases annotated on one scanner frame overlap where they lie."""
    affine = np.asarray(affine, dtype=float)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return [round(float(affine[:3, 3] @ directions[:, a]), 6) for a in range(3)]


def _multiscales(
    name: str, axes: list[str], spacing: list[float], origin: list[float], factors: list[int]
) -> list[dict[str, Any]]:
    """OME-Zarr 0.5 multiscales: one dataset per level, each with its voxel size and the position of its
    first voxel's centre (mm); a leading channel axis keeps scale 1 and translation 0."""
    kinds = {"c": "channel", "z": "space", "y": "space", "x": "space"}
    channels = len(axes) - 3
    datasets = []
    for level, factor in enumerate(factors):
        scale = [spacing[0], spacing[1] * factor, spacing[2] * factor]
        shift = [origin[0], *(o + (factor - 1) / 2 * s for o, s in zip(origin[1:], spacing[1:], strict=True))]
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0] * channels + scale},
                    {"type": "translation", "translation": [0.0] * channels + [round(t, 6) for t in shift]},
                ],
            }
        )
    return [
        {
            "name": name,
            "axes": [
                {"name": a, "type": kinds[a], **({"unit": "millimeter"} if kinds[a] == "space" else {})}
                for a in axes
            ],
            "datasets": datasets,
        }
    ]


def image_label_metadata(
    values: list[int],
    *,
    names: Mapping[int, str | dict[str, Any]],
    instances: list[dict[str, Any]],
) -> dict[str, Any]:
    """OME-Zarr 0.5 ``image-label`` metadata: a colour and properties for each of the label map's non-zero
    ``values``."""
    meanings = describe_labels(sorted({int(v) for v in values}), names=names, instances=instances)
    return {
        "version": "0.5",
        "colors": [{"label-value": m.value, "rgba": [*m.rgb, 255]} for m in meanings],
        "properties": [m.to_ome_property() for m in meanings],
        "source": {"image": "../../"},
    }


CHUNK_BYTES = 4 << 20  # a chunk holds whole planes, about this many bytes: few files, few calls per case


def plane_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of whole (y, x) planes, as many as fit in :data:`CHUNK_BYTES` (at least one): per-chunk
    overhead (a file and a codec call each) would dominate writes of one-plane chunks."""
    plane = int(np.prod(shape[1:])) * itemsize
    return (max(1, min(shape[0], CHUNK_BYTES // max(1, plane))), *shape[1:])


def _codecs() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(image codec, label codec), each as (zarr codec, numcodecs twin factory, its zarr.json entry factory):
    the twin encodes a chunk exactly as zarr does and the entry is zarr's own description of the codec
    (tests/store/test_direct_chunks.py compares the bytes). Images: LZ4 behind a byte shuffle (faster than
    zstd, slightly larger; measured: docs/benchmarks.md); label maps: zstd, which packs their long runs of
    zeros tightly. Every chunk is written (checking for chunks of zeros costs more than writing them)."""
    from numcodecs import Blosc, Zstd
    from zarr.codecs import BloscCodec, ZstdCodec

    return (
        (
            BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
            lambda itemsize: Blosc(
                cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, blocksize=0, typesize=itemsize
            ),
            lambda itemsize: {
                "name": "blosc",
                "configuration": {
                    "typesize": itemsize,
                    "cname": "lz4",
                    "clevel": 5,
                    "shuffle": "shuffle",
                    "blocksize": 0,
                },
            },
        ),
        (
            ZstdCodec(level=1),
            lambda itemsize: Zstd(level=1),
            lambda itemsize: {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
        ),
    )


def encoded_chunks(
    data: np.ndarray, chunks: tuple[int, ...], compressor: Codec
) -> Iterator[tuple[str, bytes]]:
    """(chunk key, bytes) of every chunk of ``data`` as zarr v3 stores it: default chunk keys (``c/i/j/k``),
    edge chunks padded with the fill value 0, little-endian bytes through ``compressor`` (a numcodecs
    codec)."""
    for starts in itertools.product(*(range(0, n, c) for n, c in zip(data.shape, chunks, strict=False))):
        block = data[tuple(slice(s, s + c) for s, c in zip(starts, chunks, strict=False))]
        if block.shape != tuple(chunks):
            padded = np.zeros(chunks, dtype=data.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        key = "c/" + "/".join(str(s // c) for s, c in zip(starts, chunks, strict=False))
        yield key, compressor.encode(np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")))


@dataclass(frozen=True)
class _Node:
    """One node of a case group: a group (``data`` None) or an array with its chunks, axes and codec."""

    path: str  # "" for the root
    attributes: dict[str, Any]
    data: np.ndarray | None = None
    chunks: tuple[int, ...] = ()
    dims: tuple[str, ...] = ()
    codec: tuple[Any, ...] | None = None  # one of _codecs()


def _case_nodes(
    labels: np.ndarray,
    image: np.ndarray | None,
    attrs: dict[str, Any],
    label_names: dict[int, str | dict[str, Any]],
    voxels: Mapping[int, int] | None = None,
) -> list[_Node]:
    """A case group's nodes, each with its final attributes: the root (OME multiscales of the image and the
    'medsam' attributes that carry the commit status and ``label_voxels``, the voxels of each label value in
    the map written, so that volumes need no read of the map), the image's levels, the labels group and the
    label map's levels (level 0 full size; overview levels for viewers, :func:`pyramid_factors`)."""
    geometry = attrs["geometry"]
    spacing = [float(s) for s in geometry["spacing_zyx_mm"]]
    origin = (
        origin_zyx(np.asarray(geometry["affine_zyx_to_ras"]))
        if "affine_zyx_to_ras" in geometry
        else [0.0] * 3
    )
    factors = pyramid_factors(labels.shape[1:])
    image_codec, label_codec = _codecs()
    nodes = []
    root_attrs: dict[str, Any] = {}
    if image is not None:
        axes = ["z", "y", "x"] if image.ndim == 3 else ["c", "z", "y", "x"]
        root_attrs["ome"] = {
            "version": "0.5",
            "multiscales": _multiscales("image", axes, spacing, origin, factors),
        }
        data = np.ascontiguousarray(image if image.ndim == 3 else np.moveaxis(image, -1, 0))
        for level in range(len(factors)):
            data = data if level == 0 else halve(data, labels=False)
            chunks = (
                plane_chunks(data.shape, data.itemsize)
                if image.ndim == 3
                else (data.shape[0], *plane_chunks(data.shape[1:], data.itemsize * data.shape[0]))
            )
            nodes.append(_Node(str(level), {}, data, chunks, tuple(axes), image_codec))
    voxels = label_voxels(labels) if voxels is None else {v: n for v, n in sorted(voxels.items()) if n}
    root_attrs["medsam"] = {
        **attrs,
        "label_voxels": {str(v): n for v, n in voxels.items()},
        "status": STATUS_COMMITTED,
    }
    nodes.insert(0, _Node("", root_attrs))
    nodes.append(_Node("labels", {"ome": {"version": "0.5", "labels": ["medsam"]}}))
    nodes.append(
        _Node(
            "labels/medsam",
            {
                "ome": {
                    "version": "0.5",
                    "multiscales": _multiscales("medsam", ["z", "y", "x"], spacing, origin, factors),
                    "image-label": image_label_metadata(
                        list(voxels), names=label_names, instances=attrs.get("instances", [])
                    ),
                }
            },
        )
    )
    data = labels.astype(np.uint16, copy=False)
    for level in range(len(factors)):
        data = data if level == 0 else halve(data, labels=True)
        nodes.append(
            _Node(
                f"labels/medsam/{level}", {}, data, plane_chunks(data.shape, 2), ("z", "y", "x"), label_codec
            )
        )
    return nodes


def write_case_group(
    target: str | Path | StoreLike,
    *,
    labels: np.ndarray,
    image: np.ndarray | None,
    attrs: dict[str, Any],
    label_names: dict[int, str | dict[str, Any]],
    voxels: Mapping[int, int] | None = None,
) -> None:
    """Write one case group at ``target`` (a path or zarr store) through zarr; the root's 'medsam' attributes,
    which carry the commit status, are the last write. ``voxels``: each label value's voxels in ``labels``
    when the caller knows them exactly (else counted)."""
    import zarr

    nodes = _case_nodes(labels, image, attrs, label_names, voxels)
    root_attrs = dict(nodes[0].attributes)
    status = root_attrs.pop("medsam")
    groups = {"": zarr.create_group(target, zarr_format=3, overwrite=True, attributes=root_attrs)}
    for node in nodes[1:]:
        parent, _, name = node.path.rpartition("/")
        if node.data is None:
            groups[node.path] = groups[parent].create_group(name, attributes=node.attributes)
            continue
        array = groups[parent].create_array(
            name,
            shape=node.data.shape,
            dtype=node.data.dtype,
            chunks=node.chunks,
            fill_value=0,
            dimension_names=list(node.dims),
            compressors=cast(tuple[Any, ...], node.codec)[0],
            config=cast("ArrayConfigParams", {"write_empty_chunks": True}),
            attributes=node.attributes or None,
        )
        array[...] = node.data
    groups[""].update_attributes({"medsam": status})


DIRECT_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"})


def _document(doc: dict[str, Any]) -> bytes:
    # zarr's own document; compact, where zarr indents it: Python's json indents in pure Python, slower and
    # holding the interpreter lock (measured: docs/benchmarks.md)
    return json.dumps(doc, allow_nan=True).encode()


def encoded_case_group(
    *,
    labels: np.ndarray,
    image: np.ndarray | None,
    attrs: dict[str, Any],
    label_names: dict[int, str | dict[str, Any]],
    voxels: Mapping[int, int] | None = None,
) -> dict[str, bytes] | None:
    """Every object of the case group that :func:`write_case_group` writes (key -> bytes), made without zarr:
    each node's ``zarr.json`` (zarr v3's document, the same JSON zarr writes, without its indentation) and
    each chunk through its codec's numcodecs twin (:func:`encoded_chunks`, byte for byte zarr's own; both
    compared in tests/store/test_direct_chunks.py). zarr's asynchronous API costs a thread hand-off and a
    metadata round-trip per node, most of a small case's write, and holds the interpreter lock while it does.
    None for an image type outside :data:`DIRECT_DTYPES` (written through zarr then)."""
    nodes = _case_nodes(labels, image, attrs, label_names, voxels)
    objects: dict[str, bytes] = {}
    for node in nodes:
        prefix = f"{node.path}/" if node.path else ""
        if node.data is None:
            objects[f"{prefix}zarr.json"] = _document(
                {"attributes": node.attributes, "zarr_format": 3, "node_type": "group"}
            )
            continue
        dtype = node.data.dtype
        if dtype.name not in DIRECT_DTYPES:
            return None
        _, twin, entry = cast(tuple[Any, ...], node.codec)
        endian = {} if dtype.itemsize == 1 else {"configuration": {"endian": "little"}}
        objects[f"{prefix}zarr.json"] = _document(
            {
                "shape": list(node.data.shape),
                "data_type": dtype.name,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(node.chunks)}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": 0.0 if dtype.kind == "f" else 0,
                "codecs": [{"name": "bytes", **endian}, entry(dtype.itemsize)],
                "attributes": node.attributes,
                "dimension_names": list(node.dims),
                "zarr_format": 3,
                "node_type": "array",
                "storage_transformers": [],
            }
        )
        for key, payload in encoded_chunks(node.data, node.chunks, twin(dtype.itemsize)):
            objects[f"{prefix}{key}"] = payload
    return objects


IN_MEMORY_BYTES = 64 << 20  # cases up to this size are encoded in memory, then written as plain files


def write_local_group(
    folder: Path,
    *,
    labels: np.ndarray,
    image: np.ndarray | None,
    attrs: dict[str, Any],
    label_names: dict[int, str | dict[str, Any]],
    voxels: Mapping[int, int] | None = None,
) -> None:
    """:func:`write_case_group` into a local folder. A small case is encoded in memory
    (:func:`encoded_case_group`) and its objects written as files here, the root's ``zarr.json`` last."""
    size = labels.nbytes + (image.nbytes if image is not None else 0)
    objects = None
    if size <= IN_MEMORY_BYTES:
        objects = encoded_case_group(
            labels=labels, image=image, attrs=attrs, label_names=label_names, voxels=voxels
        )
    if objects is None:
        write_case_group(
            str(folder), labels=labels, image=image, attrs=attrs, label_names=label_names, voxels=voxels
        )
        return
    made: set[Path] = set()
    for key in sorted(objects, key=lambda key: key == "zarr.json"):  # the root's last: it marks the commit
        path = folder / key
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(objects[key])
