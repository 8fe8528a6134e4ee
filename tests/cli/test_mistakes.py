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


def test_annotate_with_no_input_that_exists_makes_no_store(tmp_path, capsys):
    store = tmp_path / "store"
    argv = ["annotate", str(tmp_path / "typo.nii.gz"), "--coarse-mask", str(tmp_path / "m.nii.gz")]
    assert main([*argv, "--out", str(store)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"medsam-engine annotate: no such file or folder: {tmp_path}/typo.nii.gz"
    )
    assert not store.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["annotate", "{file}", "--coarse-mask", "{file}", "--out", "{file}"],
        ["export", "{store}", "--format", "nifti", "--out", "{file}"],
        ["review", "export", "{store}", "--out", "{file}"],
    ],
    ids=["annotate", "export", "review export"],
)
def test_an_out_folder_that_is_a_file_is_one_line(argv, tmp_path, capsys):
    file = tmp_path / "taken.png"
    file.write_bytes(b"not a folder")
    store = tmp_path / "store"
    (store / "_runs").mkdir(parents=True)
    assert main([part.format(file=file, store=store) for part in argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(
        f"--out {file} is a file; give a folder for the " + ("store" if argv[0] == "annotate" else "export")
    )


def test_a_bad_configuration_is_one_line_without_links(tmp_path, capsys):
    config = tmp_path / "engine.yaml"
    config.write_text("model: {device: tpu}\nprompts: {box_margin: -3}\n")
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    assert (
        main(
            [
                "annotate",
                str(image),
                "--coarse-mask",
                str(image),
                "--config",
                str(config),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("medsam-engine annotate: bad configuration: ")
    assert "model.device: Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')" in line
    assert "http" not in line


def test_gpu_is_another_name_for_cuda():
    from medsam_engine.pipeline.cli.main import _parser

    args = _parser().parse_args(["annotate", "a.png", "--out", "s", "--device", "gpu"])
    assert args.device == "cuda"
    args = _parser().parse_args(["finetune", "--store", "s", "--out", "m.pth", "--device", "GPU"])
    assert args.device == "cuda"
