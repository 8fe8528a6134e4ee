"""A volume rendered as the model sees it: uint8 per intensity window (MedSAM's CT windows, percentile
clipping for the rest), and the default decoder batch for a runner."""

from __future__ import annotations

import numpy as np

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.core.intensity import IntensityConfig, choose_ct_windows, to_uint8
from medsam_engine.pipeline.core.types import BoxPrompt, Volume
from medsam_engine.pipeline.model.runner import LiteMedSAMRunner


def effective_modality(volume: Volume, config: EngineConfig) -> str:
    """The configured modality, or the volume's own when the configuration says auto."""
    wanted = config.intensity.modality
    return volume.modality if wanted == "auto" else wanted


def renderings(
    volume: Volume,
    coarse: np.ndarray | None,
    prompts: list[BoxPrompt],
    config: EngineConfig,
    *,
    window_kinds: dict[int, str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[int, str], dict[int, tuple[float, float]]]:
    """uint8 (z, y, x) renderings of the volume per intensity window, each label's window name, and each
    label's (level, width) in HU (CT only; empty otherwise). ``window_kinds``: the window kind per label a
    detector chose (Detection.window_kinds). Only the prompted slices are rendered (the others stay black)
    unless the model propagates masks beyond them (``model.mode: propagate``)."""
    section = config.intensity
    modality = effective_modality(volume, config)
    base = IntensityConfig(
        section.ct_level, section.ct_width, section.lower_percentile, section.upper_percentile
    )
    only = None if config.model.mode == "propagate" else sorted({p.z for p in prompts})
    if modality != "CT":
        return {"default": to_uint8(volume.array, modality, base, only=only)}, {}, {}
    labels = sorted({p.label for p in prompts})
    windows = choose_ct_windows(
        volume.array,
        coarse,
        labels,
        default=(section.ct_level, section.ct_width),
        lung=section.lung_window,
        bone=section.bone_window,
        explicit=section.label_windows,
        auto=section.ct_window == "auto",
        kinds=window_kinds,
    )
    names = {label: f"{level:g}/{width:g}" for label, (level, width) in windows.items()}
    rendered = {}
    for label, (level, width) in windows.items():
        if names[label] not in rendered:
            config_w = IntensityConfig(level, width, section.lower_percentile, section.upper_percentile)
            rendered[names[label]] = to_uint8(volume.array, "CT", config_w, only=only)
    if not rendered:
        rendered["default"] = to_uint8(volume.array, "CT", base, only=only)
    return rendered, names, windows


def default_decoder_batch(runner: LiteMedSAMRunner, cuda: bool) -> int:
    """Boxes per decoder call by default: 64 on CUDA; on CPU 16 for the exported graphs (their per-box cost
    falls with the batch), 4 for eager torch, whose original decoder slows down past a few boxes per call
    (bench/decoder_forms.py: 113 ms/box at 4, 205 at 16)."""
    if cuda:
        return 64
    return 16 if runner.backend != "torch" else 4
