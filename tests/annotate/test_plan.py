"""The run's plan, the same for both engines: each case once, committed ones skipped, quarantined ones left
out where the run honours quarantine, shards of about equal slice counts."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
from pydicom.data import get_testdata_file

from medsam_engine.pipeline.annotate import plan
from medsam_engine.pipeline.annotate.config import load_config
from medsam_engine.pipeline.annotate.job import annotate
from medsam_engine.pipeline.annotate.plan import discover_inputs, estimate_slices, plan_run
from medsam_engine.pipeline.annotate.signature import case_signature
from medsam_engine.pipeline.model.box_fill import BOX_FILL
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import quarantine


def _three_tiles(nuclei_tiles, tmp_path):
    images, masks = nuclei_tiles
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for name in ("tile00.png", "tile01.png", "tile11.png"):
        shutil.copy(images / name, tmp_path / "images" / name)
        shutil.copy(masks / name, tmp_path / "masks" / name)
    return tmp_path / "images", tmp_path / "masks"


def test_a_case_reached_twice_is_planned_once(two_tiles, tmp_path):
    store = CaseStore(tmp_path / "store")
    cases = discover_inputs([two_tiles[0], two_tiles[0]], store, coarse_masks=[two_tiles[1], two_tiles[1]])
    assert len(cases) == 2
    assert len({c.case_id for c in cases}) == 2


def test_committed_cases_are_skipped_and_quarantined_ones_left_out(nuclei_tiles, box_fill, tmp_path):
    images, masks = _three_tiles(nuclei_tiles, tmp_path)
    store, config = CaseStore(tmp_path / "store"), load_config(box_fill)
    cases = discover_inputs([images], store, coarse_masks=[masks])
    first, held, new = cases
    assert annotate([first], store, config).count("done") == 1
    quarantine(
        store, held.case_id, stage="read", signature=case_signature(held, config, BOX_FILL), run_id="r"
    )

    def plan(honour: bool):
        return plan_run(cases, store, config, model_identity=lambda: BOX_FILL, honour_quarantine=honour)

    assert plan(True).skipped == (first,)
    assert plan(True).quarantined == (held,)
    assert plan(True).todo == (new,)
    assert plan(False).todo == (held, new)  # --retry-quarantined
    reasons = {o.case_id: (o.status, o.reason) for o in plan(True).settled()}
    assert reasons[first.case_id][0] == "skipped"
    assert reasons[held.case_id][0] == "quarantined"
    assert "quarantined" in reasons[held.case_id][1]


def test_a_run_reports_what_it_skips_in_the_order_given(nuclei_tiles, box_fill, tmp_path):
    images, masks = _three_tiles(nuclei_tiles, tmp_path)
    store, config = CaseStore(tmp_path / "store"), load_config(box_fill)
    cases = discover_inputs([images], store, coarse_masks=[masks])
    annotate(cases[1:2], store, config)
    seen = []
    summary = annotate(cases, store, config, on_outcome=lambda o: seen.append(o.case_id))
    assert [o.case_id for o in summary.outcomes] == [c.case_id for c in cases]
    assert [o.status for o in summary.outcomes] == ["done", "skipped", "done"]
    assert seen[0] == cases[1].case_id  # settled at once, before any case is read


def test_shards_balance_slices(nuclei_tiles, small_chest, small_chest_nifti, tmp_path):
    store = CaseStore(tmp_path / "store")
    tiles = [nuclei_tiles[0] / "tile00.png", nuclei_tiles[0] / "tile11.png"]
    masks = [nuclei_tiles[1] / "tile00.png", nuclei_tiles[1] / "tile11.png"]
    cases = discover_inputs(
        [small_chest[0], small_chest_nifti[0], *tiles],
        store,
        coarse_masks=[small_chest[1], small_chest_nifti[1], *masks],
    )
    plan = plan_run(cases, store, load_config(None), model_identity=lambda: "x", honour_quarantine=True)
    shards = plan.shards(2)
    assert len(shards) == 2
    assert sorted(c.case_id for shard in shards for c in shard) == sorted(c.case_id for c in cases)
    volumes = (small_chest[0].name, small_chest_nifti[0].name)
    assert [sum(c.image.endswith(volumes) for c in shard) for shard in shards] == [1, 1]


@pytest.fixture
def cine_case(tmp_path):
    """A multi-frame DICOM file (10 frames) as discovery makes it a case."""
    (tmp_path / "cine").mkdir()
    shutil.copy(get_testdata_file("emri_small.dcm"), tmp_path / "cine" / "frames.dcm")
    (case,) = discover_inputs([tmp_path / "cine"], CaseStore(tmp_path / "store"))
    return case


def test_discovery_carries_a_multiframe_case_s_frames(cine_case):
    assert cine_case.frames == 10


def test_shards_are_sized_from_the_frames_discovery_read(cine_case, monkeypatch):
    def no_second_read(*args, **kwargs):
        raise AssertionError("the header was read again")

    monkeypatch.setattr(plan, "read_dicom_header", no_second_read)
    assert estimate_slices(cine_case) == 10


def test_a_multiframe_case_made_elsewhere_is_sized_from_its_header(cine_case):
    assert estimate_slices(replace(cine_case, frames=None)) == 10
