"""The learned detector: trained from a store's accepted masks by the CLI, then used by annotate."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from flywheel_data import commit_lungs_case

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.store.case_store import CaseStore


@pytest.fixture(scope="module")
def accepted_store(tmp_path_factory, small_chest):
    """A store holding the real chest slices with their reference lungs as an accepted case."""
    return commit_lungs_case(tmp_path_factory.mktemp("accepted"), small_chest)


@pytest.fixture(scope="module")
def trained(accepted_store, tmp_path_factory):
    """``detector train`` on the accepted store, run once for the module: the artefact and the JSON report
    the command printed."""
    out = tmp_path_factory.mktemp("detector") / "detector.pt"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["detector", "train", "--store", str(accepted_store.root), "--out", str(out), "--epochs", "40"]
        )
    assert code == 0
    return out, json.loads(printed.getvalue())


def test_detector_train_writes_a_versioned_artefact_with_metrics(trained):
    from medsam_engine.detectors.learned import load_artefact

    out, report = trained
    _head, meta, sha = load_artefact(out)
    assert report["version"] == sha
    assert meta["labels"] == [5, 6] == report["labels"]
    assert meta["label_names"] == {"5": "right lung", "6": "left lung"}
    assert meta["training"]["split"] == "z-block"
    assert meta["training"]["holdout_slices"] >= 1
    assert set(meta["metrics"]["holdout"]) == {"5", "6"}
    assert meta["metrics"]["train"]["5"]["recall"] > 0.0


def test_annotate_with_the_learned_detector_records_its_version(trained, small_chest, tmp_path, capsys):
    artefact, _ = trained
    store = tmp_path / "store"
    code = main(
        [
            "annotate",
            str(small_chest[0]),
            "--out",
            str(store),
            "--detector",
            "learned",
            "--detector-option",
            f"artefact={artefact}",
        ]
    )
    assert code == 0, capsys.readouterr()
    result = CaseStore(store)
    (case_id,) = result.committed_cases()
    labels, attrs = result.read_labels(case_id)
    assert set(np.unique(labels)) - {0} <= {5, 6}
    assert labels.any()
    assert attrs.instances
    assert all(i["prompt_source"].startswith("learned:") for i in attrs.instances)
    assert "detector_sha256" in attrs.signature


def test_learned_detector_without_artefact_is_bad_usage(small_chest, tmp_path, capsys):
    code = main(["annotate", str(small_chest[0]), "--out", str(tmp_path / "s"), "--detector", "learned"])
    assert code == 2
    assert "artefact" in capsys.readouterr().err
