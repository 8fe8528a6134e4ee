"""The installed names (one ``medsam_engine`` namespace) and the Python API on real data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import medsam_engine as me
from medsam_engine.pipeline.core.metrics import dice
from medsam_engine.pipeline.io.readers import read_volume

ROOT = Path(__file__).resolve().parents[1]
LAYER_FOLDERS = ("pipeline", "flows", "detectors", "postprocess")


def test_every_layer_package_is_installed_under_the_namespace():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(("medsam_engine", *p.parent.relative_to(ROOT).parts))
        for top in LAYER_FOLDERS
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert set(config["packages"]) == folders | {"medsam_engine"}
    assert {config["package-dir"][f"medsam_engine.{top}"] for top in LAYER_FOLDERS} == set(LAYER_FOLDERS)


def test_a_projects_own_flows_and_pipeline_folders_neither_shadow_nor_are_shadowed(tmp_path):
    for name in ("flows", "pipeline"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'the project {name}'\n")
    code = (
        "import flows, pipeline, medsam_engine.flows.round as r, medsam_engine.pipeline.cli.main as m; "
        "print(flows.OWNER, pipeline.OWNER, r.__file__, m.__file__, sep='|')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    own_flows, own_pipeline, engine_round, engine_cli = out.stdout.strip().split("|")
    assert (own_flows, own_pipeline) == ("the project flows", "the project pipeline")
    assert Path(engine_round) == ROOT / "flows" / "round.py"
    assert Path(engine_cli) == ROOT / "pipeline" / "cli" / "main.py"


def test_importing_the_namespace_loads_no_model_library():
    code = "import sys, medsam_engine; print([m for m in ('torch', 'ray', 'prefect') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_open_store_and_read_case_refuse_what_is_not_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="no store at"):
        me.open_store(tmp_path / "nostore")
    with pytest.raises(KeyError, match="not committed"):
        me.read_case(tmp_path, "abc")


@pytest.mark.slow
def test_annotate_then_read_case_on_real_ct(small_chest, tmp_path):
    image, mask = small_chest
    summary = me.annotate([image], tmp_path / "store", coarse_masks=[mask])
    assert [o.status for o in summary.outcomes] == ["done"]
    store = me.open_store(tmp_path / "store")
    (case_id,) = store.committed_cases()
    labels, _attrs = me.read_case(store, case_id)
    reference = read_volume(mask).array
    assert labels.shape == reference.shape
    assert dice(labels > 0, reference > 0) > 0.7
    assert set(np.unique(labels)) == set(np.unique(reference))
    again = me.annotate([image], store, coarse_masks=[mask])
    assert [o.status for o in again.outcomes] == ["skipped"]


def test_segment_an_in_memory_slice_from_a_box(small_chest):
    image, mask = small_chest
    volume, reference = read_volume(image).array, read_volume(mask).array
    ys, xs = np.nonzero(reference[1] == 5)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    labels = me.segment(volume, [me.BoxPrompt(label=5, instance=1, z=1, box=box)], modality="CT")
    assert labels.shape == volume.shape
    assert labels.dtype == np.uint16
    assert dice(labels[1] == 5, reference[1] == 5) > 0.7  # a lung from its true box (facts.md: 0.75-0.81)
    assert not labels[[0, 2, 3]].any()
    planar = me.segment(volume[1], [me.BoxPrompt(label=5, instance=1, z=0, box=box)], modality="CT")
    assert np.array_equal(planar, labels[1])
