"""A walker over the first bytes of a DICOM Part 10 file: the top-level elements of an explicit VR little
endian data set (the uncompressed default and every encapsulated syntax) up to (0028,0011), sequences skipped,
and the raw values of the tags series grouping needs. It declines (None, or :class:`Decline`) whatever is not
plain, and the caller (pipeline/io/dicom_scan.py) leaves that file to pydicom. Reads bytes only: no pydicom.
"""

from __future__ import annotations

FAST_BYTES = 1 << 16
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ENCAPSULATED_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")  # JPEG family, JPEG-LS/2000, RLE
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF
FAST_TAGS = {
    0x00080008: "ImageType",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000E: "SeriesInstanceUID",
    0x00200032: "ImagePositionPatient",
    0x00200037: "ImageOrientationPatient",
    0x00280008: "NumberOfFrames",
    0x00280010: "Rows",
    0x00280011: "Columns",
}
LAST_FAST_TAG = 0x00280011
FAST_MULTI_VALUED = {"ImageType", "ImagePositionPatient", "ImageOrientationPatient"}


class Decline(Exception):
    """The walker leaves this file to pydicom."""


def _element(data: bytes, at: int) -> tuple[int, bytes, int, int]:
    """(tag, VR, value offset, value length) of the explicit-VR little-endian element at ``at``."""
    if at + 8 > len(data):
        raise Decline
    tag = int.from_bytes(data[at : at + 2], "little") << 16 | int.from_bytes(data[at + 2 : at + 4], "little")
    if tag >> 16 == 0xFFFE:  # an item or delimiter where an element belongs
        return tag, b"", at + 8, int.from_bytes(data[at + 4 : at + 8], "little")
    vr = data[at + 4 : at + 6]
    if vr in LONG_VRS:
        if at + 12 > len(data):
            raise Decline
        return tag, vr, at + 12, int.from_bytes(data[at + 8 : at + 12], "little")
    if not (vr.isalpha() and vr.isupper()):
        raise Decline  # not explicit VR after all
    return tag, vr, at + 8, int.from_bytes(data[at + 6 : at + 8], "little")


def _skip_sequence(data: bytes, at: int) -> int:
    """The offset after a sequence of undefined length whose items start at ``at``."""
    while True:
        tag, _, start, length = _element(data, at)
        if tag == 0xFFFEE0DD:  # sequence delimiter
            return start
        if tag != 0xFFFEE000:
            raise Decline
        at = start + length if length != UNDEFINED else _skip_item(data, start)


def _skip_item(data: bytes, at: int) -> int:
    """The offset after an item of undefined length whose elements start at ``at``."""
    while True:
        tag, vr, start, length = _element(data, at)
        if tag == 0xFFFEE00D:  # item delimiter
            return start
        if length == UNDEFINED:
            if vr != b"SQ":
                raise Decline  # undefined length outside a sequence (UN holding implicit VR, say)
            at = _skip_sequence(data, start)
        else:
            at = start + length


def text_value(raw: bytes) -> str:
    try:
        return raw.decode("ascii").rstrip("\x00 ").lstrip(" ")
    except UnicodeDecodeError:
        raise Decline from None


def part10_values(data: bytes) -> tuple[str, dict[str, bytes]] | None:
    """(the meta's Media Storage SOP Class, {keyword: raw value}) of the tags grouping needs, or None."""
    if data[128:132] != b"DICM":
        return None
    at, meta_class, syntax = 132, "", ""
    while at + 8 <= len(data) and data[at : at + 2] == b"\x02\x00":  # group 0002, always explicit VR LE
        tag, _, start, length = _element(data, at)
        if length == UNDEFINED:
            return None
        if tag == 0x00020002:
            meta_class = text_value(data[start : start + length])
        elif tag == 0x00020010:
            syntax = text_value(data[start : start + length])
        at = start + length
    if syntax != EXPLICIT_LE and not syntax.startswith(ENCAPSULATED_PREFIXES):
        return None
    values: dict[str, bytes] = {}
    previous = 0
    while at < len(data):
        tag, vr, start, length = _element(data, at)
        if tag >> 16 == 0xFFFE or tag <= previous:
            return None  # an item or delimiter at the top level, or elements out of order: pydicom reads all
        previous = tag
        if tag > LAST_FAST_TAG:
            return meta_class, values
        if length == UNDEFINED:
            if vr != b"SQ":
                return None
            at = _skip_sequence(data, start)
            continue
        if tag in FAST_TAGS:
            if start + length > len(data):
                return None
            values[FAST_TAGS[tag]] = data[start : start + length]
        at = start + length
    return None  # the header ends, or runs past what was read, before (0028,0011): pydicom reads it
