"""LiteMedSAM loading and the runner's encode-once / batched-decode parity with a naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam_engine.detectors.coarse_mask import boxes_from_label_map
from medsam_engine.pipeline.annotate.segment import resolve_slice, segment_volume
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.intensity import to_uint8
from medsam_engine.pipeline.core.provenance import file_sha256
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.model.checkpoint import (
    LITE_MEDSAM_SHA256,
    CheckpointError,
    bundled_checkpoint,
    load_lite_medsam,
)


def test_bundled_checkpoint_is_the_official_file():
    assert file_sha256(bundled_checkpoint()) == LITE_MEDSAM_SHA256


def test_checkpoint_with_foreign_keys_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"not_a_weight": torch.zeros(3)}}, bad)
    with pytest.raises(CheckpointError, match="neither LiteMedSAM nor a SAM"):
        load_lite_medsam(bad)


def test_litemedsam_checkpoint_missing_a_weight_is_refused_by_strict_loading(tmp_path):
    state = torch.load(bundled_checkpoint(), map_location="cpu", weights_only=True)
    state.pop("mask_decoder.iou_prediction_head.layers.0.weight")
    bad = tmp_path / "partial.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"(?s)does not fit lite.*Missing key"):
        load_lite_medsam(bad)


def test_checkpoint_that_is_not_a_torch_file_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_lite_medsam(bad)


def _naive_slice(runner, slice_u8, prompts):
    """Encode the slice on its own and decode one box per call (the official loop's structure)."""
    embedded = runner._encode([slice_u8])[0]  # a real encoder pass, never the cache
    logits = [runner.decode(embedded, np.array([p.box], dtype=np.float32))[0][0] for p in prompts]
    return np.stack(logits)


def test_batched_runner_masks_equal_naive_loop_on_real_multilabel_ct(runner, chest_ct):
    volume = read_volume(chest_ct[0])
    labels = align_to(read_volume(chest_ct[1]), volume)
    u8 = to_uint8(volume.array, "CT")
    prompts = [p for p in boxes_from_label_map(labels) if p.z in (15, 20) and p.label != 1]
    assert len({p.label for p in prompts}) >= 4
    before = runner.stats.encoded_slices + runner.stats.cache_hits
    label_map, records = segment_volume(runner, u8, prompts)
    assert runner.stats.encoded_slices + runner.stats.cache_hits - before == 2  # one embedding per slice
    for z in (15, 20):
        slice_prompts = [p for p in prompts if p.z == z]
        naive_logits = _naive_slice(runner, u8[z], slice_prompts)
        naive_map, _ = resolve_slice(naive_logits, np.array([p.label for p in slice_prompts]))
        assert np.array_equal(label_map[z], naive_map)
    assert all(0.0 < r.predicted_iou <= 1.5 for r in records)
    assert label_map[(15, 20), :, :].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runner_matches_cpu_masks(runner, chest_ct):
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    volume = read_volume(chest_ct[0])
    labels = align_to(read_volume(chest_ct[1]), volume)
    u8 = to_uint8(volume.array, "CT")
    prompts = [p for p in boxes_from_label_map(labels) if p.z == 15]
    cpu_map, _ = segment_volume(runner, u8, prompts)
    fp32 = LiteMedSAMRunner(load_lite_medsam(device="cuda"), device="cuda", precision="fp32")
    gpu_map, _ = segment_volume(fp32, u8, prompts)
    assert np.mean(cpu_map != gpu_map) < 1e-3
    bf16 = LiteMedSAMRunner(fp32.model, device="cuda")
    assert bf16.bf16
    bf16_map, _ = segment_volume(bf16, u8, prompts, encoder_batch=8)
    assert np.mean(cpu_map != bf16_map) < 1e-2  # bf16 autocast: a few boundary pixels


def test_embedding_cache_serves_a_repeated_slice_without_an_encoder_pass(runner, small_chest):
    volume = read_volume(small_chest[0])
    u8 = to_uint8(volume.array, "CT")
    first = runner.encode([u8[1]])[0]
    calls, hits = runner.stats.encoder_calls, runner.stats.cache_hits
    again = runner.encode([u8[1].copy()])[0]
    assert (runner.stats.encoder_calls, runner.stats.cache_hits) == (calls, hits + 1)
    assert torch.equal(first.embedding, again.embedding)


@pytest.mark.slow
def test_batched_encoder_calls_give_the_same_masks(runner, small_chest):
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    volume = read_volume(small_chest[0])
    labels = align_to(read_volume(small_chest[1]), volume)
    prompts = [p for p in boxes_from_label_map(labels) if p.label in (5, 6, 3) and p.z in (1, 2)]
    u8 = to_uint8(volume.array, "CT")
    uncached = LiteMedSAMRunner(runner.model, cache_bytes=0)
    one, _ = segment_volume(uncached, u8, prompts, encoder_batch=1)
    calls = uncached.stats.encoder_calls
    two, _ = segment_volume(uncached, u8, prompts, encoder_batch=2)
    assert uncached.stats.encoder_calls - calls == 1 < calls
    assert np.mean(one != two) <= 0.001


def test_decoding_in_parts_resolves_overlaps_exactly_like_one_call(runner, small_chest):
    volume = read_volume(small_chest[0])
    labels = align_to(read_volume(small_chest[1]), volume)
    prompts = [p for p in boxes_from_label_map(labels) if p.z in (1, 2)]  # many overlapping
    u8 = to_uint8(volume.array, "CT")
    whole, _ = segment_volume(runner, u8, prompts)
    parts, records = segment_volume(runner, u8, prompts, decoder_batch=2)
    assert np.array_equal(whole, parts)
    assert sum(r.voxels for r in records) == int((parts > 0).sum())


def test_a_full_medsam_vit_b_checkpoint_runs_through_the_same_runner(tmp_path, small_chest):
    """Random ViT-B weights (MedSAM's own are not shipped): the kind is read from the state dict, the slice
    is framed at 1024 and the masks come back at the slice's size. The encoder keeps one of its twelve
    blocks once loaded: with random weights the runner's framing and shapes are the subject, and each block
    maps the same shape to the same shape."""
    from segment_anything import sam_model_registry

    from medsam_engine.pipeline.model.build import build_runner

    path = tmp_path / "medsam_vit_b.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    model = load_lite_medsam(path)
    assert model.kind == "vit_b"
    assert model.name.startswith("medsam-vit_b-")
    runner = build_runner(model, backend="auto")
    encoder = model.net.image_encoder
    encoder.blocks = encoder.blocks[:1]  # windowed attention; the global ones cost most at 64 x 64 tokens
    assert runner.backend == "torch"
    assert not runner.bf16
    slice_u8 = to_uint8(read_volume(small_chest[0]).array, "CT")[1]
    embedded = runner.encode([slice_u8])[0]
    assert tuple(embedded.embedding.shape) == (1, 256, 64, 64)
    assert embedded.resized_hw == (1024, 1024)
    logits, iou = runner.decode(embedded, np.array([[10, 20, 60, 90], [0, 0, 127, 127]], dtype=np.float32))
    assert logits.shape == (2, *slice_u8.shape)
    assert iou.shape == (2,)
    with pytest.raises(ValueError, match="LiteMedSAM only"):
        build_runner(model, backend="onnxruntime")


def test_bf16_is_refused_on_the_cpu(runner):
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    with pytest.raises(ValueError, match="CUDA"):
        LiteMedSAMRunner(runner.model, precision="bf16")


def test_a_state_dict_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="neither LiteMedSAM nor"):
        load_lite_medsam(path)


def test_foreground_threshold_equals_float32_sigmoid_above_one_half():
    """``foreground`` thresholds logits without torch; it must agree with torch's float32 sigmoid > 0.5 on
    every float32 around the threshold, on tiny and ordinary logits, and on the special values."""
    from medsam_engine.pipeline.model.runner import SIGMOID_HALF, foreground

    bits = np.array([SIGMOID_HALF], np.float32).view(np.uint32)[0]
    around = np.arange(int(bits) - 1_000_000, int(bits) + 1_000_000, dtype=np.uint32).view(np.float32)
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            around,
            -around,
            rng.normal(0, 1e-6, 100_000).astype(np.float32),
            rng.normal(0, 20, 100_000).astype(np.float32),
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45], np.float32),
        ]
    )
    assert np.array_equal(foreground(values), (torch.sigmoid(torch.from_numpy(values)) > 0.5).numpy())


def test_hidden_gpus_are_told_without_asking_torch(monkeypatch):
    from medsam_engine.pipeline.model.devices import _no_gpu_visible, resolve_device

    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert _no_gpu_visible()
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            resolve_device("cuda")
