"""Every row of docs/mistakes.md, run as written: the exit code, the line that says what is wrong, no
traceback, and nothing created by a command that exits 2."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from medsam_engine.pipeline.cli.main import main

TABLE = Path(__file__).resolve().parents[2] / "docs" / "mistakes.md"


def _rows() -> list[tuple[str, str, int, str]]:
    rows = []
    text = TABLE.read_text().split("## The table", 1)[1]
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`medsam-engine "):
            continue
        mistake, command, code, says = cells
        rows.append((mistake, command.strip("`"), int(code), says.strip("`")))
    return rows


ROWS = _rows()


def test_the_table_holds_at_least_twenty_mistakes():
    assert len(ROWS) >= 20


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_chest, box_fill) -> dict[str, str]:
    """What the table's placeholders name: real CT data, a store holding it, and the odd files."""
    root = tmp_path_factory.mktemp("mistakes")
    ct, mask = root / "ct.nrrd", root / "ct_mask.nrrd"
    shutil.copy(small_chest[0], ct)
    shutil.copy(small_chest[1], mask)
    store = root / "store"
    assert (
        main(
            ["annotate", str(ct), "--coarse-mask", str(mask), "--out", str(store), "--config", str(box_fill)]
        )
        == 0
    )
    (case,) = sorted(store.glob("*.ome.zarr"))
    (root / "notes.txt").write_text("not an image\n")
    (root / "images").mkdir()
    shutil.copy(small_chest[0], root / "images" / "scan.nrrd")
    (root / "empty").mkdir()
    (root / "foreign").mkdir()
    (root / "foreign" / "README").write_text("someone else's\n")
    (root / "bad.yaml").write_text("model: {device: tpu}\n")
    return {
        "ct": str(ct),
        "mask": str(mask),
        "store": str(store),
        "case": str(case),
        "file": str(root / "notes.txt"),
        "images": str(root / "images"),
        "empty": str(root / "empty"),
        "foreign": str(root / "foreign"),
        "bad_config": str(root / "bad.yaml"),
    }


def _cuda() -> bool:
    from medsam_engine.pipeline.model.devices import cuda_available

    return cuda_available()


@pytest.mark.parametrize(("mistake", "command", "code", "says"), ROWS, ids=[r[0] for r in ROWS])
def test_a_mistake_gets_its_line_and_exit_code(mistake, command, code, says, world, tmp_path, capsys):
    if "--device cuda" in command and _cuda():
        pytest.skip("this machine has a GPU: --device cuda is no mistake here")
    new = tmp_path / "new"
    argv = shlex.split(command.format(new=new, **world))[1:]
    before = set(tmp_path.iterdir())
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        got = exc.code
    out, err = capsys.readouterr()
    assert got == code, f"{mistake}: exit {got}\n{out}{err}"
    assert says in out + err, f"{mistake}:\n{out}{err}"
    assert "Traceback" not in out + err
    if code == 2:
        assert set(tmp_path.iterdir()) == before  # a usage mistake creates nothing
        said = [line for line in err.splitlines() if line.strip() and not re.match(r"^\s|usage:", line)]
        assert len(said) == 1, err


def test_nnunet_images_pair_with_their_labels(small_chest, box_fill, tmp_path, capsys):
    """nnU-Net's layout is no mistake: CASE_0000 images pair with CASE label maps."""
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    shutil.copy(small_chest[0], images / "chest_001_0000.nrrd")
    shutil.copy(small_chest[1], labels / "chest_001.nrrd")
    argv = ["annotate", str(images), "--coarse-mask", str(labels), "--out", str(tmp_path / "s")]
    assert main([*argv, "--config", str(box_fill)]) == 0
    assert "1 done" in capsys.readouterr().out
