"""Label tables stored inside a NIfTI file: a header extension holding a Caret label table.

TotalSegmentator's multilabel output (``--ml``: one NIfTI whose integer values are the structures) names its
values this way, as Connectome Workbench's label volumes do: an extension (TotalSegmentator writes code 0,
Workbench 32) whose content is XML of the form

    <CaretExtension> ... <VolumeInformation> <LabelTable>
        <Label Key="1" Red="1.0" Green="0.0" Blue="0.0" Alpha="1"><![CDATA[spleen]]></Label> ...
    </LabelTable> ... </CaretExtension>

Colours are fractions in 0..1. Only the NIfTI header and its extensions are read, never the voxels.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_TABLE_BYTES = 8 << 20  # a label table of this size already names far more labels than a uint16 map holds


def _tables(path: Path) -> list[bytes]:
    """The contents of the file's header extensions that look like a Caret label table."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except nib.filebasedimages.ImageFileError as exc:
        raise ValueError(f"{path.name}: not a NIfTI file ({exc})") from exc
    extensions = getattr(image.header, "extensions", None) or []
    contents = [bytes(ext.get_content()) for ext in extensions]
    return [c for c in contents if b"LabelTable" in c and len(c) <= MAX_TABLE_BYTES]


def _rgb(label: ElementTree.Element) -> list[int] | None:
    try:
        fractions = [float(label.attrib[key]) for key in ("Red", "Green", "Blue")]
    except (KeyError, ValueError):
        return None
    if not all(0.0 <= f <= 1.0 for f in fractions):
        return None
    return [round(f * 255) for f in fractions]


def _parse(content: bytes) -> dict[int, dict[str, Any]]:
    """{value: {"name", "rgb"}} of one Caret label table (the background, key 0, left out)."""
    root = ElementTree.fromstring(content.rstrip(b"\0 \n\t\r"))
    table: dict[int, dict[str, Any]] = {}
    for label in root.iter("Label"):
        name = (label.text or "").strip()
        try:
            value = int(label.attrib.get("Key", ""))
        except ValueError:
            continue
        if not name or not 1 <= value <= 65535:
            continue
        entry: dict[str, Any] = {"name": name}
        rgb = _rgb(label)
        if rgb is not None:
            entry["rgb"] = rgb
        table[value] = entry
    return table


def nifti_label_table(path: str | Path) -> dict[int, dict[str, Any]]:
    """Label value -> ``{"name", "rgb"}`` from the NIfTI file's Caret label table (see the module doc); {}
    when it carries none. ValueError naming the file when it is no NIfTI file or its table is not well-formed
    XML; OSError when it cannot be read."""
    path = Path(path)
    table: dict[int, dict[str, Any]] = {}
    for content in _tables(path):
        try:
            table.update(_parse(content))
        except ElementTree.ParseError as exc:
            raise ValueError(f"{path.name}: its header's label table is not well-formed XML ({exc})") from exc
    return table


def nifti_label_names(path: str | Path) -> dict[int, str]:
    """Label value -> name from the NIfTI file's label table; {} when it has none or it cannot be read (the
    names are optional: reading the map itself reports a broken file, and a map without names still
    prompts)."""
    try:
        return {value: entry["name"] for value, entry in nifti_label_table(path).items()}
    except (OSError, ValueError) as exc:
        log.warning("a label map's header label table is unusable, its values stay unnamed: %s", exc)
        return {}
