"""Expected per-case failures. Each is recorded against its case and the batch goes on.

Anything not derived from :class:`CaseError` is a bug and propagates.
"""
from __future__ import annotations


class CaseError(Exception):
    """A case could not be processed; ``reason`` is for a person, ``stage`` says where it failed."""

    stage = "case"

    def __init__(self, reason: str, *, case_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.case_id = case_id

    def __str__(self) -> str:
        prefix = f"case {self.case_id}: " if self.case_id else ""
        return f"{prefix}{self.reason}"


class ReadError(CaseError):
    """The image or mask could not be read (missing, corrupt, unsupported format or syntax)."""

    stage = "read"


class GeometryError(CaseError):
    """Two inputs that must share a grid do not (a coarse mask on another grid, say)."""

    stage = "geometry"


class PromptError(CaseError):
    """No usable prompt could be made for the case."""

    stage = "prompt"


class StoreConflictError(CaseError):
    """The store already holds this case under another signature and ``overwrite`` was not asked for."""

    stage = "store"
