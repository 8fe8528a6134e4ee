"""Faster CPU runtimes for LiteMedSAM: ONNX graphs exported from the loaded checkpoint, run in fp32 by ONNX
Runtime or OpenVINO. Eager torch stays the reference and the fallback.

Two graphs are exported (legacy TorchScript exporter, opset 17):

- ``encoder.onnx``: ``image`` float32 (N, 3, 256, 256), dynamic N -> ``embedding`` float32 (N, 256, 64, 64).
- ``decoder.onnx``: ``embedding`` float32 (1, 256, 64, 64) and ``boxes`` float32 (B, 1, 4), XYXY in the
  model's 256-pixel frame, dynamic B -> ``low_res_logits`` float32 (B, 1, 256, 256), ``iou`` float32 (B, 1).
  It is exported from pipeline/model/fast_decoder.py's factored form of SAM's decoder (box-independent work
  once per call, about 1.6 instead of 3.6 GFLOP per box), checked against the original modules like the
  encoder.

They live in ``$MEDSAM_ENGINE_CACHE`` (else ``~/.cache/medsam-engine``) under
``onnx/<checkpoint sha256[:16]>-<runtime>-<runtime version>-<torch version>/``; folders of other versions
or of models not in use are listed and removed by `medsam-engine store clean --graphs`
(:func:`graph_leftovers`). Each file is written under a temporary name and renamed into place;
``manifest.json`` is written last and records every graph's sha256 and the parity measured against eager torch
at export, so a partial, corrupt or foreign file is never used: it is exported again. Shapes follow the
network (a 1024-input SAM ViT would export too), but only LiteMedSAM is tested; a runtime that misses parity
raises :class:`BackendError` and ``auto`` falls back to eager torch.

This module does not import torch: a runner on cached graphs starts without it (seconds and ~0.5 GB saved per
worker). Exporting and the parity check (pipeline/model/graph_export.py) need torch and import it then.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Protocol

import numpy as np

from medsam_engine.pipeline.core.atomic import write_text_atomic
from medsam_engine.pipeline.core.disk import tree_size
from medsam_engine.pipeline.core.errors import RunError
from medsam_engine.pipeline.core.provenance import file_sha256
from medsam_engine.pipeline.core.types import Leftover

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
AUTO_ORDER = ("openvino", "onnxruntime")  # fastest first, measured by bench/runtimes.py (2-core AVX2 CPU)
OPSET = 17
EMBEDDING_TOLERANCE = 1e-4  # max |delta| of the embedding versus eager torch
LOGIT_TOLERANCE = 1e-2  # max |delta| of the decoder's low-res logits versus eager torch (logits span ~±30)
GRAPHS = ("encoder", "decoder")
# bump when the exported modules change: cached graphs are then re-exported
GRAPH_FORM = "factored-decoder-split-qkv-3"
GRAPH_LEFTOVERS = "model graphs"  # what `store clean --graphs` counts them as


class BackendError(RunError):
    """A runtime's graphs could not be built or do not reproduce eager torch."""


class Graphs(Protocol):
    """Both graphs compiled by one runtime; numpy in, numpy out."""

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def runtime_version(runtime: str) -> str:
    try:
        return version(runtime)
    except PackageNotFoundError as exc:
        raise ImportError(f"backend {runtime!r} needs the package {runtime!r} (pip install it)") from exc


def torch_version() -> str:
    """The installed torch's version, read from its package metadata (torch itself is not imported)."""
    return version("torch")


def default_threads() -> int:
    """Threads for a runtime: torch's intra-op setting when torch is loaded, else ``OMP_NUM_THREADS`` (Ray
    sets it for actors), else 0: the runtime's own default (one per physical core, as torch's)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):  # not while another thread imports it
        return torch.get_num_threads()
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() else 0


def graphs_root(cache_root: str | Path | None = None) -> Path:
    """The folder that holds one graph folder per checkpoint, runtime version and torch version."""
    root = Path(cache_root or os.environ.get("MEDSAM_ENGINE_CACHE") or Path.home() / ".cache/medsam-engine")
    return root / "onnx"


def graph_folder(sha256: str, runtime: str, *, cache_root: str | Path | None = None) -> Path:
    """The cache folder of one checkpoint's graphs for one runtime version and torch version."""
    return graphs_root(cache_root) / f"{sha256[:16]}-{runtime}-{runtime_version(runtime)}-{torch_version()}"


def _installed_suffixes() -> dict[str, str]:
    """``<runtime>-<its version>-<torch version>`` of each runtime installed here, by runtime."""
    found = {}
    for runtime in RUNTIMES:
        try:
            found[runtime] = f"{runtime}-{runtime_version(runtime)}-{torch_version()}"
        except (ImportError, PackageNotFoundError):
            continue
    return found


def graph_leftovers(models_in_use: set[str], *, cache_root: str | Path | None = None) -> list[Leftover]:
    """Graph folders this installation does not use (for `medsam-engine store clean --graphs`): made by
    another version of their runtime or of torch than the installed ones (or by a runtime not installed), or
    for a checkpoint whose sha256 (or its first 16 digits) is not in ``models_in_use``. Folders of other
    names are no graph folders and are left alone."""
    root, installed = graphs_root(cache_root), _installed_suffixes()
    in_use = {sha[:16] for sha in models_in_use}
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        sha, _, rest = path.name.partition("-")
        runtime = rest.partition("-")[0]
        if len(sha) != 16 or runtime not in RUNTIMES or not path.is_dir():
            continue
        if rest != installed.get(runtime):
            why = f"made by {runtime} or torch versions not installed here ({rest})"
        elif sha not in in_use:
            why = "for a model not in use"
        else:
            continue
        found.append(Leftover(GRAPH_LEFTOVERS, str(path), tree_size(path), why))
    return found


class OnnxRuntimeGraphs:
    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions = {
            name: ort.InferenceSession(
                str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for name in GRAPHS
        }

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._sessions["encoder"].run(None, {"image": np.ascontiguousarray(images)})[0]

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = {"embedding": np.ascontiguousarray(embedding), "boxes": np.ascontiguousarray(boxes)}
        logits, iou = self._sessions["decoder"].run(None, inputs)
        return logits, iou


class OpenVinoGraphs:
    def __init__(self, folder: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        # compiled graphs are cached next to the ONNX files (keyed by OpenVINO on graph and settings), so a
        # worker's start imports them instead of compiling; snippets off measured as fast or faster here
        core.set_property({"CACHE_DIR": str(folder / "openvino-cache")})
        config = {
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "SNIPPETS_MODE": "DISABLE",
        }
        self._compiled = {
            name: core.compile_model(str(folder / f"{name}.onnx"), "CPU", config) for name in GRAPHS
        }
        self._requests = {name: model.create_infer_request() for name, model in self._compiled.items()}

    def _run(self, name: str, inputs: dict) -> list[np.ndarray]:
        request = self._requests[name]
        request.infer({key: np.ascontiguousarray(value) for key, value in inputs.items()})
        return [
            np.array(request.get_output_tensor(i).data, copy=True)
            for i in range(len(self._compiled[name].outputs))
        ]

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._run("encoder", {"image": images})[0]

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, iou = self._run("decoder", {"embedding": embedding, "boxes": boxes})
        return logits, iou


RUNTIMES: dict[str, type[OnnxRuntimeGraphs | OpenVinoGraphs]] = {
    "onnxruntime": OnnxRuntimeGraphs,
    "openvino": OpenVinoGraphs,
}


def file_stamp(path: Path) -> list[int]:
    """A file's (size, modification time in ns): unchanged stamps mean unchanged bytes, as make and git
    assume."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def check_graphs(folder: Path, sha256: str) -> tuple[set[str], dict[str, list[int]]]:
    """Names of the graphs in ``folder`` that its manifest vouches for (same checkpoint, opset and bytes), and
    the stamps of those that had to be hashed to tell.

    A graph whose size and modification time are those the manifest recorded is not read again; any other is
    hashed and must match the recorded sha256 (files are only ever renamed into place whole). Its stamp is
    taken before hashing, so a file replaced meanwhile is hashed again next time."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return set(), {}
    if (
        manifest.get("checkpoint_sha256") != sha256
        or manifest.get("opset") != OPSET
        or manifest.get("form") != GRAPH_FORM
    ):
        return set(), {}
    hashes, stamps = manifest.get("graphs", {}), manifest.get("stamps", {})
    valid, hashed = set(), {}
    for name in GRAPHS:
        path = folder / f"{name}.onnx"
        if not path.is_file():
            continue
        stamp = file_stamp(path)
        if stamp == stamps.get(name):
            valid.add(name)
        elif file_sha256(path) == hashes.get(name):
            valid.add(name)
            hashed[name] = stamp
    return valid, hashed


def valid_graphs(folder: Path, sha256: str) -> set[str]:
    return check_graphs(folder, sha256)[0]


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the folder's manifest (last, after every graph it vouches for)."""
    write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=1))


def restamp(folder: Path, hashed: dict[str, list[int]]) -> None:
    """Record the stamps of graphs just verified by hash (a cache written before stamps existed, or copied
    without its modification times), so later starts skip the hashing. Best effort: a read-only or shared
    cache, or a manifest being rewritten by another worker, leaves the hashing for next time."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["stamps"] = {**manifest.get("stamps", {}), **hashed}
        write_manifest(folder, manifest)
    except (OSError, ValueError) as exc:
        log.debug("graph stamps in %s not recorded: %s", folder, exc)


def load_cached(
    sha256: str, runtime: str, *, cache_root: str | Path | None = None, threads: int | None = None
) -> Graphs | None:
    """Both graphs of the checkpoint ``sha256`` compiled by ``runtime`` when the cache's manifest vouches for
    them, else None (pipeline/model/graph_export.py then exports them). ``threads`` defaults to
    :func:`default_threads`."""
    if runtime not in RUNTIMES:
        raise ValueError(f"Argument 'runtime' must be one of {', '.join(RUNTIMES)}; got {runtime!r}.")
    folder = graph_folder(sha256, runtime, cache_root=cache_root)
    valid, hashed = check_graphs(folder, sha256)
    if any(name not in valid for name in GRAPHS):
        return None
    if hashed:
        restamp(folder, hashed)
    return RUNTIMES[runtime](folder, threads or default_threads())
