"""Exporting LiteMedSAM's graphs for the CPU runtimes (pipeline/model/graph_cache.py) and checking them
against eager torch.

Only a cache miss comes here (a new checkpoint, runtime or torch version, or a damaged cache): this module
imports torch, which a runner on cached graphs never needs. The encoder is exported from a copy with two
runtime-friendly rewrites (batch read from the shape; q/k/v projected separately), the decoder from
pipeline/model/fast_decoder.py's factored form; both are checked against SAM's own modules by
:func:`measure_parity` before :func:`provide_graphs` writes the manifest that vouches for them.
"""

from __future__ import annotations

import copy
import logging
import shutil
import types
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from medsam_engine.pipeline.core.atomic import atomic_file
from medsam_engine.pipeline.core.provenance import file_sha256
from medsam_engine.pipeline.model.checkpoint import LoadedModel
from medsam_engine.pipeline.model.fast_decoder import BoxDecoder, FactoredBoxDecoder
from medsam_engine.pipeline.model.graph_cache import (
    EMBEDDING_TOLERANCE,
    GRAPH_FORM,
    GRAPHS,
    LOGIT_TOLERANCE,
    OPSET,
    RUNTIMES,
    BackendError,
    Graphs,
    default_threads,
    file_stamp,
    graph_folder,
    runtime_version,
    torch_version,
    valid_graphs,
    write_manifest,
)

log = logging.getLogger(__name__)

exports: Counter[str] = Counter()  # graphs exported by this process, by name (tests read it)


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
    q = (
        torch.nn.functional.linear(x, self.q_weight, self.q_bias)
        .view(b, n, self.num_heads, -1)
        .transpose(1, 2)
    )
    k = (
        torch.nn.functional.linear(x, self.k_weight, self.k_bias)
        .view(b, n, self.num_heads, -1)
        .transpose(1, 2)
    )
    v = (
        torch.nn.functional.linear(x, self.v_weight, self.v_bias)
        .view(b, n, self.num_heads, -1)
        .transpose(1, 2)
    )
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


def _example_inputs(net: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed smooth image batch in [0, 1], (N, 3, S, S) with S the encoder's input side (256 for
    LiteMedSAM), and three boxes (3, 1, 4) in that frame."""
    side = int(getattr(net.image_encoder, "img_size", 256))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    disc = ((xx - 0.2) ** 2 + (yy + 0.1) ** 2 < 0.15).float()
    images = torch.stack(
        [
            (0.5 + 0.3 * torch.sin(4 * xx * (i + 1)) * torch.cos(3 * yy) + 0.2 * disc) / 1.2
            for i in range(batch)
        ]
    )
    boxes = torch.tensor(
        [[[100.0, 90.0, 180.0, 160.0]], [[20.0, 30.0, 240.0, 220.0]], [[60.0, 60.0, 90.0, 75.0]]]
    ) * (side / 256)
    return images[:, None].expand(-1, 3, -1, -1).contiguous(), boxes


def export_graphs(net: torch.nn.Module, folder: Path, names: tuple[str, ...] = GRAPHS) -> None:
    """Export the named graphs of ``net`` into ``folder`` (each renamed into place when complete)."""
    import warnings

    folder.mkdir(parents=True, exist_ok=True)
    images, boxes = _example_inputs(net)  # traced with 2 images and 3 boxes; parity is checked with 1 image
    embedding = torch.zeros(1, net.prompt_encoder.embed_dim, *net.prompt_encoder.image_embedding_size)
    specs = {
        "encoder": (
            traceable_encoder(net),
            (images,),
            ["image"],
            ["embedding"],
            {"image": {0: "n"}, "embedding": {0: "n"}},
        ),
        "decoder": (
            FactoredBoxDecoder(net).eval(),
            (embedding, boxes),
            ["embedding", "boxes"],
            ["low_res_logits", "iou"],
            {"boxes": {0: "b"}, "low_res_logits": {0: "b"}, "iou": {0: "b"}},
        ),
    }
    for name in names:
        module, args, inputs, outputs, axes = specs[name]
        log.info("exporting the LiteMedSAM %s to %s", name, folder)
        with atomic_file(folder / f"{name}.onnx") as path, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        exports[name] += 1


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
    return {
        "embedding": float(np.abs(got - embedding).max()),
        "logits": float(np.abs(got_logits - logits).max()),
        "iou": float(np.abs(got_iou - iou).max()),
    }


def _provide(model: LoadedModel, folder: Path, names: tuple[str, ...]) -> None:
    """Put the named graphs into ``folder``: copied from another runtime's verified folder for the same
    checkpoint and torch version if there is one (ONNX files do not depend on the runtime), else exported."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = list(names)
    for sibling in sorted(folder.parent.glob(f"{model.sha256[:16]}-*-{torch_version()}")):
        if sibling == folder or not missing:
            continue
        for name in sorted(valid_graphs(sibling, model.sha256) & set(missing)):
            with atomic_file(folder / f"{name}.onnx") as path:
                shutil.copyfile(sibling / f"{name}.onnx", path)
            missing.remove(name)
    if missing:
        export_graphs(model.net, folder, tuple(missing))


def provide_graphs(
    model: LoadedModel, runtime: str, *, cache_root: str | Path | None = None, threads: int | None = None
) -> Graphs:
    """Export (or copy) the graphs of ``model`` that the cache lacks or holds damaged, check ``runtime``
    against eager torch (embedding max |delta| <= 1e-4, logits <= 1e-2) and only then write the manifest that
    vouches for them; :class:`BackendError` if parity fails."""
    folder = graph_folder(model.sha256, runtime, cache_root=cache_root)
    stale = tuple(name for name in GRAPHS if name not in valid_graphs(folder, model.sha256))
    if folder.exists():
        log.warning(
            "cached %s graphs %s in %s are missing, damaged or of an older form; exporting them again",
            runtime,
            stale,
            folder,
        )
    (folder / "manifest.json").unlink(missing_ok=True)
    _provide(model, folder, stale)
    graphs = RUNTIMES[runtime](folder, threads or default_threads())
    parity = measure_parity(model, graphs)
    if parity["embedding"] > EMBEDDING_TOLERANCE or parity["logits"] > LOGIT_TOLERANCE:
        raise BackendError(f"{runtime} {runtime_version(runtime)} does not reproduce eager torch: {parity}")
    manifest = {
        "checkpoint_sha256": model.sha256,
        "runtime": runtime,
        "runtime_version": runtime_version(runtime),
        "torch": torch_version(),
        "opset": OPSET,
        "form": GRAPH_FORM,
        "parity_max_abs": parity,
        "graphs": {name: file_sha256(folder / f"{name}.onnx") for name in GRAPHS},
        "stamps": {name: file_stamp(folder / f"{name}.onnx") for name in GRAPHS},
    }
    write_manifest(folder, manifest)
    return graphs
