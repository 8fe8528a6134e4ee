"""The Prefect flow under a real temporary Prefect server, annotating on real Ray actors."""
from __future__ import annotations

import shutil

import numpy as np

from conftest import make_archive
from pipeline.store import CaseStore


def test_flow_annotates_a_real_archive_on_ray_and_reruns_only_what_is_missing(
        tmp_path, small_chest, small_chest_nifti, prefect_server, local_ray):
    from flows.annotate import annotate_archive

    images, masks = make_archive(tmp_path, small_chest, small_chest_nifti)
    store = tmp_path / "store"

    first = annotate_archive(inputs=[str(images)], out=str(store), coarse_masks=[str(masks)], shards=2)
    assert first == {"done": 2, "skipped": 0, "failed": 0}
    committed = CaseStore(store).committed_cases()
    assert len(committed) == 2
    before = {c: CaseStore(store).read_labels(c)[0] for c in committed}

    # a case lost from the store is redone, the other is skipped, and masks are identical
    shutil.rmtree(CaseStore(store).case_path(committed[0]))
    second = annotate_archive(inputs=[str(images)], out=str(store), coarse_masks=[str(masks)], shards=2)
    assert second == {"done": 1, "skipped": 1, "failed": 0}
    for case_id, labels in before.items():
        assert np.array_equal(CaseStore(store).read_labels(case_id)[0], labels)
