"""A command pointed at something that is not a store says so in one line, exits 2 and creates nothing."""

from __future__ import annotations

import pytest

from medsam_engine.pipeline.cli.main import main

READERS = [
    ["model", "list", "{store}"],
    ["model", "use", "{store}", "base"],
    ["round", "report", "{store}"],
    ["export", "{store}", "--format", "nifti", "--out", "{out}"],
    ["eval", "{store}", "--reference", "{out}/ref.nii.gz"],
    ["review", "export", "{store}", "--out", "{out}"],
    ["review", "calibrate", "{store}"],
    ["detector", "train", "--store", "{store}", "--out", "{out}/det.pt"],
    ["finetune", "--store", "{store}", "--out", "{out}/ft.pth"],
]


def _argv(template: list[str], store, out) -> list[str]:
    return [part.format(store=store, out=out) for part in template]


@pytest.mark.parametrize("template", READERS, ids=lambda t: " ".join(t[:2]))
def test_a_missing_store_is_one_line_and_exit_2_and_is_not_created(template, tmp_path, capsys):
    store = tmp_path / "nostore"
    assert main(_argv(template, store, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medsam-engine {template[0]}: no store at {store}"]
    assert not store.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "make, says",
    [
        (
            lambda root: (root / "file.nii.gz").write_bytes(b"x") and root / "file.nii.gz",
            "is a file, not a store",
        ),
        (lambda root: (root / "images").mkdir() or root / "images", "is not a medsam-engine store"),
        (lambda root: (root / "ab12.ome.zarr").mkdir() or root / "ab12.ome.zarr", "is one case of a store"),
    ],
    ids=["a file", "a folder of images", "a case"],
)
def test_what_is_not_a_store_is_named(make, says, tmp_path, capsys):
    target = make(tmp_path)
    assert main(["model", "list", str(target)]) == 2
    assert says in capsys.readouterr().err
