"""`medsam-engine config show` (the defaults, then a file; YAML or JSON that loads back to the same
configuration; a bad file is exit 2 with one line) and `config reference` (docs/configuration.md's text)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medsam_engine.pipeline.annotate.config import EngineConfig, load_config
from medsam_engine.pipeline.annotate.config_reference import render_reference
from medsam_engine.pipeline.cli.main import main

FILE = """\
intensity:
  ct_window: fixed
  ct_level: -600
  label_windows: {7: [40, 400]}
prompts:
  detector: intensity
  options: {targets: {right lung: 5}}
postprocess:
  per_label:
    1: [{op: closing, radius_mm: 2}]
labels:
  5: {name: right lung, rgb: [200, 100, 50]}
"""


def _show(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["config", "show", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_show_prints_every_default_as_yaml(capsys):
    code, out, err = _show(capsys)
    assert (code, err) == (0, "")
    shown = yaml.safe_load(out)
    assert list(shown) == list(EngineConfig.model_fields)
    assert EngineConfig.model_validate(shown) == EngineConfig()
    assert "  lung_window: [-600.0, 1500.0]\n" in out


def test_show_applies_the_file_over_the_defaults_and_reads_back(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(FILE)
    code, out, _ = _show(capsys, "--config", str(path))
    assert code == 0
    assert "    7: [40.0, 400.0]\n" in out  # label values stay integer keys
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    config = load_config(printed)
    assert config == load_config(path)
    assert (config.intensity.ct_level, config.intensity.ct_width) == (-600.0, 400.0)
    assert config.labels[5].name == "right lung"


def test_show_json_is_the_same_configuration(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(FILE)
    code, out, _ = _show(capsys, "--config", str(path), "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["prompts"]["options"] == {"targets": {"right lung": 5}}
    assert EngineConfig.model_validate(shown) == load_config(path)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("intensity:\n  ct_levl: 3\n", "intensity.ct_levl: Extra inputs are not permitted (got 3)"),
        ("model: {device: tpu}\n", "model.device: Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')"),
        ("intensity:\n  ct_level: [1\n", "is not YAML or JSON"),
        ("- 1\n", "Input should be a valid dictionary"),
        (None, "cannot read"),
    ],
    ids=["unknown-key", "bad-value", "not-yaml", "not-a-mapping", "missing"],
)
def test_a_bad_file_is_exit_2_with_one_line(tmp_path, capsys, text, why):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    code, out, err = _show(capsys, "--config", str(path))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith("medsam-engine config show: bad configuration: ")
    assert why in err


def test_reference_prints_the_generated_reference(capsys):
    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == render_reference()


def test_the_installed_command_writes_the_checked_in_docs():
    """`medsam-engine config reference > docs/configuration.md` as a separate process: its output is the
    file, byte for byte."""
    run = subprocess.run(
        [sys.executable, "-m", "medsam_engine.pipeline.cli.main", "config", "reference"],
        capture_output=True,
        check=True,
    )
    assert run.stdout == (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_bytes()
