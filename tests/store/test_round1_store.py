"""A store written by the round-1 engine (before the layer packages; tests/data/round1, made at commit e5d7e00
from real data: two chest CT slices from slicerio and a nuclei crop from stardist) still reads, resumes and
exports, and the engine of today writes the very same masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.io.readers import stem_of
from medsam_engine.pipeline.store.case_store import CaseStore

DATA = Path(__file__).resolve().parents[1] / "data" / "round1"


@pytest.fixture()
def round1(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSAM_ENGINE_ID_KEY", raising=False)  # the store's own key names its cases
    root = tmp_path / "round1"
    shutil.copytree(DATA, root)
    return root


def _by_stem(store: CaseStore) -> dict[str, np.ndarray]:
    return {stem_of(store.manifest(c)["image"]): store.read_labels(c)[0] for c in store.committed_cases()}


def test_a_round1_store_resumes_without_work_and_exports(round1, capsys):
    store = CaseStore(round1 / "store")
    assert len(store.committed_cases()) == 2
    code = main(
        [
            "annotate",
            str(round1 / "inputs"),
            "--coarse-mask",
            str(round1 / "masks"),
            "--out",
            str(round1 / "store"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "0 done, 2 skipped, 0 failed" in out  # same signature: nothing recomputed
    assert main(["export", str(round1 / "store"), "--format", "nifti", "--out", str(round1 / "nifti")]) == 0
    assert len(list((round1 / "nifti").glob("*.nii.gz"))) == 2
    capsys.readouterr()
    assert main(["export", str(round1 / "store"), "--format", "coco", "--out", str(round1 / "coco")]) == 1
    assert (
        "not a 2D image" in capsys.readouterr().out
    )  # the CT is skipped with its reason, the nuclei written
    assert (round1 / "coco" / "annotations.json").is_file()
    assert main(["eval", str(round1 / "store"), "--reference", str(round1 / "masks"), "--json"]) == 0


def test_todays_engine_writes_the_round1_masks(round1, capsys):
    code = main(
        [
            "annotate",
            str(round1 / "inputs"),
            "--coarse-mask",
            str(round1 / "masks"),
            "--out",
            str(round1 / "today"),
        ]
    )
    assert code == 0, capsys.readouterr()
    before, after = _by_stem(CaseStore(round1 / "store")), _by_stem(CaseStore(round1 / "today"))
    assert sorted(before) == sorted(after) == ["chest", "nuclei"]
    for stem in before:
        assert np.array_equal(before[stem], after[stem]), stem
