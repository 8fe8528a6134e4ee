"""One spelling per concept over every parser: the store is --store (or the first positional of a command
that reads one), --out is what a command writes other than the store, --labels is a label table, --format
names formats, --device takes gpu; older spellings stay as aliases; options never swallow the inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from medsam_engine.pipeline.cli.common import settle_inputs, settle_store
from medsam_engine.pipeline.cli.main import _parser

REPO = Path(__file__).resolve().parents[2]


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for every leaf command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _commands(child, (*path, name))


COMMANDS = dict(_commands(_parser()))


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def _positional_store(parser: argparse.ArgumentParser) -> bool:
    return any(not a.option_strings and a.dest == "store" for a in parser._actions)


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=" ".join)
def test_the_store_is_spelled_store(words):
    parser = COMMANDS[words]
    options = _options(parser)
    names_a_store = _positional_store(parser) or any(a.metavar == "STORE" for a in options.values())
    if names_a_store:
        assert "--store" in options
    for flag, action in options.items():
        if action.metavar == "STORE":
            assert action.option_strings[0] == "--store", f"{words}: {flag} names the store"


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=" ".join)
def test_each_option_means_one_thing(words):
    options = _options(COMMANDS[words])
    if "--labels" in options:  # a label table; elsewhere only an older name of a clearer option
        action = options["--labels"]
        assert action.metavar == "FILE" or action.option_strings[0] != "--labels"
    if "--device" in options:
        assert options["--device"].type("gpu") == "cuda"
    if "--formats" in options:
        assert options["--formats"].option_strings[0] == "--format"
    if "--out" in options and options["--out"].metavar == "STORE":
        assert words == ("annotate",)  # annotate's older name of --store


def test_round_run_takes_every_annotate_option_that_applies_to_it():
    annotate, round_run = _options(COMMANDS[("annotate",)]), _options(COMMANDS[("round", "run")])
    not_for_rounds = {
        "--overwrite",
        "--out",
    }  # a round replaces its stale proposals; --out is --store's alias
    assert set(annotate) - not_for_rounds <= set(round_run)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["annotate", "ct.nii.gz", "--out", "s"], {"store": "s", "inputs": ["ct.nii.gz"]}),
        (["annotate", "ct.nii.gz", "--store", "s"], {"store": "s"}),
        (["export", "s", "--format", "nifti", "--out", "d"], {"store": "s", "out": "d"}),
        (["export", "--store", "s", "--format", "nifti", "--out", "d"], {"store": "s", "out": "d"}),
        (["model", "use", "--store", "s", "base"], {"store": "s", "sha256": "base"}),
        (["model", "use", "s", "base"], {"store": "s", "sha256": "base"}),
        (
            ["review", "import", "--store", "s", "a.nii.gz", "b.nii.gz", "--reviewer", "r"],
            {"corrections": ["a.nii.gz", "b.nii.gz"]},
        ),
        (["review", "export", "s", "--out", "q", "--formats", "nifti"], {"formats": ["nifti"]}),
        (
            ["review", "export", "s", "--out", "q", "--format", "zarr", "nifti"],
            {"formats": ["zarr", "nifti"]},
        ),
        (
            ["finetune", "--images", "a.nii.gz", "--labels", "b.nii.gz", "--out", "m.pth"],
            {"labels": ["b.nii.gz"]},
        ),
        (
            ["finetune", "--images", "a.nii.gz", "--masks", "b.nii.gz", "--out", "m.pth"],
            {"labels": ["b.nii.gz"]},
        ),
        (["detector", "train", "--store", "s", "--out", "d.pt", "--labels", "1", "2"], {"labels": [1, 2]}),
        (["detector", "train", "--store", "s", "--out", "d.pt", "--label-values", "3"], {"labels": [3]}),
        (
            ["round", "run", "in", "--store", "s", "--device", "gpu", "--mode", "propagate"],
            {"device": "cuda"},
        ),
        (
            ["annotate", "--coarse-mask", "m.nii.gz", "ct.nii.gz", "--out", "s"],
            {"inputs": ["ct.nii.gz"], "coarse_mask": ["m.nii.gz"]},
        ),
        (
            ["annotate", "--coarse-mask", "m1", "m2", "c1", "c2", "--out", "s"],
            {"inputs": ["c1", "c2"], "coarse_mask": ["m1", "m2"]},
        ),
    ],
)
def test_old_and_new_spellings_parse_alike(argv, expected):
    args = _parser().parse_args(argv)
    assert settle_store(args) is None
    assert settle_inputs(args) is None
    assert {key: getattr(args, key) for key in expected} == expected


def test_a_mask_folder_before_the_inputs_is_the_folder(tmp_path):
    (tmp_path / "masks").mkdir()
    args = _parser().parse_args(
        ["annotate", "--coarse-mask", str(tmp_path / "masks"), "a", "b", "--out", "s"]
    )
    assert settle_inputs(args) is None
    assert (args.coarse_mask, args.inputs) == ([str(tmp_path / "masks")], ["a", "b"])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["export", "s1", "--store", "s2", "--format", "nifti", "--out", "d"], "two stores given"),
        (["model", "list"], "give the store: STORE or --store STORE"),
        (["model", "use", "s"], "SHA256 is missing"),
        (["annotate", "--coarse-mask", "a", "b", "c", "--out", "s"], "INPUT is missing"),
    ],
)
def test_a_store_or_input_given_wrong_is_one_line(argv, says):
    args = _parser().parse_args(argv)
    assert says in (settle_store(args) or settle_inputs(args) or "")


def test_both_deployments_name_the_store_store():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert [sorted(d["parameters"]).count("store") for d in deployments] == [1] * len(deployments)
    assert all("out" not in d["parameters"] for d in deployments)
