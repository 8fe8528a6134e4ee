"""The mask store: one OME-Zarr 0.5 (zarr v3) group per case, committed last.

Layout::

    STORE/<case_id>.ome.zarr/      image "0" (optional) + labels/medsam/0 (uint16 label map, z, y, x)
        attrs["ome"]               OME-Zarr 0.5 multiscales (axes in mm); labels/medsam has "image-label"
                                   (colours; per label: name, SNOMED CT code where known, review status)
        attrs["medsam"]            geometry, signature, instances (lineage), postprocess, status
    STORE/_staging/                cases being written (local stores); never read as done
    STORE/_previous/<case_id>/     earlier versions (rounds) kept when a case is overwritten
    STORE/_manifest/<case_id>.json what each case is made from (input paths live only here)
    STORE/_errors/<case_id>.json   the reason a case failed, until it succeeds
    STORE/_leases/<case_id>.json   which run works on the case now (pipeline/store/leases.py)
    STORE/_runs/<run_id>.json      what ran, when, with which options and results

A case is done only when its root ``zarr.json`` says ``status: committed``, and that is written last:

* local folders: the case is written under ``_staging/`` and renamed into place (atomic on one file system);
* object stores (``s3://``, through fsspec): no rename exists, so the commit marker is the last object written
  (an S3 PUT is atomic); an overwrite first copies the old version to ``_previous/`` and removes its marker.

Either way a killed writer leaves nothing that readers, exports or resume take as done. One writer per shard.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from medsam_engine.pipeline.core.atomic import create_exclusive, write_text_atomic
from medsam_engine.pipeline.core.errors import StoreConflictError
from medsam_engine.pipeline.core.metrics import present_labels
from medsam_engine.pipeline.core.provenance import utc_stamp, version_id
from medsam_engine.pipeline.core.types import CaseAttributes, CaseIds
from medsam_engine.pipeline.store.labels_meta import describe_labels
from medsam_engine.pipeline.store.leases import HOST, conditional_put, process_alive

if TYPE_CHECKING:
    import zarr
    from numcodecs.abc import Codec
    from zarr.core.array_spec import ArrayConfigParams
    from zarr.storage import FsspecStore, StoreLike

CASE_SUFFIX = ".ome.zarr"


class _Unread(Enum):
    UNREAD = 0  # commit_case reads the case's committed attributes itself


UNREAD = _Unread.UNREAD
STATUS_COMMITTED = "committed"
LABELS_PATH = "labels/medsam"


class CaseStore:
    """A folder (local path or fsspec URL such as ``s3://bucket/store``) of committed cases and records.

    ``root`` is the store's path inside ``fs`` (a ``Path`` for local stores). Remote credentials and
    endpoints come from ``storage_options`` or the usual environment (``AWS_ENDPOINT_URL`` and friends).
    """

    def __init__(self, root: str | Path, *, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = str(root)
        self.storage_options = dict(storage_options or {})
        self.fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.is_local = "file" in protocols
        self.protocol = protocols[0]
        local = str(root)[len("file://") :] if str(root).startswith("file://") else root
        self.root: Path | PurePosixPath = Path(local) if self.is_local else PurePosixPath(path)

    # -- file primitives (local or remote) --------------------------------------------------------------
    def read_json(self, path: PurePosixPath | Path) -> dict[str, Any] | None:
        """A JSON record, or None when it does not exist."""
        try:
            return cast(dict[str, Any], json.loads(self.fs.cat_file(str(path))))
        except FileNotFoundError:
            return None

    def write_json(self, path: PurePosixPath | Path, data: dict[str, Any]) -> None:
        """Write a JSON record whole: a temporary file renamed into place (local), one PUT (object stores)."""
        text = json.dumps(data, indent=1, sort_keys=True, default=str)
        if not self.is_local:
            self.fs.pipe_file(str(path), text.encode())  # one PUT: readers see all of it or nothing
            return
        write_text_atomic(Path(path), text)

    def list_names(self, path: PurePosixPath | Path) -> list[str]:
        """Names (not paths) directly under ``path``; [] when it does not exist."""
        try:
            kwargs = {} if self.is_local else {"refresh": True}
            found = self.fs.ls(str(path), detail=False, **kwargs)
            return sorted(PurePosixPath(p.rstrip("/")).name for p in found)
        except FileNotFoundError:
            return []

    def _zarr_target(self, path: PurePosixPath | Path, *, read_only: bool) -> str | FsspecStore:
        if self.is_local:
            return str(path)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            f"{self.protocol}://{path}", storage_options=self.storage_options, read_only=read_only
        )

    # -- identity -----------------------------------------------------------------------------------
    def id_key(self) -> bytes:
        """The key of the case-id hash: $MEDSAM_ENGINE_ID_KEY, else a random key kept in the store."""
        env = os.environ.get("MEDSAM_ENGINE_ID_KEY")
        if env:
            return env.encode()
        path = self.root / "_key"
        if not self.is_local:
            if not self.fs.exists(str(path)):
                # a conditional PUT: of two runs creating the key at once, exactly one writes it
                conditional_put(self.fs, str(path), secrets.token_hex(32).encode())
            return bytes(self.fs.cat_file(str(path))).strip()
        path = Path(path)
        if not path.exists():
            create_exclusive(path, secrets.token_hex(32))  # first writer wins; never replace an existing key
        return path.read_text().strip().encode()

    def case_id(self, identity: str) -> str:
        """A keyed hash of what identifies a case (content hash, series UID): no PHI survives it."""
        return hmac.new(self.id_key(), identity.encode(), hashlib.sha256).hexdigest()[:16]

    def cache_dir(self) -> Path:
        """Where discovery unpacks archives and downloads: STORE/_cache for a local store; for a remote one
        $MEDSAM_ENGINE_CACHE, else ~/.cache/medsam-engine (the readers need local files)."""
        if self.is_local:
            return Path(self.root) / "_cache"
        return Path(os.environ.get("MEDSAM_ENGINE_CACHE") or Path.home() / ".cache" / "medsam-engine")

    def case_ids(self) -> CaseIds:
        """This store's case naming (keyed hash) and cache folder, for discovery (pipeline/io/discover.py)."""
        return CaseIds(case_id=self.case_id, cache=self.cache_dir())

    # -- reading ------------------------------------------------------------------------------------
    def case_path(self, case_id: str) -> Path | PurePosixPath:
        return self.root / f"{case_id}{CASE_SUFFIX}"

    def case_attrs(self, case_id: str) -> dict[str, Any] | None:
        """The case's 'medsam' attributes as stored (JSON) if it is committed, else None; readers that use
        its fields take :meth:`attributes` instead."""
        meta = self.read_json(self.case_path(case_id) / "zarr.json")
        attrs = (meta or {}).get("attributes", {}).get("medsam", {})
        return attrs if attrs.get("status") == STATUS_COMMITTED else None

    def committed_cases(self) -> list[str]:
        ids = [n[: -len(CASE_SUFFIX)] for n in self.list_names(self.root) if n.endswith(CASE_SUFFIX)]
        return [c for c in ids if self.case_attrs(c) is not None]

    def all_attributes(self) -> dict[str, CaseAttributes]:
        """Every committed case's attributes, by case id (sorted), each read once."""
        found = {case_id: self.attributes(case_id) for case_id in self.committed_cases()}
        return {case_id: attrs for case_id, attrs in found.items() if attrs is not None}

    def open_case(self, case_id: str) -> zarr.Group:
        """The committed case's zarr group, read-only; KeyError when the case is not committed."""
        import zarr

        if self.case_attrs(case_id) is None:
            raise KeyError(f"case {case_id} is not committed in {self.url}")
        return zarr.open_group(self._zarr_target(self.case_path(case_id), read_only=True), mode="r")

    def attributes(self, case_id: str) -> CaseAttributes | None:
        """The committed case's attributes as a value, or None when it is not committed."""
        attrs = self.case_attrs(case_id)
        return None if attrs is None else CaseAttributes.from_json(attrs)

    def read_labels(self, case_id: str) -> tuple[np.ndarray, CaseAttributes]:
        """The (z, y, x) uint16 label map and the case's attributes."""
        group = self.open_case(case_id)
        labels = cast("zarr.Array[Any]", group[f"{LABELS_PATH}/0"])
        attrs = cast(dict[str, Any], group.attrs["medsam"])
        return np.asarray(labels[:]), CaseAttributes.from_json(dict(attrs))

    def read_image(self, case_id: str) -> np.ndarray | None:
        """The stored image as (z, y, x) or (z, y, x, c), or None when the store kept no image."""
        group = self.open_case(case_id)
        if "0" not in group:
            return None
        data = np.asarray(cast("zarr.Array[Any]", group["0"])[:])
        return data if data.ndim == 3 else np.moveaxis(data, 0, -1)

    def label_properties(self, case_id: str) -> list[dict[str, Any]]:
        """The case's OME-Zarr ``image-label.properties`` (one dict per label value)."""
        meta = self.read_json(self.case_path(case_id) / LABELS_PATH / "zarr.json") or {}
        return list(meta.get("attributes", {}).get("ome", {}).get("image-label", {}).get("properties", []))

    def manifest(self, case_id: str) -> dict[str, Any] | None:
        return self.read_json(self.root / "_manifest" / f"{case_id}.json")

    def errors(self) -> dict[str, dict[str, Any]]:
        folder = self.root / "_errors"
        names = [n for n in self.list_names(folder) if n.endswith(".json") and not n.startswith(".")]
        return {n[:-5]: self.read_json(folder / n) or {} for n in names}

    # -- writing ------------------------------------------------------------------------------------
    def write_manifest(self, case_id: str, record: dict[str, Any]) -> None:
        self.write_json(self.root / "_manifest" / f"{case_id}.json", record)

    def write_run(self, run_id: str, record: dict[str, Any]) -> Path | PurePosixPath:
        path = self.root / "_runs" / f"{run_id}.json"
        self.write_json(path, record)
        return path

    def record_error(self, case_id: str, *, stage: str, reason: str, run_id: str) -> None:
        self.write_json(
            self.root / "_errors" / f"{case_id}.json",
            {"case_id": case_id, "stage": stage, "reason": reason, "run_id": run_id, "time": utc_stamp()},
        )

    def commit_case(
        self,
        case_id: str,
        *,
        labels: np.ndarray,
        attrs: dict[str, Any],
        image: np.ndarray | None = None,
        overwrite: bool = False,
        label_names: dict[int, str | dict[str, Any]] | None = None,
        supersedes: str | None = None,
        current: dict[str, Any] | _Unread | None = UNREAD,
        values: list[int] | None = None,
    ) -> Path | PurePosixPath:
        """Write a case and commit it last; returns its final path.

        ``labels`` is the (z, y, x) label map (stored uint16); ``image`` (z, y, x) or (z, y, x, c); ``attrs``
        the 'medsam' attributes (its 'status' is set here, last). An existing committed case with another
        signature raises StoreConflictError unless ``overwrite``, which keeps the old version under
        _previous/ and lists it in the new version's ``previous_versions``. The open failure of this case and
        of the case it ``supersedes`` (its input's failure to be fetched) are closed. ``current``: the case's
        committed attributes (None: not committed) as a caller that holds the case's lease read them, which
        saves reading them again (a request per case on object stores). ``values``: the label values present
        in ``labels``, when the caller knows them exactly (saves a counting pass).
        """
        old = self.case_attrs(case_id) if isinstance(current, _Unread) else current
        if old is not None and old.get("signature") != attrs.get("signature") and not overwrite:
            raise StoreConflictError(
                "already committed with a different signature (model, config or input "
                "changed); pass --overwrite to replace it",
                case_id=case_id,
            )
        version = version_id()
        previous = self.root / "_previous" / case_id / version
        if old is not None:
            history = list(old.get("previous_versions", []))
            history.append(
                {
                    "path": str(previous.relative_to(self.root)),
                    "signature": old.get("signature"),
                    "committed_at": old.get("committed_at"),
                }
            )
            attrs = dict(attrs, previous_versions=history)
        content = {
            "labels": labels,
            "image": image,
            "attrs": attrs,
            "label_names": label_names or {},
            "values": values,
        }
        final: Path | PurePosixPath
        if self.is_local:
            final = self._commit_local(case_id, content, previous)
        else:
            remote_previous = PurePosixPath(previous) if old is not None else None
            final = self._commit_remote(case_id, content, remote_previous)
        self.close_failures(case_id, supersedes)
        return final

    def close_failures(self, *case_ids: str | None) -> None:
        """Remove the error and quarantine records of these cases (a committed case has no open failure;
        pipeline/store/records.py)."""
        for case_id in filter(None, case_ids):
            for folder in ("_errors", "_quarantine"):
                self.remove_json(self.root / folder / f"{case_id}.json")

    def remove_json(self, path: str | Path | PurePosixPath) -> None:
        """Remove a record if it is there."""
        if self.fs.exists(str(path)):
            self.fs.rm_file(str(path))

    def _commit_local(self, case_id: str, content: dict[str, Any], previous: Path | PurePosixPath) -> Path:
        final = Path(self.case_path(case_id))
        staging = (
            Path(self.root) / "_staging" / f"{case_id}.{writer_tag()}.{uuid.uuid4().hex[:8]}{CASE_SUFFIX}"
        )
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_local_group(staging, **content)
        except BaseException:  # a full disk, a kill: leave no half-written group behind, not even in staging
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if final.exists():
            Path(previous).parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, previous)
        os.replace(staging, final)
        return final

    def _commit_remote(
        self, case_id: str, content: dict[str, Any], previous: PurePosixPath | None
    ) -> PurePosixPath:
        final = PurePosixPath(self.case_path(case_id))
        if self.list_names(final):
            if previous is not None:  # the old version was committed: keep it
                self.fs.copy(str(final), str(previous), recursive=True)
            self.remove_json(final / "zarr.json")  # un-commit first, then clear
            self.fs.rm(str(final), recursive=True)
        write_case_group(self._zarr_target(final, read_only=False), **content)
        return final


def _multiscales(name: str, axes: list[str], scale: list[float]) -> list[dict[str, Any]]:
    kinds = {"c": "channel", "z": "space", "y": "space", "x": "space"}
    return [
        {
            "name": name,
            "axes": [
                {"name": a, "type": kinds[a], **({"unit": "millimeter"} if kinds[a] == "space" else {})}
                for a in axes
            ],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }
    ]


def image_label_metadata(
    labels: np.ndarray,
    *,
    names: Mapping[int, str | dict[str, Any]],
    instances: list[dict[str, Any]],
    values: list[int] | None = None,
) -> dict[str, Any]:
    """OME-Zarr 0.5 ``image-label`` metadata: a colour and properties for each non-zero value (``values``
    when the caller knows exactly which are present, else counted)."""
    values = present_labels(labels) if values is None else sorted({int(v) for v in values})
    meanings = describe_labels(values, names=names, instances=instances)
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
    values: list[int] | None,
) -> list[_Node]:
    """A case group's nodes, each with its final attributes: the root (OME multiscales of the image and the
    'medsam' attributes that carry the commit status), its image array, the labels group and the label map."""
    spacing = [float(s) for s in attrs["geometry"]["spacing_zyx_mm"]]
    image_codec, label_codec = _codecs()
    nodes = []
    root_attrs = {}
    if image is not None:
        axes = ["z", "y", "x"] if image.ndim == 3 else ["c", "z", "y", "x"]
        scale = spacing if image.ndim == 3 else [1.0, *spacing]
        root_attrs["ome"] = {"version": "0.5", "multiscales": _multiscales("image", axes, scale)}
        data = np.ascontiguousarray(image if image.ndim == 3 else np.moveaxis(image, -1, 0))
        chunks = (
            plane_chunks(data.shape, data.itemsize)
            if image.ndim == 3
            else (data.shape[0], *plane_chunks(data.shape[1:], data.itemsize * data.shape[0]))
        )
        nodes.append(_Node("0", {}, data, chunks, tuple(axes), image_codec))
    root_attrs["medsam"] = dict(attrs, status=STATUS_COMMITTED)
    nodes.insert(0, _Node("", root_attrs))
    nodes.append(_Node("labels", {"ome": {"version": "0.5", "labels": ["medsam"]}}))
    nodes.append(
        _Node(
            "labels/medsam",
            {
                "ome": {
                    "version": "0.5",
                    "multiscales": _multiscales("medsam", ["z", "y", "x"], spacing),
                    "image-label": image_label_metadata(
                        labels, names=label_names, instances=attrs.get("instances", []), values=values
                    ),
                }
            },
        )
    )
    stored = labels.astype(np.uint16, copy=False)
    nodes.append(
        _Node("labels/medsam/0", {}, stored, plane_chunks(stored.shape, 2), ("z", "y", "x"), label_codec)
    )
    return nodes


def write_case_group(
    target: str | Path | StoreLike,
    *,
    labels: np.ndarray,
    image: np.ndarray | None,
    attrs: dict[str, Any],
    label_names: dict[int, str | dict[str, Any]],
    values: list[int] | None = None,
) -> None:
    """Write one case group at ``target`` (a path or zarr store) through zarr; the root's 'medsam' attributes,
    which carry the commit status, are the last write. ``values``: the label values present in ``labels``
    when the caller knows them exactly (else counted)."""
    import zarr

    nodes = _case_nodes(labels, image, attrs, label_names, values)
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
    values: list[int] | None = None,
) -> dict[str, bytes] | None:
    """Every object of the case group that :func:`write_case_group` writes (key -> bytes), made without zarr:
    each node's ``zarr.json`` (zarr v3's document, the same JSON zarr writes, without its indentation) and
    each chunk through its codec's numcodecs twin (:func:`encoded_chunks`, byte for byte zarr's own; both
    compared in tests/store/test_direct_chunks.py). zarr's asynchronous API costs a thread hand-off and a
    metadata round-trip per node, most of a small case's write, and holds the interpreter lock while it does.
    None for an image type outside :data:`DIRECT_DTYPES` (written through zarr then)."""
    nodes = _case_nodes(labels, image, attrs, label_names, values)
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
    values: list[int] | None = None,
) -> None:
    """:func:`write_case_group` into a local folder. A small case is encoded in memory
    (:func:`encoded_case_group`) and its objects written as files here, the root's ``zarr.json`` last."""
    size = labels.nbytes + (image.nbytes if image is not None else 0)
    objects = None
    if size <= IN_MEMORY_BYTES:
        objects = encoded_case_group(
            labels=labels, image=image, attrs=attrs, label_names=label_names, values=values
        )
    if objects is None:
        write_case_group(
            str(folder), labels=labels, image=image, attrs=attrs, label_names=label_names, values=values
        )
        return
    made: set[Path] = set()
    for key in sorted(objects, key=lambda key: key == "zarr.json"):  # the root's last: it marks the commit
        path = folder / key
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(objects[key])


def writer_tag() -> str:
    """This process as a staging folder names it: a short hash of the machine (host and boot) and the pid."""
    return f"{hashlib.sha256(HOST.encode()).hexdigest()[:8]}-{os.getpid()}"


def _writer_gone(name: str) -> bool:
    """Whether the staging folder ``name`` was written by a process of this machine that no longer exists."""
    parts = name.split(".")
    if len(parts) < 3 or "-" not in parts[1]:
        return False
    machine, _, pid = parts[1].partition("-")
    mine = writer_tag().partition("-")[0]
    return machine == mine and pid.isdigit() and not process_alive(int(pid))


def remove_stale_staging(store: CaseStore, *, older_than_s: float = 24 * 3600) -> int:
    """Delete staging folders left by killed writers (local stores): at once when their writer was a process
    of this machine that is gone, else after ``older_than_s``. Returns how many were removed."""
    folder = Path(store.root) / "_staging"
    removed = 0
    if store.is_local and folder.is_dir():
        for path in folder.iterdir():
            try:
                stale = _writer_gone(path.name) or time.time() - path.stat().st_mtime > older_than_s
            except FileNotFoundError:  # committed meanwhile
                continue
            if stale:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    return removed
