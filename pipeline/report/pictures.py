"""Pictures for the QC pages, drawn with OpenCV and numpy: a case's slices as 8-bit display images, label
overlays in the store's colours, crops around one instance's box prompt, and PNG data URIs.

Slices are (y, x) uint8 grey or (y, x, 3) uint8 RGB; label slices (y, x) integer label values; boxes are
``(x_min, y_min, x_max, y_max)`` voxel indices, inclusive on both ends (pipeline/core/types.py); colours are
RGB 0..255 by label value. Every picture comes back as a new (h, w, 3) uint8 RGB array.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Iterable, Mapping

import numpy as np

from medsam_engine.pipeline.core.intensity import IntensityConfig, to_uint8
from medsam_engine.pipeline.core.types import CaseAttributes
from medsam_engine.pipeline.store.labels_meta import label_colour

Colours = Mapping[int, tuple[int, int, int]]
Window = tuple[float, float]  # CT (level, width) in HU
Box = tuple[int, int, int, int]

NO_IMAGE_GREY = 110  # the background masks are drawn on when the store kept no image
FILL = 0.25  # opacity of the label fill over the image


def display_modality(attrs: CaseAttributes) -> str:
    """The modality the case's intensities were mapped as: the configured one, else the image's own."""
    wanted = str(attrs.config.get("intensity", {}).get("modality", "auto"))
    return attrs.modality if wanted == "auto" else wanted


def display_window(attrs: CaseAttributes, label: int | None = None) -> Window | None:
    """The CT window a slice is shown in: the one the model saw ``label`` in (the case's ``ct_windows``),
    else the configured CT window (default level 40, width 400 HU); None for any other modality."""
    if display_modality(attrs) != "CT":
        return None
    windows = attrs.raw.get("ct_windows") or {}
    if label is not None and str(label) in windows:
        level, width = windows[str(label)]
        return float(level), float(width)
    section = attrs.config.get("intensity", {})
    return float(section.get("ct_level", 40.0)), float(section.get("ct_width", 400.0))


def display_slices(
    image: np.ndarray, modality: str, wanted: Mapping[Window | None, Iterable[int]]
) -> dict[tuple[Window | None, int], np.ndarray]:
    """The slices of a stored image (z, y, x[, c]) as uint8, keyed by (window, z), for each window's z indices
    in ``wanted``: CT through the (level, width) window, other scalar images clipped to the 0.5-99.5
    percentiles of the volume's non-zero voxels as MedSAM's preprocessing does, 8-bit images as they are."""
    out = {}
    for window, slices in wanted.items():
        chosen = sorted({int(z) for z in slices})
        if not chosen:
            continue
        if window is None:
            mapped = to_uint8(image, modality, only=chosen)
        else:
            mapped = to_uint8(image, "CT", IntensityConfig(window[0], window[1]), only=chosen)
        out.update({(window, z): mapped[z] for z in chosen})
    return out


def _lookup(values: Iterable[int], colours: Colours | None) -> np.ndarray:
    """(max value + 1, 3) uint8: each label value's colour (the store's, else :func:`label_colour`)."""
    values = [int(v) for v in values]
    table = np.zeros((max(values, default=0) + 1, 3), dtype=np.uint8)
    for value in values:
        table[value] = (colours or {}).get(value) or label_colour(value)
    return table


def overlay(
    slice_u8: np.ndarray,
    labels: np.ndarray,
    *,
    scale: float = 3,
    colours: Colours | None = None,
    fill: float = 0.0,
    filled: Collection[int] | None = None,
) -> np.ndarray:
    """An RGB picture of a (y, x[, 3]) uint8 slice scaled by ``scale``, each label outlined in its colour (the
    store's, ``colours``, from its label metadata, else :func:`label_colour`, the colour every output uses)
    and tinted with opacity ``fill`` (only the label values in ``filled`` when given). Outlines are 2 pixels
    wide from a scale of 2 up."""
    import cv2

    grey = slice_u8 if slice_u8.ndim == 3 else np.repeat(slice_u8[:, :, None], 3, axis=-1)
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    smooth = cv2.INTER_LINEAR if scale >= 1 else cv2.INTER_AREA
    picture = cv2.resize(np.ascontiguousarray(grey), size, interpolation=smooth)
    big = cv2.resize(np.ascontiguousarray(labels, dtype=np.uint16), size, interpolation=cv2.INTER_NEAREST)
    inside = big > 0
    if not inside.any():
        return picture
    table = _lookup(np.unique(big[inside]), colours)
    tint = table[big]
    if fill > 0:
        tinted = inside if filled is None else np.isin(big, list(filled))
        blend = picture * (1.0 - fill) + tint * fill
        picture = np.where(tinted[..., None], blend.astype(np.uint8), picture)
    width = 5 if scale >= 2 else 3
    kernel = np.ones((width, width), dtype=np.uint8)
    edge = inside & (cv2.dilate(big, kernel) != cv2.erode(big, kernel))
    picture[edge] = tint[edge]
    return picture


def draw_box(picture: np.ndarray, box: Box, scale: float) -> np.ndarray:
    """A copy of ``picture`` (a slice scaled by ``scale``) with the voxel box drawn around the voxels it
    holds: white on a dark edge, whatever the label colours."""
    import cv2

    x0, y0, x1, y1 = box
    top_left = (int(np.floor(x0 * scale)), int(np.floor(y0 * scale)))
    bottom_right = (int(np.ceil((x1 + 1) * scale)) - 1, int(np.ceil((y1 + 1) * scale)) - 1)
    out = np.ascontiguousarray(picture).copy()
    cv2.rectangle(out, top_left, bottom_right, (20, 20, 20), 3)
    cv2.rectangle(out, top_left, bottom_right, (255, 255, 255), 1)
    return out


def instance_crop(
    slice_u8: np.ndarray | None,
    labels: np.ndarray,
    box: Box,
    *,
    label: int | None = None,
    colours: Colours | None = None,
    size: int = 240,
) -> np.ndarray:
    """The region of one slice around ``box`` (grown on every side by 60 % of its longer side, 12 voxels at
    least, within the slice), scaled so its longer side is ``size`` pixels, with the labels outlined, the
    mask of ``label`` (every label when None) tinted, and the box prompt drawn. ``slice_u8`` None (the store
    kept no image): the masks on grey."""
    height, width = labels.shape
    x0, y0, x1, y1 = (
        min(max(int(box[0]), 0), width - 1),
        min(max(int(box[1]), 0), height - 1),
        min(max(int(box[2]), 0), width - 1),
        min(max(int(box[3]), 0), height - 1),
    )
    pad = max(12, round(0.6 * max(x1 - x0 + 1, y1 - y0 + 1)))
    left, top = max(0, x0 - pad), max(0, y0 - pad)
    right, bottom = min(width, x1 + pad + 1), min(height, y1 + pad + 1)
    base = np.full(labels.shape, NO_IMAGE_GREY, np.uint8) if slice_u8 is None else slice_u8
    scale = size / max(right - left, bottom - top)
    picture = overlay(
        base[top:bottom, left:right],
        labels[top:bottom, left:right],
        scale=scale,
        colours=colours,
        fill=FILL,
        filled=None if label is None else (label,),
    )
    return draw_box(picture, (x0 - left, y0 - top, x1 - left, y1 - top), scale)


def slice_picture(
    slice_u8: np.ndarray | None, labels: np.ndarray, *, colours: Colours | None = None, size: int = 360
) -> np.ndarray:
    """A whole slice with its labels tinted and outlined, scaled so its longer side is ``size`` pixels (at
    most 4 times its own); ``slice_u8`` None (the store kept no image): the masks on grey."""
    base = np.full(labels.shape, NO_IMAGE_GREY, np.uint8) if slice_u8 is None else slice_u8
    scale = min(4.0, size / max(labels.shape))
    return overlay(base, labels, scale=scale, colours=colours, fill=FILL)


def spread_slices(labels: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` z indices of the (z, y, x) label map spread evenly over the slices that hold labels
    (the middle one for a count of 1), in order."""
    holding = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if holding.size == 0 or count < 1:
        return []
    count = min(count, holding.size)
    return [int(holding[(2 * i + 1) * holding.size // (2 * count)]) for i in range(count)]


def busiest_slices(labels: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` z indices of the (z, y, x) label map with the most labelled voxels, in order."""
    counts = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    return [int(z) for z in sorted(np.argsort(counts)[::-1][:count]) if counts[z] > 0]


def png_data_uri(picture: np.ndarray) -> str:
    """An (h, w, 3) RGB uint8 picture as a ``data:image/png;base64,...`` URI, to embed in a page."""
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(picture), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV could not encode a picture of shape {picture.shape} as PNG")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")
