"""The LiteMedSAM runner: one encoder pass per slice, all of a slice's boxes in one decoder call.

The runner knows nothing of Ray, Prefect or the store. ``set_slice`` embeds one prepared slice (one encoder
pass); ``decode`` segments all boxes of that slice in one batched decoder call, at the slice's original
resolution. Boxes come in voxel XYXY; the model's 256-pixel boxes live only in here.

Nothing here imports torch until it is needed: a runner on cached CPU graphs (pipeline/model/graph_cache.py,
handed in by pipeline/model/build.py) runs the bundled checkpoint with numpy, OpenCV and the runtime alone,
which saves a worker seconds of start-up and about 0.5 GB of memory. Eager torch, exports and users'
checkpoints import it on first use.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np

from medsam_engine.pipeline.model.checkpoint import LoadedModel
from medsam_engine.pipeline.model.devices import gpu_share
from medsam_engine.pipeline.model.graph_cache import BACKENDS, Graphs

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_ENCODER_BATCH = 128  # slices per encoder call on CUDA at most (larger batches gain little there)


@dataclass
class RunnerStats:
    encoder_calls: int = 0
    encoded_slices: int = 0
    decoder_calls: int = 0
    decoded_boxes: int = 0
    seconds_encode: float = 0.0
    seconds_decode: float = 0.0
    cache_hits: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SliceEmbedding:
    """An encoded slice: the (1, 256, 64, 64) embedding (a torch tensor in eager torch, a numpy array on the
    CPU graphs), the slice's (H, W) and its resized (h, w)."""

    embedding: torch.Tensor | np.ndarray
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]

    def array(self) -> np.ndarray:
        """The embedding as a float32 numpy array on the CPU."""
        if isinstance(self.embedding, np.ndarray):
            return self.embedding
        return self.embedding.detach().float().cpu().numpy()

    def tensor(self) -> torch.Tensor:
        """The embedding as a torch tensor (on the runner's device when eager torch made it)."""
        if isinstance(self.embedding, np.ndarray):
            import torch

            return torch.from_numpy(self.embedding)
        return self.embedding


def check_graph_backend(model: LoadedModel, device: str, backend: str) -> None:
    """ValueError naming the argument when ``backend`` cannot run ``model`` on ``device``: the exported graphs
    are LiteMedSAM's and run on the CPU; eager torch runs every kind anywhere."""
    if backend not in BACKENDS:
        raise ValueError(f"Argument 'backend' must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    if backend == "torch":
        return
    if model.kind != "lite":
        raise ValueError(
            f"Argument 'backend' {backend!r} runs LiteMedSAM only; "
            f"a {model.kind} checkpoint runs on backend 'torch'."
        )
    if device != "cpu":
        raise ValueError(f"Argument 'backend' {backend!r} runs on the CPU only, but device is {device!r}.")


@dataclass
class LiteMedSAMRunner:
    """Encode once per slice, decode all of a slice's boxes in one call.

    Embeddings of the most recent slices are kept (up to ``cache_bytes``, least recently used first out),
    keyed by the slice's bytes, so a detector that embeds a slice and the segmentation that follows share
    one encoder pass. ``backend`` runs both networks in eager torch (the reference) or, on CPU, as exported
    fp32 graphs in ONNX Runtime or OpenVINO (see pipeline/model/graph_cache.py).
    """

    model: LoadedModel
    device: str = "cpu"
    stats: RunnerStats = field(default_factory=RunnerStats)
    cache_bytes: int = 512 * 1024 * 1024
    backend: str = "torch"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is slow and lossy there)
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    graphs: Graphs | None = field(default=None, repr=False)  # the runtime's compiled graphs (build.py)
    _box_decoder: torch.nn.Module | None = field(default=None, repr=False)  # eager torch's decoder
    _memory_batch: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"Argument 'precision' must be auto, fp32 or bf16; got {self.precision!r}.")
        if self.precision == "bf16" and not str(self.device).startswith("cuda"):
            raise ValueError("Argument 'precision' bf16 is for CUDA devices only; the CPU runs fp32.")

        check_graph_backend(self.model, self.device, self.backend)
        if self.backend != "torch":
            if self.graphs is None:
                raise ValueError(
                    f"Argument 'graphs' is needed for backend {self.backend!r}: build the runner "
                    "with pipeline.model.build.build_runner, which loads or exports them."
                )
        else:  # eager torch builds the network now (strict keys); SAM's own decoder modules, the reference
            from medsam_engine.pipeline.model.fast_decoder import BoxDecoder

            self._box_decoder = BoxDecoder(self.model.net)

    @property
    def bf16(self) -> bool:
        """Whether eager torch runs under bf16 autocast (CUDA only)."""
        return (
            str(self.device).startswith("cuda") and self.precision in ("auto", "bf16") and self.graphs is None
        )

    def memory_batch(self, *, share: float | None = None, cap: int = MAX_ENCODER_BATCH) -> int:
        """Slices per encoder call for this runner: on CUDA as many as fit ``share`` of the device's free
        memory (default: half, times the fraction of the GPU this process holds, ``devices.gpu_share``; the
        memory one slice adds to an encoder call, measured once), at most ``cap``; 1 elsewhere (on the CPU
        batches were measured no faster, and cost memory)."""
        if not str(self.device).startswith("cuda") or self.graphs is not None:
            return 1
        if self._memory_batch is None:
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            share = 0.5 * gpu_share() if share is None else share
            self._memory_batch = fitting_batch(free, self._slice_bytes(), share=share, cap=cap)
            log.info("encoder batch %d (%.1f GiB free on %s)", self._memory_batch, free / 2**30, self.device)
        return self._memory_batch

    def _slice_bytes(self) -> int:
        """CUDA memory one more slice adds to an encoder call: peak of a two-slice call minus a one-slice
        one."""
        import torch

        device = torch.device(self.device)
        peaks = []
        for count in (1, 2):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            images = torch.zeros((count, 3, self.model.framing.size, self.model.framing.size), device=device)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                self.model.net.image_encoder(images)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
            del images
        return max(peaks[1] - peaks[0], peaks[0] // 2, 1)

    @staticmethod
    def _key(slice_u8: np.ndarray) -> bytes:
        return hashlib.blake2b(
            np.ascontiguousarray(slice_u8).data, digest_size=16, person=str(slice_u8.shape).encode()[:16]
        ).digest()

    def encode(self, slices_u8: list[np.ndarray]) -> list[SliceEmbedding]:
        """Embed slices ((H, W) or (H, W, 3) uint8), one encoder call for those not cached."""
        keys = [self._key(s) for s in slices_u8]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            fresh = self._encode([slices_u8[i] for i in missing])
            for i, embedded in zip(missing, fresh, strict=False):
                self._remember(keys[i], embedded)
        self.stats.cache_hits += len(slices_u8) - len(missing)
        out = []
        for key in keys:
            self._cache.move_to_end(key)
            out.append(self._cache[key])
        self._trim()
        return out

    def _remember(self, key: bytes, embedded: SliceEmbedding) -> None:
        self._cache[key] = embedded

    def _trim(self) -> None:
        size = sum(_nbytes(e.embedding) for e in self._cache.values())
        while self._cache and size > self.cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            size -= _nbytes(dropped.embedding)

    def _encode(self, slices_u8: list[np.ndarray]) -> list[SliceEmbedding]:
        prepared = [self.model.framing.prepare(s) for s in slices_u8]
        images = np.ascontiguousarray(np.stack([p[0] for p in prepared]).transpose(0, 3, 1, 2))
        start = time.perf_counter()
        if self.graphs is None:
            import torch

            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                embeddings = self.model.net.image_encoder(torch.from_numpy(images).to(self.device))
                parts = [embeddings[i : i + 1].clone() for i in range(len(slices_u8))]
        else:
            embeddings = self.graphs.encode(images)
            parts = [embeddings[i : i + 1].copy() for i in range(len(slices_u8))]
        self.stats.seconds_encode += time.perf_counter() - start
        self.stats.encoder_calls += 1
        self.stats.encoded_slices += len(slices_u8)
        return [
            SliceEmbedding(part, tuple(s.shape[:2]), p[1])  # type: ignore[arg-type]
            for part, s, p in zip(parts, slices_u8, prepared, strict=False)
        ]

    def decode(self, embedded: SliceEmbedding, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment (B, 4) voxel boxes on an embedded slice in one decoder call.

        Returns the logits at the slice's original resolution, float32 (B, H, W) (a voxel is foreground
        where sigmoid(logit) > 0.5, see :func:`foreground`), and the predicted IoU per box, float32 (B,).
        """
        height, width = embedded.original_hw
        framing = self.model.framing
        boxes = framing.boxes(boxes_xyxy, height, width)[:, None, :]
        start = time.perf_counter()
        if self.graphs is not None:
            logits, iou = self._decode_graphs(embedded, boxes)
        else:
            logits, iou = self._decode_eager(embedded, boxes)
        self.stats.seconds_decode += time.perf_counter() - start
        self.stats.decoder_calls += 1
        self.stats.decoded_boxes += len(boxes_xyxy)
        return logits, iou

    def _decode_eager(self, embedded: SliceEmbedding, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SAM's prompt encoder and mask decoder in eager torch (the reference); logits resized by
        ``F.interpolate`` (bilinear, half-pixel centres) as MedSAM's scripts do."""
        import torch
        import torch.nn.functional as F

        height, width = embedded.original_hw
        with torch.inference_mode():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                low_res, iou = self._box_decoder(
                    embedded.tensor().to(self.device), torch.from_numpy(boxes).to(self.device)
                )
            new_h, new_w = self.model.framing.logits_hw(height, width, low_res.shape[-1])
            logits = F.interpolate(
                low_res[..., :new_h, :new_w].float(),
                size=(height, width),
                mode="bilinear",
                align_corners=False,
            )
            return logits[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()

    def _decode_graphs(self, embedded: SliceEmbedding, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The runtime's decoder graph; logits resized by OpenCV's bilinear resize (half-pixel centres, no
        antialiasing: the same sampling as ``F.interpolate``'s, equal to float rounding)."""
        height, width = embedded.original_hw
        low_res, iou = self.graphs.decode(embedded.array(), boxes)
        new_h, new_w = self.model.framing.logits_hw(height, width, low_res.shape[-1])
        logits = np.empty((len(boxes), height, width), dtype=np.float32)
        for i in range(len(boxes)):
            cv2.resize(
                low_res[i, 0, :new_h, :new_w], (width, height), dst=logits[i], interpolation=cv2.INTER_LINEAR
            )
        return logits, np.ascontiguousarray(iou[:, 0], dtype=np.float32)


def fitting_batch(
    free_bytes: int, slice_bytes: int, *, share: float = 0.5, cap: int = MAX_ENCODER_BATCH
) -> int:
    """How many slices of ``slice_bytes`` each fit ``share`` of ``free_bytes``: at least 1, at most
    ``cap``."""
    return max(1, min(cap, int(free_bytes * share) // max(1, slice_bytes)))


def _nbytes(embedding) -> int:
    return (
        embedding.nbytes
        if isinstance(embedding, np.ndarray)
        else embedding.numel() * embedding.element_size()
    )


SIGMOID_HALF = np.float32(3 * 2.0**-25)  # the largest float32 logit whose float32 sigmoid is not above 0.5


def foreground(logits: np.ndarray) -> np.ndarray:
    """Binary masks from logits exactly as MedSAM thresholds them, sigmoid(logit) > 0.5 in float32.

    Float32 sigmoid rounds to exactly 0.5 for logits up to 3 * 2^-25, so this is ``logits > 3 * 2^-25``
    (tests/test_model.py checks it against torch's sigmoid on every float32 around the threshold).
    """
    return np.asarray(logits) > SIGMOID_HALF
