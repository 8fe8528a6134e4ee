"""Inputs on the command line -> CaseRefs (one per image file or DICOM series folder), paired with masks."""
from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.readers import DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES, NRRD_SUFFIXES, stem_of, suffix_of
from pipeline.store import CaseStore
from pipeline.types import CaseRef

VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES + IMAGE_SUFFIXES


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _looks_like_dicom(path: Path) -> bool:
    if suffix_of(path) in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def expand_input(path: Path) -> list[Path]:
    """A file stays itself; a folder gives its image files, or itself when it holds a DICOM series."""
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if suffix_of(p) in VOLUME_SUFFIXES]
    if images:
        return images
    if any(_looks_like_dicom(p) for p in files[:50]):
        return [path]
    return [path]  # let the reader say what is wrong with it


def _mask_for(image: Path, index: int, n_inputs: int, masks: list[Path]) -> Path | None:
    if not masks:
        return None
    if len(masks) == 1 and masks[0].is_dir():
        stem = stem_of(image)
        found = [p for p in sorted(masks[0].iterdir()) if stem_of(p) == stem]
        return found[0] if found else masks[0] / f"{stem}.missing"
    return masks[index] if len(masks) == n_inputs else None


def discover(inputs: list[str | Path], store: CaseStore, *, coarse_masks: list[str | Path] = ()) -> list[CaseRef]:
    """CaseRefs for every image under ``inputs``; masks pair by order or, for a mask folder, by file stem."""
    inputs = [Path(p) for p in inputs]
    masks = [Path(p) for p in coarse_masks]
    if masks and not (len(masks) == len(inputs) or (len(masks) == 1 and masks[0].is_dir())):
        raise ValueError(f"--coarse-mask takes one mask per input ({len(inputs)}) or one folder; got {len(masks)}")
    cases = []
    for index, given in enumerate(inputs):
        for image in expand_input(given):
            mask = _mask_for(image, index, len(inputs), masks)
            try:
                identity = "sha256:" + content_hash(image)
            except OSError:
                identity = "path:" + str(image.resolve())
            kind = "dicom-series" if image.is_dir() else suffix_of(image).lstrip(".")
            cases.append(CaseRef(case_id=store.case_id(identity), image=str(image),
                                 coarse_mask=None if mask is None else str(mask), kind=kind))
    return cases
