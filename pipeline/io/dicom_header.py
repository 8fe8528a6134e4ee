"""The one entry point for reading a DICOM file's header with pydicom: :func:`read_dicom_header`.

Every header read of the engine (the series scan, DICOM SEG inputs and exports, the marks detector, the shard
balancer) comes here, so one set of rules holds for all of them:

* pixel data is never read (``stop_before_pixels``); ``tags`` limits the read to those keywords;
* never forced: a file without the Part 10 'DICM' marker and meta header is not DICOM to the engine (a forced
  read makes a data set out of any bytes);
* nothing deferred: every value is read while the file is open, so the file may be removed afterwards (a
  cache entry dropped); values are still decoded on first access, where a corrupt element raises;
* a file that cannot be read raises :class:`HeaderError`, a ReadError naming the file and the reason.

The series scan (pipeline/io/dicom_scan.py) tries a byte walker first (pipeline/io/dicom_part10.py) and comes
here for what it declines. Reads of whole files, pixels included, are not header reads and stay where their
pixels are used (tests/test_house_rules.py lists them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsam_engine.pipeline.core.errors import ReadError

if TYPE_CHECKING:
    from pydicom import Dataset

NOT_DICOM = "not a DICOM file (no 'DICM' marker and no DICOM header)"
EMPTY = "empty file (0 bytes)"


class HeaderError(ReadError):
    """A DICOM header that cannot be read. ``reason`` is "file name: why"; ``why`` the reason alone."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(f"{Path(path).name}: {why}")
        self.path = str(path)
        self.why = why

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes despite its own arguments
        return type(self), (self.path, self.why), self.__dict__


def _why(path: str | os.PathLike[str], exc: Exception) -> str:
    """The reason a person reads for pydicom's ``exc`` on ``path``."""
    from pydicom.errors import InvalidDicomError

    if isinstance(exc, InvalidDicomError):
        try:
            return EMPTY if os.path.getsize(path) == 0 else NOT_DICOM
        except OSError:
            return NOT_DICOM
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or exc})"
    return f"corrupt DICOM header ({type(exc).__name__}: {str(exc)[:120]})"


def read_dicom_header(path: str | os.PathLike[str], *, tags: Sequence[str] | None = None) -> Dataset:
    """The header of the DICOM file at ``path`` (pixel data left out), only the elements named in ``tags``
    (keywords such as "SOPClassUID") when given. Raises :class:`HeaderError` when the file is missing,
    unreadable, empty, not DICOM or has a header pydicom cannot parse."""
    import pydicom

    try:
        return pydicom.dcmread(
            os.fspath(path),
            stop_before_pixels=True,
            specific_tags=None if tags is None else list(tags),
            defer_size=None,
            force=False,
        )
    except Exception as exc:  # corrupt headers make the parser raise many types
        raise HeaderError(path, _why(path, exc)) from exc
