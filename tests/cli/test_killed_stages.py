"""SIGKILL of the command at every stage of the loop (tests/killing.py stops it at a known call and kills it):
annotate while reading, in the model, mid-commit and before its run record; an export over an older one; a
round; a review import; fine-tuning while saving and before registering. After each kill nothing half-written
is taken as done, and running the same command again completes it with no case lost, duplicated or overwritten
and no model registered that is not whole."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from killing import kill_at

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.provenance import file_sha256
from medsam_engine.pipeline.flywheel.registry import registered_models
from medsam_engine.pipeline.store.case_store import CaseStore


def _annotate_argv(two_tiles, store, box_fill) -> list[str]:
    """The two tiles annotated one case at a time (the box-fill runner is fast enough that two case workers
    would reach their commits together, and "killed while the second case commits" must mean the first is
    done)."""
    config = store.parent / "one-at-a-time.yaml"
    config.write_text(box_fill.read_text() + "pipeline:\n  case_workers: 1\n")
    argv = ["annotate", str(two_tiles[0]), "--coarse-mask", str(two_tiles[1]), "--out", str(store)]
    return [*argv, "--config", str(config)]


def _check_whole(store: CaseStore) -> None:
    """Every committed case reads whole; nothing overwritten."""
    for case_id in store.committed_cases():
        labels, attrs = store.read_labels(case_id)
        assert labels.shape == (1, 256, 256)
        assert "previous_versions" not in attrs.raw
    assert not (store.root / "_previous").exists()


@pytest.mark.parametrize(
    "target, nth, committed",
    [
        (
            "medsam_engine.pipeline.annotate.driver:read_case",
            2,
            1,
        ),  # reading the second case, the first committed
        ("medsam_engine.pipeline.annotate.driver:segment_volume", 1, 0),  # in the model
        (
            "medsam_engine.pipeline.store.ome_zarr:image_label_metadata",
            2,
            1,
        ),  # mid-commit: the second case being encoded
        (
            "medsam_engine.pipeline.store.case_store:CaseStore.write_run",
            1,
            2,
        ),  # every case committed, the run record not yet
    ],
    ids=["read", "model", "commit", "run-record"],
)
def test_annotate_killed_then_rerun(two_tiles, tiles_reference, box_fill, tmp_path, target, nth, committed):
    store = CaseStore(tmp_path / "store")
    kill_at(target, _annotate_argv(two_tiles, store.root, box_fill), tmp_path, nth=nth)
    _check_whole(store)
    assert len(store.committed_cases()) == committed
    # the dead run's lease is taken over at once
    assert main(_annotate_argv(two_tiles, store.root, box_fill)) == 0
    _check_whole(store)
    assert sorted(store.committed_cases()) == sorted(tiles_reference)
    for case_id, labels in tiles_reference.items():
        assert np.array_equal(store.read_labels(case_id)[0], labels)
    assert not list((store.root / "_leases").glob("*.json"))
    assert not list((store.root / "_staging").iterdir())  # the killed writer's staging is cleared


def _visible_files(root) -> dict:
    return {
        p.relative_to(root): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def test_an_export_killed_over_an_older_one_leaves_the_older_one_whole(
    two_tiles, tiles_reference, box_fill, tmp_path
):
    store = tmp_path / "store"
    assert main(_annotate_argv(two_tiles, store, box_fill)) == 0
    out = tmp_path / "nnunet"
    argv = ["export", str(store), "--format", "nnunet", "--out", str(out), "--dataset-id", "501"]
    assert main(argv) == 0
    (dataset,) = out.iterdir()
    before = _visible_files(out)
    kill_at("medsam_engine.pipeline.export.nnunet:_write_case", argv, tmp_path, nth=2)
    assert (
        _visible_files(out) == before
    )  # the earlier export, untouched (the killed one's is a hidden .partial)
    assert main(argv) == 0
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["numTraining"] == len(list((dataset / "labelsTr").iterdir())) == 2


@pytest.mark.slow
def test_the_loop_killed_at_each_step_then_rerun(two_tiles, box_fill, tmp_path, capsys):
    """round run -> review import -> finetune, each killed once mid-way and run again."""
    store = CaseStore(tmp_path / "store")
    round_argv = [
        "round",
        "run",
        str(two_tiles[0]),
        "--store",
        str(store.root),
        "--coarse-mask",
        str(two_tiles[1]),
        "--config",
        str(box_fill),  # the round's annotations are the box-fill runner's: fine-tuning learns the reviews
    ]
    kill_at(
        "medsam_engine.pipeline.flywheel.rounds:export_queue", round_argv, tmp_path
    )  # annotated; queue, record not yet
    assert main(round_argv) == 0
    rounds = sorted(p.name for p in (store.root / "_rounds").glob("round-*.json"))
    assert rounds == ["round-001.json"]  # the killed round is the one completed, not a second round
    record = json.loads((store.root / "_rounds" / "round-001.json").read_text())
    assert record["cases"]["failed"] == 0
    assert record["cases"]["annotated"] + record["cases"]["skipped"] == 2
    _check_whole(store)

    corrections = tmp_path / "corrections"
    shutil.copytree(two_tiles[1], corrections)  # the reviewer's corrected masks, named like the inputs
    import_argv = ["review", "import", str(store.root), str(corrections), "--reviewer", "dr-kill"]
    kill_at(
        "medsam_engine.pipeline.flywheel.review:_commit_review", import_argv, tmp_path, nth=2
    )  # one case imported
    first = [c for c in store.committed_cases() if store.attributes(c).review_status == "accepted"]
    assert len(first) == 1
    review_before = store.attributes(first[0]).raw["review"]
    capsys.readouterr()
    assert main(import_argv) == 0
    out = capsys.readouterr().out
    assert out.count("accepted ") == 1
    assert out.count("already ") == 1
    for case_id in store.committed_cases():
        attrs = store.attributes(case_id)
        assert attrs.review_status == "accepted"
        assert len(attrs.raw["previous_versions"]) == 1
        assert attrs.raw["proposal_status"] != "accepted"  # never a correction imported against itself
    assert store.attributes(first[0]).raw["review"] == review_before

    checkpoint = tmp_path / "models" / "round1.pth"
    finetune_argv = [
        "finetune",
        "--store",
        str(store.root),
        "--out",
        str(checkpoint),
        "--epochs",
        "1",
        "--lr",
        "2e-4",
        "--boxes-per-epoch",
        "4",
        "--eval-boxes",
        "12",
        "--device",
        "cpu",
        "--encoder-stages",
        "0",
        "--no-augment",
    ]
    kill_at("torch:save", finetune_argv, tmp_path)  # writing the checkpoint
    assert not checkpoint.exists()
    assert registered_models(store) == []
    kill_at(
        "medsam_engine.pipeline.flywheel.finetune:register", finetune_argv, tmp_path
    )  # saved, not registered
    assert checkpoint.exists()
    assert registered_models(store) == []
    assert main(finetune_argv) == 0
    (model,) = registered_models(store)
    assert model["sha256"] == file_sha256(checkpoint)
