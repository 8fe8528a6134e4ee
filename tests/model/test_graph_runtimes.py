"""ONNX Runtime and OpenVINO runners reproduce eager torch on real CT; their graphs are cached safely."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
from nuclei_data import write_corner_nuclei
from scipy import ndimage

from medsam_engine.detectors.coarse_mask import boxes_from_label_map
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.intensity import to_uint8
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.model import build, graph_export
from medsam_engine.pipeline.model import graph_cache as backends
from medsam_engine.pipeline.model.runner import foreground

SLICES = (15, 20)
RUNTIMES = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} is not installed"),
    )
    for name in ("onnxruntime", "openvino")
]


@pytest.fixture(scope="module", autouse=True)
def graph_cache(tmp_path_factory, exported_graphs):
    """Every runner in this module caches its graphs in one folder of its own, never in the user's cache; it
    starts with the test run's exported ONNX Runtime graphs (OpenVINO's are copied from them)."""
    root = tmp_path_factory.mktemp("graph_cache")
    shutil.copytree(exported_graphs / "onnx", root / "onnx")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSAM_ENGINE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def chest_slices(chest_ct):
    """Two real chest CT slices (uint8, CT window) and their labels' boxes (ribs left out), per slice."""
    volume = read_volume(chest_ct[0])
    labels = align_to(read_volume(chest_ct[1]), volume)
    u8 = to_uint8(volume.array, "CT")
    prompts = boxes_from_label_map(labels)
    boxes = [np.array([p.box for p in prompts if p.z == z and p.label != 1], np.float32) for z in SLICES]
    return [u8[z] for z in SLICES], boxes


@pytest.fixture(scope="module")
def eager(runner, chest_slices):
    """Eager torch's embeddings (the session runner's, cached) and logits, the reference."""
    slices, boxes = chest_slices
    embedded = runner.encode(slices)
    return embedded, [runner.decode(e, b) for e, b in zip(embedded, boxes, strict=False)]


def _near_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel of the mask's boundary (inside or outside)."""
    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_reproduces_eager_torch_on_real_ct(name, runner, chest_slices, eager):
    slices, boxes = chest_slices
    fast = build.build_runner(runner.model, backend=name)
    embedded = fast._encode(slices)  # batch of two: the exported graph's batch is dynamic
    for ours, reference, slice_boxes, (ref_logits, ref_iou) in zip(
        embedded, eager[0], boxes, eager[1], strict=False
    ):
        assert ours.resized_hw == reference.resized_hw
        assert float(np.abs(ours.array() - reference.array()).max()) <= 1e-4
        logits, iou = fast.decode(ours, slice_boxes)
        assert logits.shape == ref_logits.shape
        assert np.abs(iou - ref_iou).max() < 1e-3
        masks, ref_masks = foreground(logits), foreground(ref_logits)
        assert ref_masks.any(axis=(1, 2)).all()
        differ = masks != ref_masks
        assert differ.mean() <= 1e-3
        assert not (differ & ~np.stack([_near_boundary(m) for m in ref_masks])).any()


def test_second_runner_reuses_the_cached_graphs(runner):
    build.build_runner(runner.model, backend="onnxruntime")
    folder = backends.graph_folder(runner.model.sha256, "onnxruntime")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    exported = dict(graph_export.exports)
    build.build_runner(runner.model, backend="onnxruntime")
    assert dict(graph_export.exports) == exported
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_damaged_cached_graph_is_exported_again(runner, tmp_path, monkeypatch, chest_slices, eager):
    build.build_runner(runner.model, backend="onnxruntime")
    source = backends.graph_folder(runner.model.sha256, "onnxruntime")
    folder = backends.graph_folder(runner.model.sha256, "onnxruntime", cache_root=tmp_path)
    shutil.copytree(source, folder)  # alone in its cache: nothing to copy from, so it must export
    decoder = folder / "decoder.onnx"
    decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 2])  # as if cut off mid-write
    (folder / ".encoder.onnx.crash.partial").write_bytes(b"\x08garbage")  # a crashed export's leftover
    exported = dict(graph_export.exports)
    monkeypatch.setenv("MEDSAM_ENGINE_CACHE", str(tmp_path))
    fast = build.build_runner(runner.model, backend="onnxruntime")
    assert graph_export.exports["decoder"] == exported.get("decoder", 0) + 1
    assert graph_export.exports["encoder"] == exported.get("encoder", 0)
    assert backends.valid_graphs(folder, runner.model.sha256) == set(backends.GRAPHS)
    logits, _ = fast.decode(eager[0][0], chest_slices[1][0])
    assert np.mean(foreground(logits) != foreground(eager[1][0][0])) <= 1e-3


def test_unknown_backend_is_refused_with_a_clear_message(runner):
    with pytest.raises(ValueError, match="Argument 'backend' must be one of torch, onnxruntime, openvino"):
        build.build_runner(runner.model, backend="tensorrt")
    with pytest.raises(ValueError, match="backend"):
        EngineConfig.model_validate({"model": {"backend": "tensorrt"}})


def test_backend_does_not_change_the_result_hash():
    config = EngineConfig()
    assert config.with_overrides(model={"backend": "openvino"}).result_hash() == config.result_hash()
    assert config.with_overrides(model={"backend": "torch"}).result_hash() == config.result_hash()


def test_auto_takes_the_next_runtime_when_one_fails(runner, monkeypatch):
    assert build.auto_candidates("cuda") == ["torch"]
    candidates = build.auto_candidates("cpu")
    assert candidates[-1] == "torch"
    real_load = build.load_graphs

    def failing_first(model, runtime, **options):
        if runtime == candidates[0]:
            raise backends.BackendError(f"{runtime} does not reproduce eager torch")
        return real_load(model, runtime, **options)

    monkeypatch.setattr(build, "load_graphs", failing_first)
    chosen = build.build_runner(runner.model, device="cpu", backend="auto")
    assert chosen.backend == candidates[1]


def test_graph_with_its_recorded_stamp_is_trusted_and_any_rewrite_is_hashed(runner, tmp_path):
    """Cached graphs are not re-hashed at every start: size and mtime as recorded vouch for them; a graph
    rewritten in place (same size, new mtime) is hashed and refused."""
    build.build_runner(runner.model, backend="onnxruntime")
    source = backends.graph_folder(runner.model.sha256, "onnxruntime")
    folder = tmp_path / source.name
    shutil.copytree(source, folder)  # copy2 keeps the modification times
    assert backends.valid_graphs(folder, runner.model.sha256) == set(backends.GRAPHS)
    encoder = folder / "encoder.onnx"
    data = bytearray(encoder.read_bytes())
    data[len(data) // 2] ^= 0xFF
    encoder.write_bytes(bytes(data))
    assert backends.valid_graphs(folder, runner.model.sha256) == {"decoder"}


def test_a_cache_without_stamps_is_hashed_once_then_stamped(runner, graph_cache, monkeypatch):
    import json

    build.build_runner(runner.model, backend="onnxruntime")
    folder = backends.graph_folder(runner.model.sha256, "onnxruntime")
    manifest = json.loads((folder / "manifest.json").read_text())
    stamps = manifest.pop("stamps")
    (folder / "manifest.json").write_text(json.dumps(manifest))  # as written before stamps existed
    hashed = []
    real = backends.file_sha256
    monkeypatch.setattr(backends, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    build.build_runner(runner.model, backend="onnxruntime")
    assert sorted(hashed) == ["decoder.onnx", "encoder.onnx"]
    assert json.loads((folder / "manifest.json").read_text())["stamps"] == stamps
    hashed.clear()
    build.build_runner(runner.model, backend="onnxruntime")
    assert hashed == []


def test_annotating_on_cached_graphs_never_imports_torch(runner, nuclei_2d, tmp_path, graph_cache):
    """A worker on cached graphs starts without torch (seconds and ~0.5 GB): the bundled checkpoint is only
    hashed, the device is told without CUDA, logits are resized and thresholded in numpy/OpenCV."""
    import json
    import os
    import subprocess
    import sys

    backend = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    build.build_runner(runner.model, backend=backend)  # the graphs are in the cache
    code = (
        "import json, sys\n"
        "from medsam_engine.pipeline.annotate.config import EngineConfig\nfrom "
        "medsam_engine.pipeline.io.discover import discover\n"
        "from medsam_engine.pipeline.annotate.job import annotate\nfrom "
        "medsam_engine.pipeline.store.case_store import CaseStore\n"
        "image, mask, root, backend = sys.argv[1:5]\nstore = CaseStore(root)\n"
        "config = EngineConfig.model_validate({'model': {'backend': backend, 'device': 'auto'}})\n"
        "summary = annotate(discover([image], store.case_ids(), coarse_masks=[mask]), store, config, "
        "show_progress=False)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'committed': summary.count('done'),\n"
        "                  'failed': [o.reason for o in summary.failed]}))"
    )
    env = dict(os.environ, MEDSAM_ENGINE_CACHE=str(graph_cache), CUDA_VISIBLE_DEVICES="")
    mask = write_corner_nuclei(nuclei_2d[1], tmp_path / "corner.png")  # 8 of the 35 nuclei
    done = subprocess.run(
        [sys.executable, "-c", code, str(nuclei_2d[0]), str(mask), str(tmp_path / "store"), backend],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"torch": False, "committed": 1, "failed": []}


def test_a_cache_that_cannot_be_stamped_still_serves(runner, graph_cache, monkeypatch):
    """Recording stamps is best effort: a read-only or shared cache keeps serving its verified graphs."""
    import json

    build.build_runner(runner.model, backend="onnxruntime")
    folder = backends.graph_folder(runner.model.sha256, "onnxruntime")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("stamps")
    (folder / "manifest.json").write_text(json.dumps(manifest))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(backends, "write_text_atomic", read_only)
    exported = dict(graph_export.exports)
    fast = build.build_runner(runner.model, backend="onnxruntime")
    assert fast.backend == "onnxruntime"
    assert dict(graph_export.exports) == exported
    assert "stamps" not in json.loads((folder / "manifest.json").read_text())


def test_default_threads_follow_torch_then_omp_then_the_runtime(monkeypatch):
    import sys

    import torch

    assert backends.default_threads() == torch.get_num_threads()
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert backends.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert backends.default_threads() == 0  # the runtime's own default
