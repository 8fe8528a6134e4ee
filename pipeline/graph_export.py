"""Exporting LiteMedSAM's graphs for the CPU runtimes (pipeline/backends.py) and checking them against eager torch.

Only a cache miss comes here (a new checkpoint, runtime or torch version, or a damaged cache): this module
imports torch, which a runner on cached graphs never needs. The encoder is exported from a copy with two
runtime-friendly rewrites (batch read from the shape; q/k/v projected separately), the decoder from
pipeline/fast_decoder.py's factored form; both are checked against SAM's own modules by
:func:`measure_parity` before pipeline/backends.py writes the manifest that vouches for them.
"""
from __future__ import annotations

import copy
import logging
import types
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.backends import GRAPHS, OPSET, Graphs, write_atomic
from pipeline.fast_decoder import BoxDecoder

if TYPE_CHECKING:
    from pipeline.model import LoadedModel

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
        write_atomic(folder, f"{name}.onnx", write)
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
    return {"embedding": float(np.abs(got - embedding).max()),
            "logits": float(np.abs(got_logits - logits).max()), "iou": float(np.abs(got_iou - iou).max())}


