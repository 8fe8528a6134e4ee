"""One accepted-case query, the rule a parameter."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import commit_from_source

from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.queries import select_cases


@pytest.fixture()
def routed_store(tmp_path, small_chest, small_chest_nifti):
    """Two real cases (one CT written as NRRD and as NIfTI), with the review statuses a test asks for."""

    def make(*statuses):
        store = CaseStore(tmp_path / f"store-{'-'.join(str(s) for s in statuses)}")
        ids = []
        for source, status in zip((small_chest[0], small_chest_nifti[0]), statuses, strict=False):
            labels = align_to(read_volume(small_chest[1]), read_volume(source)).astype(np.uint16)
            extra = {} if status is None else {"review_status": status}
            ids.append(commit_from_source(store, source, labels, **extra))
        return store, ids

    return make


def test_only_person_accepted_cases_train(routed_store):
    store, (accepted, routed) = routed_store("accepted", "auto-accepted")
    chosen, left_out = select_cases(store, "accepted")
    assert chosen == [accepted]
    assert left_out == {routed: "review status is 'auto-accepted', not 'accepted'"}


def test_exports_take_accepted_and_unrouted_cases(routed_store):
    store, (unrouted, rejected) = routed_store(None, "rejected")
    chosen, left_out = select_cases(store, "accepted-or-unrouted")
    assert chosen == [unrouted]
    assert list(left_out) == [rejected]


def test_a_never_reviewed_store_gives_the_detector_every_case(routed_store):
    store, ids = routed_store(None, None)
    assert select_cases(store, "accepted-else-all") == (sorted(ids), {})
    assert select_cases(store, "accepted") == ([], dict.fromkeys(ids, "not reviewed by a person"))
    with pytest.raises(ValueError, match="Argument 'rule'"):
        select_cases(store, "everything")
