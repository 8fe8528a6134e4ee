"""Argument checks for the post-processing functions; each failure is a ValueError naming the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

# Relative slack for comparisons of millimetre quantities computed in floating point
# (e.g. 3 px * 0.7 mm must count as 2.1 mm).
RELATIVE_SLACK = 1e-9


def check_mask(mask: Any, *, name: str = "mask", ndims: Sequence[int] = (2, 3)) -> np.ndarray:
    """Return ``mask`` unchanged if it is a boolean numpy array with one of ``ndims`` dimensions."""
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"Argument '{name}' must be a numpy array; got {type(mask).__name__}.")
    if mask.dtype != np.bool_:
        raise ValueError(f"Argument '{name}' must have dtype bool; got {mask.dtype}.")
    if mask.ndim not in ndims:
        wanted = " or ".join(f"{n}D" for n in ndims)
        raise ValueError(f"Argument '{name}' must be {wanted}; got shape {mask.shape}.")
    return mask


def check_spacing(spacing: Any, *, name: str, ndim: int) -> tuple[float, ...]:
    """Return ``spacing`` as ``ndim`` positive finite floats (millimetres per voxel)."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Argument '{name}' must be {ndim} positive numbers (mm); got {spacing!r}.") from exc
    if len(values) != ndim or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"Argument '{name}' must be {ndim} positive numbers (mm); got {spacing!r}.")
    return values


def check_number(value: Any, *, name: str, minimum: float = 0.0) -> float:
    """Return ``value`` as a float if it is a finite real number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"Argument '{name}' must be a finite number; got {value!r}.")
    if value < minimum:
        raise ValueError(f"Argument '{name}' must be >= {minimum:g}; got {value!r}.")
    return float(value)


def check_optional_number(value: Any, *, name: str, minimum: float = 0.0) -> float | None:
    """Like :func:`check_number`, but ``None`` passes through."""
    return None if value is None else check_number(value, name=name, minimum=minimum)


def check_int(value: Any, *, name: str, minimum: int = 0) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"Argument '{name}' must be an integer; got {value!r}.")
    if value < minimum:
        raise ValueError(f"Argument '{name}' must be >= {minimum}; got {value!r}.")
    return int(value)


def check_bool(value: Any, *, name: str) -> bool:
    """Return ``value`` if it is a bool (numpy bools included)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Argument '{name}' must be True or False; got {value!r}.")
    return bool(value)
