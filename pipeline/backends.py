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
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import types
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

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
GRAPH_FORM = "factored-decoder-split-qkv-2"  # bump when the exported modules change: cached graphs are then re-exported
exports: Counter[str] = Counter()  # graphs exported by this process, by name (tests read it)


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


class BoxDecoder(torch.nn.Module):
    """Prompt encoder + mask decoder of one slice as one graph: (embedding, boxes) -> (logits, IoU).

    ``embedding`` (1, 256, 64, 64); ``boxes`` (B, 1, 4) XYXY in the 256 frame. The dense positional encoding
    does not depend on the input, so it is stored as a constant.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder
        self.register_buffer("dense_pe", net.prompt_encoder.get_dense_pe().detach().clone())

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(image_embeddings=embedding, image_pe=self.dense_pe,
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=False)


def _patch_merging_forward(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's PatchMerging.forward with the batch size read as ``x.shape[0]``: the original ``len(x)``
    becomes a constant when traced, which would fix the exported encoder's batch size."""
    if x.ndim == 3:
        height, width = self.input_resolution
        x = x.view(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    return self.conv3(x).flatten(2).transpose(1, 2)


def _split_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's Attention.forward with queries, keys and values from three projections instead of one
    projection split in three (OpenVINO runs that split with a reference kernel), and the 1/sqrt(d) scale
    folded into the query projection; the same arithmetic otherwise."""
    b, n, _ = x.shape
    x = self.norm(x)
    q = torch.nn.functional.linear(x, self.q_weight, self.q_bias).view(b, n, self.num_heads, -1).transpose(1, 2)
    k = torch.nn.functional.linear(x, self.k_weight, self.k_bias).view(b, n, self.num_heads, -1).transpose(1, 2)
    v = torch.nn.functional.linear(x, self.v_weight, self.v_bias).view(b, n, self.num_heads, -1).transpose(1, 2)
    attn = (q @ k.transpose(-2, -1) + self.ab).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.dh))


def _split_qkv(module: torch.nn.Module) -> None:
    """Give a TinyViT Attention module separate q/k/v weights (per head, the fused weight holds q, k, v in
    that order) and the split forward."""
    heads, key_dim = module.num_heads, module.key_dim
    weight = module.qkv.weight.detach().reshape(heads, 2 * key_dim + module.d, -1)
    bias = module.qkv.bias.detach().reshape(heads, 2 * key_dim + module.d)
    parts = {"q": slice(0, key_dim), "k": slice(key_dim, 2 * key_dim), "v": slice(2 * key_dim, None)}
    for name, part in parts.items():
        scale = module.scale if name == "q" else 1.0
        module.register_buffer(f"{name}_weight", weight[:, part].reshape(-1, weight.shape[-1]) * scale)
        module.register_buffer(f"{name}_bias", bias[:, part].reshape(-1) * scale)
    module.forward = types.MethodType(_split_attention_forward, module)


def traceable_encoder(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of the image encoder whose traced graph keeps a dynamic batch and runs fast (the live model is
    untouched): PatchMerging reads the batch size from the shape, attention projects q, k, v separately."""
    encoder = copy.deepcopy(net.image_encoder).eval()
    for module in encoder.modules():
        if type(module).__name__ == "PatchMerging":
            module.forward = types.MethodType(_patch_merging_forward, module)
        elif type(module).__name__ == "Attention" and hasattr(module, "qkv") and hasattr(module, "ab"):
            _split_qkv(module)
    return encoder


def runtime_version(runtime: str) -> str:
    try:
        return version(runtime)
    except PackageNotFoundError as exc:
        raise ImportError(f"backend {runtime!r} needs the package {runtime!r} (pip install it)") from exc


def graph_folder(sha256: str, runtime: str, *, cache_root: str | Path | None = None) -> Path:
    """The cache folder of one checkpoint's graphs for one runtime version and torch version."""
    root = Path(cache_root or os.environ.get("MEDSAM_ENGINE_CACHE") or Path.home() / ".cache/medsam-engine")
    return root / "onnx" / f"{sha256[:16]}-{runtime}-{runtime_version(runtime)}-{torch.__version__}"


def _write_atomic(folder: Path, name: str, write) -> None:
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


def _example_inputs(net: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed smooth image batch in [0, 1], (N, 3, S, S) with S the encoder's input side (256 for
    LiteMedSAM), and three boxes (3, 1, 4) in that frame."""
    side = int(getattr(net.image_encoder, "img_size", 256))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    disc = ((xx - 0.2) ** 2 + (yy + 0.1) ** 2 < 0.15).float()
    images = torch.stack([(0.5 + 0.3 * torch.sin(4 * xx * (i + 1)) * torch.cos(3 * yy) + 0.2 * disc) / 1.2
                          for i in range(batch)])
    boxes = torch.tensor([[[100.0, 90.0, 180.0, 160.0]], [[20.0, 30.0, 240.0, 220.0]],
                          [[60.0, 60.0, 90.0, 75.0]]]) * (side / 256)
    return images[:, None].expand(-1, 3, -1, -1).contiguous(), boxes


def export_graphs(net: torch.nn.Module, folder: Path, names: tuple[str, ...] = GRAPHS) -> None:
    """Export the named graphs of ``net`` into ``folder`` (each renamed into place when complete)."""
    import warnings

    from pipeline.fast_decoder import FactoredBoxDecoder

    folder.mkdir(parents=True, exist_ok=True)
    images, boxes = _example_inputs(net)  # traced with 2 images and 3 boxes; parity is checked with 1 image
    embedding = torch.zeros(1, net.prompt_encoder.embed_dim, *net.prompt_encoder.image_embedding_size)
    specs = {
        "encoder": (traceable_encoder(net), (images,), ["image"], ["embedding"],
                    {"image": {0: "n"}, "embedding": {0: "n"}}),
        "decoder": (FactoredBoxDecoder(net).eval(), (embedding, boxes), ["embedding", "boxes"],
                    ["low_res_logits", "iou"],
                    {"boxes": {0: "b"}, "low_res_logits": {0: "b"}, "iou": {0: "b"}}),
    }
    for name in names:
        def write(path: str, spec=specs[name]) -> None:
            module, args, inputs, outputs, axes = spec
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
                torch.onnx.export(module, args, path, dynamo=False, opset_version=OPSET, input_names=inputs,
                                  output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
        log.info("exporting the LiteMedSAM %s to %s", name, folder)
        _write_atomic(folder, f"{name}.onnx", write)
        exports[name] += 1


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


_eager_references: dict[str, tuple[np.ndarray, ...]] = {}  # checkpoint sha256 -> eager outputs on the example


@torch.inference_mode()
def _eager_reference(model: LoadedModel) -> tuple[np.ndarray, ...]:
    """Eager torch's embedding, low-res logits and IoU on the fixed example (computed once per checkpoint)."""
    if model.sha256 not in _eager_references:
        images, boxes = _example_inputs(model.net, batch=1)
        embedding = model.net.image_encoder(images)
        logits, iou = BoxDecoder(model.net)(embedding, boxes)
        _eager_references[model.sha256] = (embedding.cpu().numpy(), logits.cpu().numpy(), iou.cpu().numpy())
    return _eager_references[model.sha256]


def measure_parity(model: LoadedModel, graphs: Graphs) -> dict[str, float]:
    """Max |delta| of embedding, low-res logits and IoU between ``graphs`` and eager torch on a fixed example
    (one image, traced with two: this also checks that the batch size is dynamic)."""
    images, boxes = _example_inputs(model.net, batch=1)
    embedding, logits, iou = _eager_reference(model)
    got = graphs.encode(images.numpy())
    got_logits, got_iou = graphs.decode(embedding, boxes.numpy())
    return {"embedding": float(np.abs(got - embedding).max()),
            "logits": float(np.abs(got_logits - logits).max()), "iou": float(np.abs(got_iou - iou).max())}


def _valid_graphs(folder: Path, sha256: str) -> set[str]:
    """Names of the graphs in ``folder`` that its manifest vouches for (same checkpoint, opset and bytes)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return set()
    if (manifest.get("checkpoint_sha256") != sha256 or manifest.get("opset") != OPSET
            or manifest.get("form") != GRAPH_FORM):
        return set()
    hashes = manifest.get("graphs", {})
    return {name for name in GRAPHS
            if (folder / f"{name}.onnx").is_file() and file_sha256(folder / f"{name}.onnx") == hashes.get(name)}


def _provide(model: LoadedModel, folder: Path, names: tuple[str, ...]) -> None:
    """Put the named graphs into ``folder``: copied from another runtime's verified folder for the same
    checkpoint and torch version if there is one (ONNX files do not depend on the runtime), else exported."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = list(names)
    for sibling in sorted(folder.parent.glob(f"{model.sha256[:16]}-*-{torch.__version__}")):
        if sibling == folder or not missing:
            continue
        for name in sorted(_valid_graphs(sibling, model.sha256) & set(missing)):
            source = sibling / f"{name}.onnx"
            _write_atomic(folder, f"{name}.onnx", lambda path, src=source: shutil.copyfile(src, path))
            missing.remove(name)
    if missing:
        export_graphs(model.net, folder, tuple(missing))


def load_graphs(model: LoadedModel, runtime: str, *, cache_root: str | Path | None = None,
                threads: int | None = None) -> Graphs:
    """Both graphs of ``model`` compiled by ``runtime``, from the cache when its manifest vouches for them.

    Graphs that are missing or whose bytes differ from the manifest are exported (or copied) again; then the
    runtime is checked against eager torch (embedding max |delta| <= 1e-4, logits <= 1e-2) before the manifest
    is written, :class:`BackendError` if it fails. ``threads`` defaults to torch's intra-op thread count.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"Argument 'runtime' must be one of {', '.join(RUNTIMES)}; got {runtime!r}.")
    folder = graph_folder(model.sha256, runtime, cache_root=cache_root)
    threads = threads or torch.get_num_threads()
    stale = tuple(name for name in GRAPHS if name not in _valid_graphs(folder, model.sha256))
    if not stale:
        return RUNTIMES[runtime](folder, threads)
    if folder.exists():
        log.warning("cached %s graphs %s in %s are missing, damaged or of an older form; exporting them again",
                    runtime, stale, folder)
    (folder / "manifest.json").unlink(missing_ok=True)
    _provide(model, folder, stale)
    graphs = RUNTIMES[runtime](folder, threads)
    parity = measure_parity(model, graphs)
    if parity["embedding"] > EMBEDDING_TOLERANCE or parity["logits"] > LOGIT_TOLERANCE:
        raise BackendError(f"{runtime} {runtime_version(runtime)} does not reproduce eager torch: {parity}")
    manifest = {"checkpoint_sha256": model.sha256, "runtime": runtime,
                "runtime_version": runtime_version(runtime), "torch": torch.__version__, "opset": OPSET,
                "form": GRAPH_FORM,
                "parity_max_abs": parity,
                "graphs": {name: file_sha256(folder / f"{name}.onnx") for name in GRAPHS}}
    _write_atomic(folder, "manifest.json", lambda path: Path(path).write_text(json.dumps(manifest, indent=1)))
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
