"""The layering rules of docs/design.md, checked in fresh interpreters."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["pipeline.readers", "pipeline.geometry", "detectors", "postprocess",
                                    "pipeline.store", "pipeline.metrics", "pipeline.preprocess"])
def test_light_modules_do_not_import_torch_ray_or_prefect(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'ray', 'prefect') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"{module} pulled in {out}"


def test_only_flows_import_prefect():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for pkg in ("pipeline", "detectors", "postprocess")
                 for p in (root / pkg).rglob("*.py") if "prefect" in p.read_text()]
    assert offenders == []
