"""Compare a store's committed label maps with reference label maps (Dice, NSD per case and label)."""

from __future__ import annotations

from pathlib import Path

from medsam_engine.pipeline.core.errors import CaseError
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.core.metrics import per_label_scores
from medsam_engine.pipeline.io.channels import channel_of
from medsam_engine.pipeline.io.formats import stem_of
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore


def match_references(store: CaseStore, references: list[str | Path]) -> dict[str, Path]:
    """Pair committed cases with reference files: by case id, by the input's file stem (an nnU-Net image
    ``CASE_0000`` also by ``CASE``, as its labels are named), by the coarse mask's stem, or one-to-one."""
    files: list[Path] = []
    for ref in (Path(r) for r in references):
        files.extend(sorted(p for p in ref.iterdir() if p.is_file()) if ref.is_dir() else [ref])
    cases = store.committed_cases()
    by_stem = {stem_of(f): f for f in files}
    pairs: dict[str, Path] = {}
    for case_id in cases:
        manifest = store.manifest(case_id) or {}
        image = str(manifest.get("image") or "")
        named = channel_of(image) if image else None
        mask = stem_of(manifest.get("coarse_mask") or "")
        for key in (case_id, stem_of(image), named[0] if named else "", mask):
            if key and key in by_stem:
                pairs[case_id] = by_stem[key]
                break
    if not pairs and len(cases) == 1 and len(files) == 1:
        pairs[cases[0]] = files[0]
    return pairs


def evaluate_store(
    store: CaseStore, references: list[str | Path], *, problems: dict[str, str] | None = None
) -> dict[str, dict[int, dict[str, float]]]:
    """{case_id: {label: {"dice", "nsd"}}} for every case that has a reference. A reference that cannot be
    read or does not fit its case's grid raises its CaseError, or, with ``problems``, is recorded there
    (case id -> reason) and the other cases are scored."""
    results = {}
    for case_id, ref_path in sorted(match_references(store, references).items()):
        labels, attrs = store.read_labels(case_id)
        try:
            reference = align_to(read_volume(ref_path), attrs.volume(labels), what="reference")
        except CaseError as exc:
            if problems is None:
                raise
            problems[case_id] = exc.reason
            continue
        results[case_id] = per_label_scores(labels, reference, spacing=attrs.geometry.spacing)
    return results
