"""Encoder batches sized by free device memory (CUDA); the CPU keeps batches of one."""

from __future__ import annotations

import pytest
import torch

from medsam_engine.pipeline.model.runner import MAX_ENCODER_BATCH, fitting_batch


def test_the_batch_fills_half_the_free_memory_within_its_bounds():
    assert fitting_batch(10 * 2**30, 100 * 2**20) == 51  # 5 GiB / 100 MiB
    assert fitting_batch(10 * 2**30, 100 * 2**20, share=0.25) == 25
    assert fitting_batch(2**20, 100 * 2**20) == 1  # never below one slice
    assert fitting_batch(140 * 2**30, 2**20) == MAX_ENCODER_BATCH
    assert fitting_batch(140 * 2**30, 2**20, cap=512) == 512


def test_the_cpu_runner_encodes_one_slice_per_call(runner):
    assert runner.memory_batch() == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_runner_sizes_its_batch_from_free_memory_and_that_batch_runs():
    import numpy as np

    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    runner = LiteMedSAMRunner(load_lite_medsam(device="cuda"), device="cuda")
    batch = runner.memory_batch()
    assert 1 <= batch <= MAX_ENCODER_BATCH
    assert runner.memory_batch() == batch  # measured once
    free_before, _ = torch.cuda.mem_get_info()
    embedded = runner.encode([np.full((64, 64), k % 251, np.uint8) for k in range(batch)])
    assert len(embedded) == batch
    assert torch.cuda.mem_get_info()[0] > 0.2 * free_before


@pytest.mark.parametrize(
    "value, share", [(None, 1.0), ("0.25", 0.25), ("1", 1.0), ("0", 1.0), ("2", 1.0), ("half", 1.0)]
)
def test_the_gpu_share_a_process_holds_scales_its_memory_sized_batches(runner, monkeypatch, value, share):
    """A Ray actor holding a quarter of a GPU sets $MEDSAM_ENGINE_GPU_SHARE to 0.25: the runner's own
    memory_batch sizes its batches to a quarter of what a process with the whole GPU takes; unusable values
    count as the whole GPU. (The runner is pointed at "cuda" with the device's free memory and a slice's
    cost given, so that its sizing runs on this CPU.)"""
    from medsam_engine.pipeline.model.devices import GPU_SHARE_VARIABLE, gpu_share

    if value is None:
        monkeypatch.delenv(GPU_SHARE_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(GPU_SHARE_VARIABLE, value)
    assert gpu_share() == share
    monkeypatch.setattr(runner, "device", "cuda")
    monkeypatch.setattr(runner, "graphs", None)
    monkeypatch.setattr(runner, "_memory_batch", None)
    monkeypatch.setattr(runner, "_slice_bytes", lambda: 100 * 2**20)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    assert runner.memory_batch(cap=1024) == int(40 * 2**30 * 0.5 * share) // (
        100 * 2**20
    )  # 204 whole, 51 a quarter
    monkeypatch.setattr(runner, "_memory_batch", None)
    assert runner.memory_batch(share=0.5, cap=1024) == 204  # an explicit share is taken as it is
