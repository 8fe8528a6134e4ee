"""Label tables: what each label value of the coarse masks means, from a file the user already has.

``--labels FILE`` takes:

* JSON: ``{"1": "liver", "2": {"name": "spleen", "code": "78961009", "colour": [157, 108, 162]}}`` or a list
  of ``{"value": 1, "name": ..., "code": ..., "meaning": ..., "colour": ...}``;
* CSV (header optional): ``value,name[,code][,colour]`` with the colour as ``#rrggbb`` or ``r g b``;
* a 3D Slicer colour table (``.ctbl`` / ``.txt``): ``value name r g b a`` lines, ``#`` comments;
* nnU-Net's ``dataset.json`` (its ``labels``, v1 or v2; the engine's own nnunet export writes one), whose
  ``channel_names`` also name the channels of multi-channel cases (:func:`read_channel_names`);
* dcmqi's segmentation metadata JSON (``segmentAttributes``: label IDs, names, SNOMED CT property types,
  display colours), as TotalSegmentator's DICOM SEG output and ``itkimage2segimage`` use;
* a NIfTI label map whose header carries its label table (TotalSegmentator's multilabel ``--ml`` output:
  pipeline/io/nifti_labels.py), names and colours.

``code`` is a SNOMED CT code (its meaning defaults to the name); without one, the code is looked up from the
name as for any label (pipeline/store/labels_meta.py). The result is ``{value: {"name", "code", "meaning",
"rgb"}}`` with absent keys left out, which the engine's configuration carries (``labels`` section).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from medsam_engine.pipeline.io.channels import channel_names_in
from medsam_engine.pipeline.io.nifti_labels import nifti_label_table

_HEX = re.compile(r"#?([0-9a-fA-F]{6})")


def _colour(value: Any, where: str) -> list[int] | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        match = _HEX.fullmatch(value.strip())
        parts = (
            [int(match.group(1)[i : i + 2], 16) for i in (0, 2, 4)]
            if match
            else value.replace(",", " ").split()
        )
    else:
        parts = list(value)
    try:
        rgb = [int(float(p)) for p in parts[:3]]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: colour {value!r} is not #rrggbb or three numbers") from exc
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"{where}: colour {value!r} must be three values in 0..255")
    return rgb


def _entry(
    value: Any, name: Any, code: Any = None, meaning: Any = None, colour: Any = None, *, where: str
) -> tuple[int, dict[str, Any]]:
    try:
        number = int(str(value).strip())
    except ValueError as exc:
        raise ValueError(f"{where}: label value {value!r} is not a whole number") from exc
    if not 1 <= number <= 65535:
        raise ValueError(f"{where}: label value {number} is outside 1..65535")
    name = str(name or "").strip()
    if not name:
        raise ValueError(f"{where}: label {number} has no name")
    entry: dict[str, Any] = {"name": name}
    if code not in (None, ""):
        entry["code"] = str(code).strip()
        entry["meaning"] = str(meaning).strip() if meaning else name
    rgb = _colour(colour, where)
    if rgb is not None:
        entry["rgb"] = rgb
    return number, entry


def _from_nnunet(labels: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    """nnU-Net's dataset.json ``labels``: v2 ``{"liver": 1}`` (region lists are not labels of a map), v1
    ``{"1": "liver"}``; the background (0) is left out."""
    table = {}
    for key, value in labels.items():
        if isinstance(value, str):  # v1: value -> name
            key, value = value, key
        if isinstance(value, list) or str(value).strip() == "0":
            continue
        number, entry = _entry(value, key, where=f"{name} labels")
        table[number] = entry
    return table


def _from_dcmqi(attributes: list[Any], name: str) -> dict[int, dict[str, Any]]:
    """dcmqi's segmentation metadata (``segmentAttributes``: lists of segments with labelID, SegmentLabel,
    SegmentedPropertyTypeCodeSequence and recommendedDisplayRGBValue)."""
    table = {}
    segments = [s for group in attributes for s in (group if isinstance(group, list) else [group])]
    for segment in segments:
        code = segment.get("SegmentedPropertyTypeCodeSequence") or {}
        sct = code.get("CodingSchemeDesignator") in ("SCT", "SRT")
        number, entry = _entry(
            segment.get("labelID"),
            segment.get("SegmentLabel") or segment.get("SegmentDescription") or code.get("CodeMeaning"),
            code.get("CodeValue") if sct else None,
            code.get("CodeMeaning") if sct else None,
            segment.get("recommendedDisplayRGBValue"),
            where=f"{name} segment {segment.get('labelID')}",
        )
        table[number] = entry
    return table


def _from_json(data: Any, name: str) -> dict[int, dict[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("labels"), dict):  # nnU-Net's dataset.json
        return _from_nnunet(data["labels"], name)
    if isinstance(data, dict) and isinstance(data.get("segmentAttributes"), list):  # dcmqi
        return _from_dcmqi(data["segmentAttributes"], name)
    items = data.items() if isinstance(data, dict) else ((d.get("value"), d) for d in data)
    table = {}
    for value, spec in items:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec or {})
        number, entry = _entry(
            value,
            spec.get("name"),
            spec.get("code"),
            spec.get("meaning"),
            spec.get("colour", spec.get("color", spec.get("rgb"))),
            where=name,
        )
        table[number] = entry
    return table


def _from_csv(text: str, name: str) -> dict[int, dict[str, Any]]:
    rows = list(csv.reader(line for line in text.splitlines() if line.strip() and not line.startswith("#")))
    if rows and not rows[0][0].strip().lstrip("-").isdigit():  # a header row
        header = [h.strip().lower() for h in rows[0]]
        columns: dict[str, int] = {
            key: header.index(key)
            for key in ("value", "name", "code", "meaning", "colour", "color")
            if key in header
        }
        rows = rows[1:]
    else:
        columns = {"value": 0, "name": 1, "code": 2, "colour": 3}
    if "value" not in columns or "name" not in columns:
        raise ValueError(f"{name}: a CSV label table needs 'value' and 'name' columns")

    def cell(row: list[str], key: str) -> str | None:
        index = columns.get(key)
        if index is None and key == "colour":
            index = columns.get("color")
        return row[index].strip() if index is not None and index < len(row) else None

    table = {}
    for k, row in enumerate(rows, start=2 if "value" in columns else 1):
        number, entry = _entry(
            cell(row, "value"),
            cell(row, "name"),
            cell(row, "code"),
            cell(row, "meaning"),
            cell(row, "colour"),
            where=f"{name} line {k}",
        )
        table[number] = entry
    return table


def _from_slicer(text: str, name: str) -> dict[int, dict[str, Any]]:
    table = {}
    for k, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 5:
            raise ValueError(f"{name} line {k}: a colour table line is 'value name r g b [a]'")
        if parts[0] == "0":  # the background
            continue
        number, entry = _entry(
            parts[0], parts[1].replace("_", " "), colour=parts[2:5], where=f"{name} line {k}"
        )
        table[number] = entry
    return table


def read_channel_names(path: str | Path) -> dict[int, str]:
    """Channel number -> name from a label table that is nnU-Net's dataset.json (``channel_names``, v1
    ``modality``); {} for any other table (pipeline/io/channels.py)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return {}
    try:
        names = channel_names_in(json.loads(path.read_text(encoding="utf-8-sig")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return dict(enumerate(names))


def read_label_table(path: str | Path) -> dict[int, dict[str, Any]]:
    """The label table in ``path`` (see the module doc); ValueError naming the file and line otherwise."""
    path = Path(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        table = nifti_label_table(path)
        if not table:
            raise ValueError(f"{path.name}: the NIfTI file's header carries no label table")
        return table
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path.name}: cannot read the label table ({exc})") from exc
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            table = _from_json(json.loads(text), path.name)
        except (json.JSONDecodeError, AttributeError, TypeError) as exc:
            raise ValueError(f"{path.name}: not a JSON label table ({exc})") from exc
    elif suffix == ".csv":
        table = _from_csv(text, path.name)
    else:  # .ctbl, .txt: a Slicer colour table (the background line 0 is skipped)
        table = _from_slicer(text, path.name)
    if not table:
        raise ValueError(f"{path.name}: the label table names no label")
    return table
