"""Fine-tuning on real accepted masks: a strict-loadable, registered checkpoint that annotate can use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flywheel_data import commit_lungs_case
from nuclei_data import write_corner_nuclei

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.provenance import file_sha256
from medsam_engine.pipeline.flywheel.finetune import FinetuneOptions, finetune
from medsam_engine.pipeline.flywheel.finetune_data import SliceSample
from medsam_engine.pipeline.flywheel.registry import current_model
from medsam_engine.pipeline.model.checkpoint import LITE_MEDSAM_SHA256, load_lite_medsam
from medsam_engine.pipeline.store.case_store import CaseStore

# decoder-only (the encoder stays the official one), two epochs of one step each that learn on two of the
# four lung slices (one held out per fold)
TINY = FinetuneOptions(
    epochs=2,
    boxes_per_epoch=4,
    boxes_per_step=4,
    eval_boxes=12,
    max_slices=2,
    lr=2e-4,
    promote="if-better",
    encoder_stages=0,
    augment=False,
)


@pytest.fixture(scope="module")
def accepted_store(tmp_path_factory, small_chest):
    """The four real chest slices with their reference lungs, accepted by a reviewer."""
    # annotated with the lung window as the default, so every consumer renders the slices as the other tests
    # do and the session's embedding cache serves them
    config = EngineConfig().with_overrides(intensity={"ct_level": -600.0, "ct_width": 1500.0})
    return commit_lungs_case(
        tmp_path_factory.mktemp("accepted"), small_chest, config, review_status="accepted"
    )


def _without_models(store: CaseStore, tmp_path) -> CaseStore:
    """A copy of the accepted store with no registered model (the official weights current)."""
    import shutil

    return CaseStore(
        shutil.copytree(store.root, tmp_path / "store", ignore=shutil.ignore_patterns("_models"))
    )


@pytest.mark.slow
def test_finetune_from_a_store_registers_a_strict_loadable_model(accepted_store, runner, tmp_path):
    from medsam_engine.pipeline.flywheel.finetune import retrain_detector

    decoder_before = {k: v.clone() for k, v in runner.model.net.mask_decoder.state_dict().items()}
    out = tmp_path / "round1.pth"
    entry = finetune(out, store=accepted_store, runner=runner, options=TINY)
    assert entry["sha256"] == file_sha256(out)
    assert entry["parent_sha256"] == LITE_MEDSAM_SHA256
    assert entry["data"]["cases"] == ["c0ffee"]
    assert entry["data"]["folds"] == "blocks"  # one case: z blocks of its slices
    learned = entry["data"]["learned_from"]  # every reviewed box, none kept back
    assert learned["boxes"] == sum(entry["data"]["kinds"].values())
    assert learned["slices"] == TINY.max_slices
    assert set(entry["data"]["kinds"]) == {"CT right lung", "CT left lung"}
    metrics = entry["metrics"]
    assert 1 <= metrics["epochs_chosen"] <= 2
    assert metrics["holdout_dice_after"] > metrics["holdout_dice_before"] > 0
    assert len(metrics["final_fit"]) == metrics["epochs_chosen"]
    assert [fold["fold"] for fold in metrics["folds"]] == [1, 2]
    assert entry["promotion"]["promoted"]
    tuned = load_lite_medsam(out)  # strict keys
    assert tuned.name == f"lite-medsam-{entry['sha256'][:12]}"
    for key, value in runner.model.net.image_encoder.state_dict().items():  # the session runner is official
        assert torch.equal(value, tuned.net.image_encoder.state_dict()[key])  # decoder-only training
    for key, value in runner.model.net.mask_decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key])  # the embedding runner's model was not touched
    assert current_model(accepted_store)["sha256"] == entry["sha256"]
    assert json.loads(out.with_name("round1.pth.json").read_text())["sha256"] == entry["sha256"]
    entry = retrain_detector(accepted_store, entry, tmp_path / "detector.pt", epochs=20, runner=runner)
    assert entry["detector"]["labels"] == [5, 6]
    assert entry["detector"]["version"]
    assert current_model(accepted_store)["detector"]["artefact"] == str((tmp_path / "detector.pt").resolve())


@pytest.mark.slow
def test_a_challenger_that_does_not_beat_the_current_model_is_held_and_any_model_can_be_chosen(
    accepted_store, runner, tmp_path, capsys
):
    from dataclasses import replace

    store = _without_models(accepted_store, tmp_path)
    # a learning rate that wrecks the decoder: its epoch does not beat the official model on the held-out
    # slices, so nothing is trained and no checkpoint is written
    wrecked = finetune(
        tmp_path / "wrecked.pth", store=store, runner=runner, options=replace(TINY, lr=1.0, epochs=1)
    )
    assert wrecked["sha256"] is None
    assert not (tmp_path / "wrecked.pth").exists()
    assert not (tmp_path / "wrecked.pth.json").exists()
    assert wrecked["metrics"]["epochs_chosen"] == 0
    assert wrecked["promotion"]["why"].startswith("nothing to promote: no training")
    assert current_model(store) is None  # the official weights stay current
    assert main(["round", "report", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "(none)        untrained" in out
    assert "the official LiteMedSAM weights are current" in out

    # a model trained by hand but not promoted is held
    held = finetune(
        tmp_path / "held.pth", store=store, runner=runner, options=replace(TINY, promote="never", epochs=1)
    )
    assert held["promotion"]["promoted"] is False
    assert main(["model", "list", str(store.root)]) == 0
    assert f"{held['sha256'][:12]}  held" in capsys.readouterr().out
    assert main(["round", "report", str(store.root)]) == 0  # per fine-tuning run and kind
    report = capsys.readouterr().out
    assert f"| 0 | {held['sha256'][:12]} | 1 | CT left lung | " in report
    assert "| 0 | (none) | 1 | CT right lung | " in report
    assert "Fine-tuning per kind" in (Path(store.root) / "_rounds" / "rounds.md").read_text()

    assert main(["model", "use", str(store.root), held["sha256"][:10]]) == 0  # chosen by hand (a rollback)
    assert current_model(store)["sha256"] == held["sha256"]
    assert main(["model", "list", str(store.root)]) == 0
    assert f"{held['sha256'][:12]}  current" in capsys.readouterr().out
    assert main(["model", "use", str(store.root), "base"]) == 0
    assert current_model(store) is None
    assert main(["model", "use", str(store.root), "0000"]) == 2
    assert "no registered model starts with '0000'" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_of_the_last_encoder_stage_from_cached_activations(accepted_store, runner, tmp_path):
    from dataclasses import replace

    from medsam_engine.pipeline.flywheel.finetune import _embed, trained_prefixes
    from medsam_engine.pipeline.flywheel.finetune_data import store_samples

    options = replace(TINY, encoder_stages=1, max_slices=1, promote="never", epochs=1, lr=5e-4)
    staged, _ = store_samples(accepted_store, runner, options)
    cached, _ = store_samples(accepted_store, runner, replace(options, encoder_stages=0))
    with torch.no_grad():  # the last stage + neck on the cached activations give the encoder's embedding
        for with_features, plain in zip(staged, cached, strict=True):
            embedding = _embed(runner.model.net, with_features, options).float()
            assert torch.allclose(embedding, plain.embedding.float(), atol=0.05, rtol=0.05)
    assert trained_prefixes(runner.model.net, options) == (
        "prompt_encoder.",
        "mask_decoder.",
        "image_encoder.neck.",
        "image_encoder.layers.3.",
    )

    out = tmp_path / "stage.pth"
    entry = finetune(out, store=_without_models(accepted_store, tmp_path), runner=runner, options=options)
    assert entry["trained"].startswith("last 1 image encoder stage(s) + neck")
    tuned, official = load_lite_medsam(out).net.state_dict(), runner.model.net.state_dict()
    frozen = [
        k
        for k in official
        if k.startswith(
            (
                "image_encoder.patch_embed.",
                "image_encoder.layers.0.",
                "image_encoder.layers.1.",
                "image_encoder.layers.2.",
            )
        )
    ]
    assert frozen
    assert all(torch.equal(official[k], tuned[k]) for k in frozen)
    assert not torch.equal(official["image_encoder.neck.0.weight"], tuned["image_encoder.neck.0.weight"])


def test_augmented_slices_keep_every_box_on_its_mask(chest_ct):
    from medsam_engine.pipeline.flywheel.finetune_data import AUGMENTATIONS, transform_slice
    from medsam_engine.pipeline.io.readers import read_volume

    volume, labels = read_volume(chest_ct[0]), read_volume(chest_ct[1]).array
    z = int(np.argmax([(np.isin(labels[k], (5, 6))).sum() for k in range(labels.shape[0])]))
    masks = np.stack([labels[z] == value for value in (5, 6)])  # the real lungs on their fullest slice
    boxes = []
    for mask in masks:
        rows, cols = np.nonzero(mask)
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])  # pixel edges
    image = (np.clip(volume.array[z], -1000, 400) + 1000) * 255 / 1400  # a lung window, as rendered
    image = image.astype(np.uint8)
    for kind in AUGMENTATIONS:
        new_image, new_boxes, new_masks = transform_slice(kind, image, np.array(boxes, np.float32), masks)
        assert new_image.shape[:2] == new_masks.shape[1:]
        assert new_masks.sum() == masks.sum()
        for box, mask in zip(new_boxes, new_masks, strict=False):
            rows, cols = np.nonzero(mask)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], kind
        assert not np.array_equal(new_image, image)


@pytest.mark.slow
def test_finetune_with_augmentation_trains_on_five_views_of_each_training_slice(
    accepted_store, runner, tmp_path
):
    from dataclasses import replace

    store = _without_models(accepted_store, tmp_path)  # the official model is current: the runner's
    entry = finetune(
        tmp_path / "more.pth",
        store=store,
        runner=runner,
        options=replace(TINY, promote="never", augment=True, epochs=1),
    )
    learned = entry["data"]["learned_from"]
    assert entry["data"]["augmented_slices"] == 4 * learned["slices"]
    for fold in entry["metrics"]["folds"]:  # each fold trains on four more views of its own slices only
        assert fold["train_boxes"] == 5 * (learned["boxes"] - fold["holdout_boxes"])


def _sample(case_id: str, z: int, centres_x: list[int]) -> SliceSample:
    boxes = np.array([[x - 2, 10, x + 2, 14] for x in centres_x], dtype=np.float32)
    masks = np.zeros((len(centres_x), 32, 64), bool)
    return SliceSample(case_id, z, None, None, boxes, masks, masks.astype(np.float32))


@pytest.mark.slow
def test_cli_finetune_on_image_label_pairs_then_annotate_with_the_checkpoint(nuclei_2d, tmp_path, capsys):
    out = tmp_path / "nuclei.pth"
    labels = write_corner_nuclei(nuclei_2d[1], tmp_path / "corner.png")  # 8 of the 35 nuclei
    code = main(
        [
            "finetune",
            "--images",
            str(nuclei_2d[0]),
            "--labels",
            str(labels),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--boxes-per-epoch",
            "4",
            "--eval-boxes",
            "12",
            "--lr",
            "2e-4",
            "--encoder-stages",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["data"]["folds"] == "blocks"  # one 2D image: x blocks of its nuclei
    assert list(report["data"]["kinds"]) == ["2D objects"]  # an instance map: one kind
    assert report["sha256"] == file_sha256(out)
    assert f"wrote {out.resolve()} ({report['sha256'][:12]})" in captured.err
    config = tmp_path / "torch.yaml"
    config.write_text("model:\n  backend: torch\n")  # no graph export for a one-off checkpoint
    store = tmp_path / "store"
    assert (
        main(
            [
                "annotate",
                str(nuclei_2d[0]),
                "--coarse-mask",
                str(labels),
                "--out",
                str(store),
                "--checkpoint",
                str(out),
                "--config",
                str(config),
            ]
        )
        == 0
    )
    (case_id,) = CaseStore(store).committed_cases()
    attrs = CaseStore(store).case_attrs(case_id)
    assert attrs["signature"]["model_sha256"] == report["sha256"]
    assert {i["model"] for i in attrs["instances"]} == {f"lite-medsam-{report['sha256'][:12]}"}


def test_finetune_needs_accepted_masks(tmp_path, capsys):
    empty = CaseStore(tmp_path / "empty")
    (empty.root / "_runs").mkdir(parents=True)  # a store with no case in it
    assert main(["finetune", "--store", str(empty.root), "--out", str(tmp_path / "x.pth")]) == 2
    assert "no accepted case" in capsys.readouterr().err
    assert main(["finetune", "--images", "a.png", "--out", str(tmp_path / "x.pth")]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_whole_model_finetune_on_cuda(accepted_store, tmp_path):
    options = FinetuneOptions(
        epochs=1, boxes_per_epoch=4, boxes_per_step=4, train_encoder=True, device="cuda"
    )
    entry = finetune(tmp_path / "whole.pth", images=None, store=accepted_store, options=options)
    assert entry["trained"] == "whole model"
    tuned, official = load_lite_medsam(tmp_path / "whole.pth"), load_lite_medsam()
    changed = [
        k
        for k, v in official.net.image_encoder.state_dict().items()
        if not torch.equal(v, tuned.net.image_encoder.state_dict()[k])
    ]
    assert changed  # the encoder was trained too


def test_finetune_objects_follow_the_box_compilers_size_filter_and_margins(chest_ct):
    """Fine-tuning learns from the boxes annotate would give: objects under the rules' minimum size are
    left out and boxes carry the rules' margins, as detectors/coarse_mask.compile_boxes makes them."""
    from medsam_engine.detectors.coarse_mask import BoxRules, compile_boxes
    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.flywheel.finetune_data import slice_objects
    from medsam_engine.pipeline.io.readers import read_volume

    volume = read_volume(chest_ct[0])
    labels = align_to(read_volume(chest_ct[1]), volume).astype(np.uint16)
    rules = BoxRules(margin_px=2, min_size_mm3=5000.0)
    objects = slice_objects(labels, rules, volume.spacing)
    prompts = compile_boxes(labels, spacing=volume.spacing, rules=rules)
    assert sorted((o[0], o[1], o[2]) for o in objects) == sorted((p.label, p.z, p.box) for p in prompts)
    assert len(objects) < len(slice_objects(labels, BoxRules(margin_px=2), volume.spacing))  # small ones gone
    for label, z, box, mask in objects[:20]:
        ys, xs = np.nonzero(mask)
        assert (labels[z][mask] == label).all()
        assert (box[0], box[1]) == (max(0, xs.min() - 2), max(0, ys.min() - 2))


def test_one_slice_cannot_be_split_by_case_or_z():
    from medsam_engine.pipeline.flywheel.detector_training import split_by_case_or_z

    assert split_by_case_or_z([_sample("a", 0, [5, 15])], 0.25) is None
    train, held, how = split_by_case_or_z([_sample("a", z, [5]) for z in range(4)], 0.25)
    assert how == "z-block"
    assert [s.z for s in held] == [3]
    assert len(train) == 3


def test_boxes_of_labels_the_reviewer_changed_more_are_drawn_more_often():
    from medsam_engine.pipeline.flywheel.finetune import _epoch_steps

    kept, redrawn = _sample("c0", 0, [10, 20, 30, 40]), _sample("c0", 1, [10, 20, 30, 40])
    kept.weights, redrawn.weights = np.ones(4), np.full(4, 2.0)  # edit Dice 1.0 vs 0.0
    options = FinetuneOptions(boxes_per_epoch=2, boxes_per_step=2)
    rng = np.random.default_rng(0)
    drawn = {0: 0, 1: 0}
    for _ in range(400):
        for sample, index in _epoch_steps([kept, redrawn], options, rng):
            drawn[sample.z] += len(index)
    assert drawn[1] > 1.5 * drawn[0]


def test_finetune_on_label_maps_without_objects_says_so(nuclei_2d, tmp_path, capsys):
    import cv2

    empty = tmp_path / "empty.png"
    cv2.imwrite(
        str(empty), np.zeros(cv2.imread(str(nuclei_2d[0]), cv2.IMREAD_UNCHANGED).shape[:2], np.uint16)
    )
    out = tmp_path / "x.pth"
    assert (
        main(
            [
                "finetune",
                "--images",
                str(nuclei_2d[0]),
                "--labels",
                str(empty),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--encoder-stages",
                "0",
            ]
        )
        == 2
    )
    assert "hold no object to learn from" in capsys.readouterr().err
    assert not out.exists()
