"""Which device a run uses: CUDA when asked for (or ``auto``) and visible, else the CPU; told without
importing torch when no GPU can be present."""

from __future__ import annotations

import os
import sys


def _no_gpu_visible() -> bool:
    """True when CUDA cannot be available, told without importing torch: CUDA_VISIBLE_DEVICES (or ROCm's
    HIP_VISIBLE_DEVICES) hides every device, or this Linux machine has no NVIDIA or ROCm device nodes."""
    for variable in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if os.environ.get(variable, "unset").strip() in ("", "-1"):
            return True
    return sys.platform.startswith("linux") and not any(
        os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    )


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


GPU_SHARE_VARIABLE = "MEDSAM_ENGINE_GPU_SHARE"  # set by a Ray actor that holds a fraction of its GPU


def gpu_share() -> float:
    """The fraction of its GPU this process holds (a Ray actor of ``--gpus-per-actor 0.25``: 0.25), from
    $MEDSAM_ENGINE_GPU_SHARE; 1 when unset or unusable. Memory-sized batches scale by it, so that the
    processes sharing a GPU together keep to what one would take."""
    try:
        share = float(os.environ.get(GPU_SHARE_VARIABLE, "1"))
    except ValueError:
        return 1.0
    return share if 0.0 < share <= 1.0 else 1.0
