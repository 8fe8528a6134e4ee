"""What each label value means: name, SNOMED CT code where known, display colour and review status.

The same answers feed the store's OME-Zarr ``image-label`` metadata and the DICOM SEG segment descriptions,
so a label looks and reads the same in every viewer.
"""

from __future__ import annotations

import colorsys
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

# SNOMED CT codes as (value, meaning). Names are matched lower-case, plural "s" dropped; anything not found
# here is looked up in pydicom's SNOMED dictionary by its CamelCase name (e.g. "adrenal gland").
_LATERAL_CODES = {
    "right lung": ("3341006", "Right lung"),
    "left lung": ("44029006", "Left lung"),
    "right kidney": ("9846003", "Right kidney"),
    "left kidney": ("18639004", "Left kidney"),
}
_SYNONYMS = {  # name -> pydicom codes.SCT keyword
    "vertebral column": "Spine",
    "spine": "Spine",
    "spinal column": "Spine",
    "cervical vertebral column": "CervicalSpine",
    "thoracic vertebral column": "ThoracicSpine",
    "lumbar vertebral column": "LumbarSpine",
    "rib": "Rib",
    "lung": "Lung",
    "kidney": "Kidney",
    "urinary bladder": "Bladder",
    "tumour": "Tumor",
    "nuclei": "Nucleus",
    "cell nucleus": "Nucleus",
}
_ABNORMAL = {"Tumor", "Neoplasm", "Lesion", "Mass", "Nodule", "Cyst", "Metastasis"}
_TISSUE = {"Tissue", "SoftTissue", "Fat", "Muscle", "Skin"}

_GENERIC_NAME = re.compile(r"(label|segment|instance) ?\d+")

CATEGORY_ANATOMY = ("91723000", "Anatomical Structure")
CATEGORY_ABNORMAL = ("49755003", "Morphologically Abnormal Structure")
CATEGORY_TISSUE = ("85756007", "Tissue")
GENERIC_TYPE = ("85756007", "Tissue")


@dataclass(frozen=True)
class LabelMeaning:
    """One label value's meaning. ``code`` is the SNOMED CT (value, meaning) or None when not known."""

    value: int
    name: str
    code: tuple[str, str] | None
    category: tuple[str, str]
    rgb: tuple[int, int, int]
    review_status: str

    @property
    def property_type(self) -> tuple[str, str]:
        """The segmented property type to write: the code when known, else the generic "Tissue"."""
        return self.code or GENERIC_TYPE

    def to_ome_property(self) -> dict[str, Any]:
        """The entry of OME-Zarr ``image-label.properties`` for this value."""
        entry = {
            "label-value": self.value,
            "name": self.name,
            "review-status": self.review_status,
            "category": self.category[1],
            "rgb": list(self.rgb),
        }
        if self.code is not None:
            entry.update({"snomed-ct-code": self.code[0], "snomed-ct-meaning": self.code[1]})
        return entry


INSTANCE_LABELS = 16  # more label values in one case: an instance map
MIN_INSTANCES = 5  # a 2D image with this many labels of one object each is an instance map


def is_instance_map(object_labels: list[int], *, flat: bool) -> bool:
    """Whether a case's label map holds instances of one kind (one label per object, as nuclei or cells)
    rather than classes; ``object_labels``: the label of each of its objects (3D connected components, one
    per lineage record); ``flat``: a 2D image."""
    values = set(object_labels)
    if len(values) > INSTANCE_LABELS:
        return True
    return flat and len(values) >= MIN_INSTANCES and len(object_labels) == len(values)


def label_colour(value: int) -> tuple[int, int, int]:
    """A distinct, deterministic RGB colour (0..255) for a label value: golden-ratio hues."""
    hue = (value * 0.6180339887) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return (round(red * 255), round(green * 255), round(blue * 255))


@functools.lru_cache(maxsize=4096)
def _sct_keyword(keyword: str) -> tuple[str, str] | None:
    """pydicom's SNOMED code for a CamelCase keyword (a miss costs milliseconds: pydicom looks for near
    names)."""
    from pydicom.sr.codedict import codes

    try:
        code = getattr(codes.SCT, keyword)
    except AttributeError:
        return None
    return (str(code.value), str(code.meaning))


def snomed_code(name: str) -> tuple[tuple[str, str] | None, tuple[str, str]]:
    """(type code or None, category code) for a label name such as "right lung" or "Liver"."""
    key = " ".join(name.lower().replace("_", " ").split())
    if _GENERIC_NAME.fullmatch(key):  # "label 7", the default name, means nothing to look up
        return None, CATEGORY_TISSUE
    if key in _LATERAL_CODES:
        return _LATERAL_CODES[key], CATEGORY_ANATOMY
    for candidate in (
        key,
        key[:-1] if key.endswith("s") else key,
        key.removeprefix("right ").removeprefix("left "),
    ):
        keyword = _SYNONYMS.get(candidate) or "".join(w.capitalize() for w in candidate.split())
        code = _sct_keyword(keyword) if keyword.isalnum() else None
        if code is not None:
            category = (
                CATEGORY_ABNORMAL
                if keyword in _ABNORMAL
                else (CATEGORY_TISSUE if keyword in _TISSUE else CATEGORY_ANATOMY)
            )
            return code, category
    return None, CATEGORY_TISSUE


def review_status(instances: list[dict[str, Any]], value: int) -> str:
    """ "reviewed" when every instance of the label has a reviewer, "partly reviewed", else "unreviewed"."""
    mine = [r for r in instances if int(r.get("label", -1)) == value]
    reviewed = sum(1 for r in mine if r.get("reviewer"))
    if mine and reviewed == len(mine):
        return "reviewed"
    return "partly reviewed" if reviewed else "unreviewed"


def describe_labels(
    values: list[int],
    *,
    names: Mapping[int, str | dict[str, Any]] | None = None,
    instances: list[dict[str, Any]] | None = None,
) -> list[LabelMeaning]:
    """The meaning of each label value. ``names`` gives a name, or a spec {"name", "code", "meaning", "rgb"}
    (a label table's entry, pipeline/io/label_table.py); names default to "label <v>", codes to the name's
    SNOMED CT code when one is known, colours to :func:`label_colour`."""
    names = names or {}
    out = []
    for value in sorted(int(v) for v in values):
        given = names.get(value)
        spec = given if isinstance(given, dict) else {"name": given} if given else {}
        name = str(spec.get("name") or f"label {value}")
        code, category = snomed_code(name)
        if spec.get("code"):
            code = (str(spec["code"]), str(spec.get("meaning") or name))
            category = category if category != CATEGORY_TISSUE else CATEGORY_ANATOMY
        rgb = (
            cast(tuple[int, int, int], tuple(int(c) for c in spec["rgb"]))
            if spec.get("rgb")
            else label_colour(value)
        )
        out.append(LabelMeaning(value, name, code, category, rgb, review_status(instances or [], value)))
    return out


def spec_of(meaning: LabelMeaning) -> dict[str, Any]:
    """A label's meaning as a spec that :func:`describe_labels` takes back (to re-commit a case unchanged)."""
    spec: dict[str, Any] = {"name": meaning.name, "rgb": list(meaning.rgb)}
    if meaning.code is not None:
        spec.update(code=meaning.code[0], meaning=meaning.code[1])
    return spec


def meanings_from_properties(properties: list[dict[str, Any]]) -> dict[int, LabelMeaning]:
    """Rebuild the meanings from the store's ``image-label.properties`` (codes re-derived if absent)."""
    out = {}
    for entry in properties:
        value = int(entry["label-value"])
        name = str(entry.get("name") or f"label {value}")
        derived, category = snomed_code(name)
        code = (
            (entry["snomed-ct-code"], entry.get("snomed-ct-meaning", name))
            if "snomed-ct-code" in entry
            else derived
        )
        rgb = (
            cast(tuple[int, int, int], tuple(int(c) for c in entry["rgb"][:3]))
            if entry.get("rgb")
            else label_colour(value)
        )
        out[value] = LabelMeaning(
            value, name, code, category, rgb, str(entry.get("review-status", "unreviewed"))
        )
    return out
