"""Faster CPU runtimes for LiteMedSAM: ONNX graphs exported from the loaded checkpoint, run in fp32 by ONNX
Runtime or OpenVINO. Eager torch stays the reference and the fallback.

Two graphs are exported (legacy TorchScript exporter, opset 17):

- ``encoder.onnx``: ``image`` float32 (N, 3, 256, 256), dynamic N -> ``embedding`` float32 (N, 256, 64, 64).
- ``decoder.onnx``: ``embedding`` float32 (1, 256, 64, 64) and ``boxes`` float32 (B, 1, 4), XYXY in the
  model's 256-pixel frame, dynamic B -> ``low_res_logits`` float32 (B, 1, 256, 256), ``iou`` float32 (B, 1).
  It is exported from pipeline/fast_decoder.py's factored form of SAM's decoder (box-independent work once
  per call, about 1.6 instead of 3.6 GFLOP per box), checked against the original modules like the encoder.

They live in ``$MEDSAM_ENGINE_CACHE`` (else ``~/.cache/medsam-engine``) under
``onnx/<checkpoint sha256[:16]>-<runtime>-<runtime version>-<torch version>/``. Each file is written under a
temporary name and renamed into place; ``manifest.json`` is written last and records every graph's sha256 and
the parity measured against eager torch at export, so a partial, corrupt or foreign file is never used: it is
exported again. Shapes follow the network (a 1024-input SAM ViT would export too), but only LiteMedSAM is
tested; a runtime that misses parity raises :class:`BackendError` and ``auto`` falls back to eager torch.

This module does not import torch: a runner on cached graphs starts without it (seconds and ~0.5 GB saved per
worker). Exporting and the parity check (pipeline/graph_export.py) need torch and import it then.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pipeline.model import file_sha256

if TYPE_CHECKING:
    from pipeline.model import LiteMedSAMRunner, LoadedModel

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
AUTO_ORDER = ("openvino", "onnxruntime")  # fastest first, measured by bench/runtimes.py (2-core AVX2 CPU)
OPSET = 17
EMBEDDING_TOLERANCE = 1e-4  # max |delta| of the embedding versus eager torch
LOGIT_TOLERANCE = 1e-2  # max |delta| of the decoder's low-res logits versus eager torch (logits span ~±30)
GRAPHS = ("encoder", "decoder")
GRAPH_FORM = "factored-decoder-split-qkv-3"  # bump when the exported modules change: cached graphs are then re-exported


class BackendError(RuntimeError):
    """A runtime's graphs could not be built or do not reproduce eager torch."""


class Graphs(Protocol):
    """Both graphs compiled by one runtime; numpy in, numpy out."""

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"Argument 'backend' must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    return backend


def runtime_version(runtime: str) -> str:
    try:
        return version(runtime)
    except PackageNotFoundError as exc:
        raise ImportError(f"backend {runtime!r} needs the package {runtime!r} (pip install it)") from exc


def torch_version() -> str:
    """The installed torch's version, read from its package metadata (torch itself is not imported)."""
    return version("torch")


def default_threads() -> int:
    """Threads for a runtime: torch's intra-op setting when torch is loaded, else ``OMP_NUM_THREADS`` (Ray sets
    it for actors), else 0: the runtime's own default (one per physical core, as torch's)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):  # not while another thread imports it
        return torch.get_num_threads()
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() else 0


def graph_folder(sha256: str, runtime: str, *, cache_root: str | Path | None = None) -> Path:
    """The cache folder of one checkpoint's graphs for one runtime version and torch version."""
    root = Path(cache_root or os.environ.get("MEDSAM_ENGINE_CACHE") or Path.home() / ".cache/medsam-engine")
    return root / "onnx" / f"{sha256[:16]}-{runtime}-{runtime_version(runtime)}-{torch_version()}"


def write_atomic(folder: Path, name: str, write) -> None:
    """Call ``write(temp_path)``, then rename the temporary file to ``folder / name``."""
    handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o644)  # mkstemp makes it private; the cache may be shared by a team's workers
        os.replace(temp, folder / name)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


class OnnxRuntimeGraphs:
    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions = {name: ort.InferenceSession(str(folder / f"{name}.onnx"), options,
                                                     providers=["CPUExecutionProvider"]) for name in GRAPHS}

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
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY", "SNIPPETS_MODE": "DISABLE"}
        self._compiled = {name: core.compile_model(str(folder / f"{name}.onnx"), "CPU", config)
                          for name in GRAPHS}
        self._requests = {name: model.create_infer_request() for name, model in self._compiled.items()}

    def _run(self, name: str, inputs: dict) -> list[np.ndarray]:
        request = self._requests[name]
        request.infer({key: np.ascontiguousarray(value) for key, value in inputs.items()})
        return [np.array(request.get_output_tensor(i).data, copy=True)
                for i in range(len(self._compiled[name].outputs))]

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._run("encoder", {"image": images})[0]

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, iou = self._run("decoder", {"embedding": embedding, "boxes": boxes})
        return logits, iou


RUNTIMES: dict[str, type[OnnxRuntimeGraphs | OpenVinoGraphs]] = {"onnxruntime": OnnxRuntimeGraphs,
                                                                 "openvino": OpenVinoGraphs}


def _stamp(path: Path) -> list[int]:
    """A file's (size, modification time in ns): unchanged stamps mean unchanged bytes, as make and git assume."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _check_graphs(folder: Path, sha256: str) -> tuple[set[str], dict[str, list[int]]]:
    """Names of the graphs in ``folder`` that its manifest vouches for (same checkpoint, opset and bytes), and
    the stamps of those that had to be hashed to tell.

    A graph whose size and modification time are those the manifest recorded is not read again; any other is
    hashed and must match the recorded sha256 (files are only ever renamed into place whole). Its stamp is
    taken before hashing, so a file replaced meanwhile is hashed again next time."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return set(), {}
    if (manifest.get("checkpoint_sha256") != sha256 or manifest.get("opset") != OPSET
            or manifest.get("form") != GRAPH_FORM):
        return set(), {}
    hashes, stamps = manifest.get("graphs", {}), manifest.get("stamps", {})
    valid, hashed = set(), {}
    for name in GRAPHS:
        path = folder / f"{name}.onnx"
        if not path.is_file():
            continue
        stamp = _stamp(path)
        if stamp == stamps.get(name):
            valid.add(name)
        elif file_sha256(path) == hashes.get(name):
            valid.add(name)
            hashed[name] = stamp
    return valid, hashed


def _valid_graphs(folder: Path, sha256: str) -> set[str]:
    return _check_graphs(folder, sha256)[0]


def _write_manifest(folder: Path, manifest: dict) -> None:
    write_atomic(folder, "manifest.json", lambda path: Path(path).write_text(json.dumps(manifest, indent=1)))


def _restamp(folder: Path, hashed: dict[str, list[int]]) -> None:
    """Record the stamps of graphs just verified by hash (a cache written before stamps existed, or copied
    without its modification times), so later starts skip the hashing. Best effort: a read-only or shared
    cache, or a manifest being rewritten by another worker, leaves the hashing for next time."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["stamps"] = {**manifest.get("stamps", {}), **hashed}
        _write_manifest(folder, manifest)
    except (OSError, ValueError) as exc:
        log.debug("graph stamps in %s not recorded: %s", folder, exc)


def _provide(model: LoadedModel, folder: Path, names: tuple[str, ...]) -> None:
    """Put the named graphs into ``folder``: copied from another runtime's verified folder for the same
    checkpoint and torch version if there is one (ONNX files do not depend on the runtime), else exported."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = list(names)
    for sibling in sorted(folder.parent.glob(f"{model.sha256[:16]}-*-{torch_version()}")):
        if sibling == folder or not missing:
            continue
        for name in sorted(_valid_graphs(sibling, model.sha256) & set(missing)):
            source = sibling / f"{name}.onnx"
            write_atomic(folder, f"{name}.onnx", lambda path, src=source: shutil.copyfile(src, path))
            missing.remove(name)
    if missing:
        from pipeline.graph_export import export_graphs

        export_graphs(model.net, folder, tuple(missing))


def load_graphs(model: LoadedModel, runtime: str, *, cache_root: str | Path | None = None,
                threads: int | None = None) -> Graphs:
    """Both graphs of ``model`` compiled by ``runtime``, from the cache when its manifest vouches for them.

    Graphs that are missing or whose bytes differ from the manifest are exported (or copied) again; then the
    runtime is checked against eager torch (embedding max |delta| <= 1e-4, logits <= 1e-2) before the manifest
    is written, :class:`BackendError` if it fails. ``threads`` defaults to :func:`default_threads`.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"Argument 'runtime' must be one of {', '.join(RUNTIMES)}; got {runtime!r}.")
    folder = graph_folder(model.sha256, runtime, cache_root=cache_root)
    threads = threads or default_threads()
    valid, hashed = _check_graphs(folder, model.sha256)
    stale = tuple(name for name in GRAPHS if name not in valid)
    if not stale:
        if hashed:
            _restamp(folder, hashed)
        return RUNTIMES[runtime](folder, threads)
    if folder.exists():
        log.warning("cached %s graphs %s in %s are missing, damaged or of an older form; exporting them again",
                    runtime, stale, folder)
    from pipeline.graph_export import measure_parity

    (folder / "manifest.json").unlink(missing_ok=True)
    _provide(model, folder, stale)
    graphs = RUNTIMES[runtime](folder, threads)
    parity = measure_parity(model, graphs)
    if parity["embedding"] > EMBEDDING_TOLERANCE or parity["logits"] > LOGIT_TOLERANCE:
        raise BackendError(f"{runtime} {runtime_version(runtime)} does not reproduce eager torch: {parity}")
    manifest = {"checkpoint_sha256": model.sha256, "runtime": runtime,
                "runtime_version": runtime_version(runtime), "torch": torch_version(), "opset": OPSET,
                "form": GRAPH_FORM,
                "parity_max_abs": parity,
                "graphs": {name: file_sha256(folder / f"{name}.onnx") for name in GRAPHS},
                "stamps": {name: _stamp(folder / f"{name}.onnx") for name in GRAPHS}}
    _write_manifest(folder, manifest)
    return graphs


def auto_candidates(device: str) -> list[str]:
    """Backends ``auto`` tries, in order: eager torch on CUDA; on CPU the installed runtimes, fastest first,
    then eager torch."""
    if device != "cpu":
        return ["torch"]
    installed = []
    for runtime in AUTO_ORDER:
        try:
            runtime_version(runtime)
        except ImportError:
            continue
        installed.append(runtime)
    return installed + ["torch"]


def build_runner(model: LoadedModel, *, device: str = "cpu", backend: str = "auto",
                 **options) -> LiteMedSAMRunner:
    """A runner on ``backend``; ``auto`` takes the first of :func:`auto_candidates` that builds and passes
    parity (a runtime that fails is logged and skipped; eager torch always works)."""
    from pipeline.model import LiteMedSAMRunner

    if backend == "auto" and getattr(model, "kind", "lite") != "lite":
        backend = "torch"  # the exported graphs are LiteMedSAM's; a ViT checkpoint runs in eager torch
    if backend != "auto":
        return LiteMedSAMRunner(model, device=device, backend=check_backend(backend), **options)
    for candidate in auto_candidates(device)[:-1]:
        try:
            return LiteMedSAMRunner(model, device=device, backend=candidate, **options)
        except (BackendError, ImportError) as exc:
            log.warning("backend %s unavailable (%s); trying the next", candidate, exc)
    return LiteMedSAMRunner(model, device=device, backend="torch", **options)
