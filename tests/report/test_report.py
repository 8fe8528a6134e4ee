"""QC pages and evaluation on a real annotated chest CT."""

from __future__ import annotations

import pytest
from flywheel_data import shared_runner

from medsam_engine.pipeline.annotate.config import EngineConfig, load_config
from medsam_engine.pipeline.annotate.job import annotate
from medsam_engine.pipeline.io.discover import discover
from medsam_engine.pipeline.report.evaluate import evaluate_store, match_references
from medsam_engine.pipeline.report.qc import write_report
from medsam_engine.pipeline.store.case_store import CaseStore

pytestmark = pytest.mark.slow  # its module fixture runs the engine on real cases


def _annotate_chest(root, small_chest, config: EngineConfig, runner=None):
    """The chest CT and a broken NRRD annotated into ROOT/store: (the store, the chest's case id)."""
    store = CaseStore(root / "store")
    broken = root / "broken.nrrd"
    broken.write_bytes(b"NRRD0004\nnot really")
    cases = discover(
        [small_chest[0], broken], store.case_ids(), coarse_masks=[small_chest[1], small_chest[1]]
    )
    if runner is not None:
        runner = shared_runner(config, runner)
    summary = annotate(cases, store, config, runner=runner, show_progress=False)
    assert [o.status for o in summary.outcomes] == ["done", "failed"]
    return store, summary.outcomes[0].case_id


@pytest.fixture(scope="module")
def annotated_chest(tmp_path_factory, small_chest, runner):
    """Annotated by LiteMedSAM: for the Dice and NSD it reaches against the reference."""
    return _annotate_chest(tmp_path_factory.mktemp("report"), small_chest, EngineConfig(), runner)


@pytest.fixture(scope="module")
def box_filled_chest(tmp_path_factory, small_chest, box_fill):
    """Annotated by the box-fill runner: for the QC page, which the model's masks do not change."""
    return _annotate_chest(tmp_path_factory.mktemp("report-box-fill"), small_chest, load_config(box_fill))


def test_evaluation_matches_the_reference_through_the_affines(
    annotated_chest, small_chest, small_chest_nifti
):
    store, case_id = annotated_chest
    reference = small_chest_nifti[1]  # the same labels as NIfTI, (x, y, z) axes in RAS: matched physically
    assert match_references(store, [reference]) == {case_id: reference}
    scores = evaluate_store(store, [reference])[case_id]
    assert scores == evaluate_store(store, [small_chest[1]])[case_id]  # the NRRD it was prompted from
    assert set(scores) == {1, 3, 5, 6, 7}  # the labels with a box on these four slices
    assert scores[5]["dice"] > 0.8
    assert scores[6]["dice"] > 0.6  # right and left lung
    assert all(0.0 < s["dice"] <= 1.0 and 0.0 < s["nsd"] <= 1.0 for s in scores.values())


def test_the_qc_page_lists_every_instance_with_overlays_and_the_failed_case(box_filled_chest, tmp_path):
    store, case_id = box_filled_chest
    page = write_report(store, tmp_path / "qc")
    html = page.read_text()
    instances = store.case_attrs(case_id)["instances"]
    assert html.count(f"<tr><td>{case_id}</td>") == len(instances) > 0
    pictures = sorted(p.name for p in (tmp_path / "qc").glob("*.png"))
    assert pictures
    assert all(name in html for name in pictures)
    (failed,) = store.errors()
    assert f"failed {failed}: " in html
    assert "broken.nrrd" in html
