"""Two `medsam-engine annotate` processes started together on one store (a manual run during the nightly one):
each case is computed and committed once, by one of them; nothing lands in `_previous/`; no lease is left."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from medsam_engine.pipeline.store.case_store import CaseStore


def test_two_runs_started_together_commit_each_case_once(nuclei_tiles, tmp_path, box_fill):
    images, masks = nuclei_tiles
    store = tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "medsam_engine.pipeline.cli.main",
        "annotate",
        str(images),
        "--coarse-mask",
        str(masks),
        "--out",
        str(store),
        "--config",
        str(box_fill),
    ]
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [run.communicate(timeout=900) for run in runs]
    for run, (_, err) in zip(runs, results, strict=False):
        assert run.returncode == 0, err[-3000:]
        assert "Traceback" not in err

    s = CaseStore(store)
    cases = s.committed_cases()
    assert len(cases) == 4
    assert not (store / "_previous").exists()  # no commit was overwritten
    assert not list((store / "_leases").glob("*.json"))  # every lease was given back
    records = [json.loads(p.read_text()) for p in sorted((store / "_runs").glob("*.json"))]
    assert len(records) == 2
    done = [c["case_id"] for r in records for c in r["cases"] if c["status"] == "done"]
    assert sorted(done) == sorted(cases)  # each case computed by exactly one run
    for record in records:  # the other run skipped it: in progress there, or already committed
        assert {c["status"] for c in record["cases"]} <= {"done", "skipped"}
        assert len(record["cases"]) == 4
    for case_id in cases:
        labels, attrs = s.read_labels(case_id)
        assert "previous_versions" not in attrs.raw
        assert len(np.unique(labels)) > 10  # many nuclei segmented
