"""A marked finding's CT window: soft tissue along its lines in aerated lung around its box is a nodule,
read in the lung window; other findings are left to the median rule along their lines."""

from __future__ import annotations

import numpy as np

from medsam_engine.detectors.marks_window import in_aerated_lung, line_pixels, seed_map, window_kinds
from medsam_engine.pipeline.core.types import BoxPrompt, Geometry, Volume

CROSS = [np.array([[10.0, 16.0], [22.0, 16.0]]), np.array([[16.0, 10.0], [16.0, 22.0]])]
BOX = (10, 10, 22, 22)


def _slice(background: int, spot: int) -> np.ndarray:
    hu = np.full((32, 32), background, dtype=np.int16)
    hu[10:23, 10:23] = spot
    return hu


def test_line_pixels_run_from_end_to_end_and_stay_on_the_slice():
    ys, xs = line_pixels(np.array([[0.0, 0.0], [40.0, 3.0]]), (8, 20))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 3, 0, 19)


def test_a_soft_spot_in_aerated_lung_is_a_nodule_and_nothing_else_is():
    assert in_aerated_lung(_slice(-850, 40), BOX, CROSS)
    assert not in_aerated_lung(_slice(60, 40), BOX, CROSS)  # a lesion in soft tissue
    assert not in_aerated_lung(_slice(-850, 500), BOX, CROSS)  # calcified: the bone window's
    assert not in_aerated_lung(_slice(-850, 40), BOX, [])  # no lines: nothing measured across it


def test_window_kinds_name_the_lung_window_for_labels_whose_findings_all_lie_in_lung():
    hu = np.stack([_slice(-850, 40), _slice(60, 40)])
    prompts = [BoxPrompt(1, 1, 0, BOX), BoxPrompt(2, 1, 0, BOX), BoxPrompt(2, 2, 1, BOX)]
    geometry = Geometry(np.eye(4), hu.shape, np.eye(4), hu.shape)
    ct = Volume(hu, geometry, modality="CT")
    assert window_kinds(ct, prompts, [CROSS, CROSS, CROSS]) == {1: "lung"}
    assert window_kinds(Volume(hu, geometry, modality="MR"), prompts, [CROSS] * 3) == {}


def test_the_seed_map_holds_a_findings_lines_else_its_box():
    prompts = [BoxPrompt(1, 1, 0, BOX), BoxPrompt(2, 1, 1, BOX)]
    labels = seed_map(prompts, (2, 32, 32), [CROSS, []])
    crossed = line_pixels(CROSS[0], (32, 32))
    assert (labels[0][crossed] == 1).all()
    assert labels[0, 10, 10] == 0
    assert (labels[1, 10:23, 10:23] == 2).all()
    assert labels[1].sum() == 2 * 13 * 13
