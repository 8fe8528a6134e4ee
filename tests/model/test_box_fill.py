"""The box-fill runner: the runner interface with no network, each box prompt filled."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.model.box_fill import BOX_FILL, BoxFillRunner
from medsam_engine.pipeline.model.runner import foreground
from medsam_engine.pipeline.store.case_store import CaseStore


def test_each_box_comes_back_filled_with_inclusive_edges():
    runner = BoxFillRunner()
    (embedded,) = runner.encode([np.zeros((20, 30), dtype=np.uint8)])
    logits, iou = runner.decode(embedded, np.array([[2, 3, 5, 4], [-4, 15, 40, 25]]))
    masks = foreground(logits)
    assert logits.shape == (2, 20, 30)
    assert iou.tolist() == [1.0, 1.0]
    expected = np.zeros((2, 20, 30), dtype=bool)
    expected[0, 3:5, 2:6] = True
    expected[1, 15:20, 0:30] = True  # clipped at the slice's edges
    assert np.array_equal(masks, expected)
    assert runner.stats.decoded_boxes == 2


def test_the_default_configuration_keeps_its_hash():
    """Stores written before the runner setting existed resume: the default adds nothing to the hash."""
    default = EngineConfig()
    assert default.model.runner == "medsam"
    assert default.result_hash() == "f6e2bce21ac95f9e"
    assert EngineConfig.model_validate({"model": {"runner": BOX_FILL}}).result_hash() != default.result_hash()


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"prompts": {"detector": "learned", "options": {"artefact": "head.pt"}}}, "learned detector"),
        ({"model": {"checkpoint": "lite.pth"}}, "no checkpoint"),
    ],
)
def test_what_needs_a_network_is_refused(settings, reason):
    data = {**settings, "model": {"runner": BOX_FILL, **settings.get("model", {})}}
    with pytest.raises(ValidationError, match=reason):
        EngineConfig.model_validate(data)


def test_a_box_fill_run_says_so_in_its_lineage(small_chest, box_fill, tmp_path, capsys):
    store = tmp_path / "store"
    argv = ["annotate", str(small_chest[0]), "--coarse-mask", str(small_chest[1]), "--out", str(store)]
    assert main([*argv, "--config", str(box_fill)]) == 0
    s = CaseStore(store)
    (case_id,) = s.committed_cases()
    labels, attrs = s.read_labels(case_id)
    assert attrs.signature["model_sha256"] == BOX_FILL
    assert {record["model"] for record in attrs.instances} == {BOX_FILL}
    assert labels.any()
    (run,) = (store / "_runs").glob("*.json")
    assert json.loads(run.read_text())["runner"]["decoded_boxes"] > 0
    capsys.readouterr()
    assert main([*argv, "--config", str(box_fill)]) == 0  # the same run again: nothing to do
    assert "1 skipped" in capsys.readouterr().out
