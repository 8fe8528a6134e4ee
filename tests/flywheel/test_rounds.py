"""Two data-engine rounds on real data with a simulated reviewer (the reference masks are the corrections)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flywheel_data import case_of, lung_inputs, shared_runner

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.flywheel.finetune import FinetuneOptions, finetune
from medsam_engine.pipeline.flywheel.review import import_corrections
from medsam_engine.pipeline.flywheel.rounds import round_rows, run_round
from medsam_engine.pipeline.io.discover import discover
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import ROUNDS


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, runner, small_chest, small_chest_nifti):
    """Round 1 (official model) on both cases; chest_a corrected by the simulated reviewer; fine-tune on it;
    round 2 with the fine-tuned model."""
    from medsam_engine.pipeline.model.checkpoint import load_lite_medsam
    from medsam_engine.pipeline.model.runner import LiteMedSAMRunner

    root = tmp_path_factory.mktemp("rounds")
    images, masks, reference = lung_inputs(root, small_chest, small_chest_nifti)
    store = CaseStore(root / "store")
    config = EngineConfig()
    cases = discover([images], store.case_ids(), coarse_masks=[masks])
    first = run_round(cases, store, config, runner=shared_runner(config, runner))
    proposals = {c: store.read_labels(c)[0] for c in store.committed_cases()}
    imported = import_corrections(store, [reference / "chest_a.nrrd"], reviewer="simulated")
    entry = finetune(
        root / "round1.pth",
        store=store,
        runner=runner,
        options=FinetuneOptions(
            epochs=1,
            boxes_per_epoch=4,
            boxes_per_step=4,
            lr=2e-4,
            promote="always",
            encoder_stages=0,
            augment=False,
        ),
    )
    tuned = config.with_overrides(model={"checkpoint": str(root / "round1.pth")})
    # decoder-only fine-tuning keeps the encoder: the session's embedding cache stays valid
    tuned_runner = LiteMedSAMRunner(load_lite_medsam(root / "round1.pth"), _cache=runner._cache)
    second = run_round(cases, store, config, runner=shared_runner(tuned, tuned_runner))
    return {
        "store": store,
        "first": first,
        "second": second,
        "entry": entry,
        "proposals": proposals,
        "imported": imported,
        "root": root,
    }


def test_round_one_annotates_routes_and_exports_the_queue(two_rounds):
    report = two_rounds["first"].report
    assert report["round"] == 1
    assert report["cases"]["annotated"] == 2
    routes = report["routing"]["instances"]
    assert sum(routes.values()) > 0
    assert report["seconds_per_case"] > 0
    assert report["calibration"]["calibrated"] is False  # no review yet
    assert two_rounds["first"].queue_dir == str(two_rounds["store"].root / "_review" / "round-001")
    queue = json.loads((two_rounds["store"].root / "_review" / "round-001" / "queue.json").read_text())
    assert len(queue["cases"]) == report["queue"]["cases"]


def test_round_two_uses_the_registered_model_on_the_rest_only(two_rounds):
    store, entry = two_rounds["store"], two_rounds["entry"]
    report = two_rounds["second"].report
    assert report["model"]["sha256"] == entry["sha256"]
    assert report["model"]["registered"]
    assert report["cases"] == {
        "given": 2,
        "annotated": 1,
        "skipped": 0,
        "failed": 0,
        "quarantined": 0,
        "kept_accepted": 1,
    }
    case_a, case_b = case_of(store, "chest_a"), case_of(store, "chest_b")
    attrs_a, attrs_b = store.case_attrs(case_a), store.case_attrs(case_b)
    assert attrs_a["review_status"] == "accepted"
    assert attrs_a["review"]["reviewer"] == "simulated"
    assert attrs_b["signature"]["model_sha256"] == entry["sha256"]
    assert attrs_b["round"] == 2
    assert {i["model"] for i in attrs_b["instances"]} == {f"lite-medsam-{entry['sha256'][:12]}"}
    assert all(i["round"] == 2 for i in attrs_b["instances"])


def test_round_table_reports_review_outcomes_per_round(two_rounds, capsys):
    store = two_rounds["store"]
    rows = round_rows(store)
    assert [r["round"] for r in rows] == [1, 2]
    reviewed = list(store.case_attrs(case_of(store, "chest_a"))["instances"])
    assert rows[0]["reviewed"] == len(reviewed)
    assert rows[0]["mean_edit_dice"] == pytest.approx(np.mean([i["edit_dice"] for i in reviewed]), abs=1e-3)
    assert rows[1]["reviewed"] == 0
    assert rows[1]["annotated"] == 1
    # the data engine's figures, as SA-1B and MedSAM2 report theirs
    edited = [i for i in reviewed if i["edit_voxels"] > 0]
    assert rows[0]["unedited"] == pytest.approx(1 - len(edited) / len(reviewed), abs=1e-4)
    assert rows[0]["mean_one_minus_dice"] == pytest.approx(1 - rows[0]["mean_edit_dice"], abs=1e-3)
    distances = [i["edit_boundary_mm"] for i in reviewed if i["edit_boundary_mm"] is not None]
    assert rows[0]["mean_boundary_mm"] == pytest.approx(np.mean(distances), abs=1e-3)
    assert rows[0]["edits_per_case"] == len(edited)  # one reviewed case
    assert rows[0]["proposed"] >= len(reviewed)
    assert rows[0]["masks_per_case"] == pytest.approx(rows[0]["proposed"] / rows[0]["annotated"], abs=0.01)
    assert main(["round", "report", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out
    assert "| 2 |" in out
    assert "mean_one_minus_dice" in out
    assert "mean_boundary_mm" in out
    record = json.loads((store.root / ROUNDS / "round-001.json").read_text())
    assert record["review"]["reviewed"] == len(reviewed)  # the round record carries its review outcomes
    assert (store.root / ROUNDS / "rounds.png").stat().st_size > 1000  # matplotlib is a dependency
    rounds_table, tuning = (store.root / ROUNDS / "rounds.md").read_text().split("\n\n", 1)
    assert rounds_table.count("\n") == 3  # header, rule, rounds 1 and 2
    # the fine-tuning run after round 1 (it learned from round 1's corrections), per kind
    entry = two_rounds["entry"]
    assert "Fine-tuning per kind" in tuning
    assert f"| 1 | {entry['sha256'][:12]} | 1 | CT label 5 |" in tuning  # the lungs, unnamed in this store
    assert f"| 1 | {entry['sha256'][:12]} | 1 | CT label 6 |" in tuning
    assert "fine-tuning per kind" in out
    assert (store.root / ROUNDS / "round-002.json").is_file()


def test_cli_round_on_nuclei_then_review_and_calibration(nuclei_2d, tmp_path, capsys):
    store = tmp_path / "store"
    code = main(
        [
            "round",
            "run",
            str(nuclei_2d[0]),
            "--store",
            str(store),
            "--coarse-mask",
            str(nuclei_2d[1]),
            "--review-out",
            str(tmp_path / "queue"),
        ]
    )
    assert code == 0
    assert "round 1" in capsys.readouterr().out
    attrs = CaseStore(store).case_attrs(CaseStore(store).committed_cases()[0])
    assert attrs["review_status"] in ("review", "rejected", "auto-accepted")
    assert len(attrs["instances"]) >= 20
    corrections = tmp_path / "corrections"
    corrections.mkdir()
    shutil.copy(nuclei_2d[1], corrections / "nuclei.png")  # named like the input: matched by stem
    assert main(["review", "import", str(store), str(corrections), "--reviewer", "simulated"]) == 0
    capsys.readouterr()
    assert main(["review", "calibrate", str(store)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] >= 20
    if report["calibrated"]:  # needs both outcomes among the nuclei; report what it found either way
        assert report["auc_out_of_fold"] is not None
        assert report["reliability"]
    else:
        assert "at least" in report["reason"]


def test_cli_round_run_checks_its_options_as_annotate_does(nuclei_2d, tmp_path, capsys):
    """`round run` builds its configuration like `annotate`: a coarse-mask detector without --coarse-mask, a
    missing checkpoint or a bad option is refused before anything is read or loaded."""
    store = tmp_path / "store"
    assert main(["round", "run", str(nuclei_2d[0]), "--store", str(store)]) == 2
    assert "the coarse-mask detector needs --coarse-mask" in capsys.readouterr().err
    assert (
        main(
            [
                "round",
                "run",
                str(nuclei_2d[0]),
                "--store",
                str(store),
                "--coarse-mask",
                str(nuclei_2d[1]),
                "--checkpoint",
                str(tmp_path / "missing.pth"),
            ]
        )
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err
    assert (
        main(
            [
                "round",
                "run",
                str(nuclei_2d[0]),
                "--store",
                str(store),
                "--detector",
                "intensity",
                "--detector-option",
                "no_such_option=1",
            ]
        )
        == 2
    )
    assert "bad configuration" in capsys.readouterr().err
    assert not CaseStore(store).committed_cases()
