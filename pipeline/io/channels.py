"""nnU-Net's multi-channel cases: the files ``CASE_0000``, ``CASE_0001``, ... of one folder are the channels
of one case (MR T1/T2/FLAIR, CT + PET), and ``CASE.nii.gz`` is its label map (a prediction).

Discovery makes them one case (:func:`channel_cases`) where the layout shows it is nnU-Net's: a coarse-mask
folder holds ``CASE.*`` (and not ``CASE_0000.*``), or a ``dataset.json`` in the images' folder or the one
above lists the channels (``channel_names`` in nnU-Net v2, ``modality`` in v1). Otherwise numbered files stay
cases of their own: ``frame_0000.png``, ``frame_0001.png``, ... may be a sequence, not channels. A case whose
channel numbers have a gap, or that has another number of channels than dataset.json lists, fails with the
files it has.

MedSAM segments one grey image, so one channel is prompted and segmented (:func:`select_channel`: the
configuration's ``input.channel``, a number or a name; default 0); the reader checks that every other channel
lies on the same grid (pipeline/io/readers.py) and the case's manifest lists all of them. The case id and the
input hash cover every channel, whichever is segmented.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.formats import VOLUMES, format_of, stem_of

CHANNEL_STEM = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
DATASET_JSON = "dataset.json"


def channel_of(path: str | Path) -> tuple[str, int] | None:
    """(case name, channel number) of a file named as nnU-Net names image channels (``brain_7_0001.nii.gz``
    -> ``("brain_7", 1)``); None for any other name."""
    match = CHANNEL_STEM.match(stem_of(path))
    return (match["case"], int(match["channel"])) if match else None


def channel_names_in(dataset: Any) -> tuple[str, ...]:
    """The channel names of a parsed dataset.json (v2 ``channel_names``, v1 ``modality``: ``{"0": "T1", "1":
    "T2"}``), channel 0 first; () when it lists none or its numbers are not 0, 1, ... in full."""
    if not isinstance(dataset, dict):
        return ()
    listed = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(listed, dict) or not listed:
        return ()
    try:
        numbered = {int(str(key)): str(name) for key, name in listed.items()}
    except ValueError:
        return ()
    if sorted(numbered) != list(range(len(numbered))):
        return ()
    return tuple(numbered[k] for k in range(len(numbered)))


def dataset_channel_names(folder: Path) -> tuple[str, ...] | None:
    """The channel names a dataset.json in ``folder`` or its parent lists (nnU-Net's raw layout keeps it
    beside imagesTr/imagesTs); None when there is none that lists channels."""
    for place in (folder, folder.parent):
        path = place / DATASET_JSON
        if path.is_file():
            try:
                names = channel_names_in(json.loads(path.read_text(encoding="utf-8-sig")))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if names:
                return names
    return None


def channels_digest(digests: list[str]) -> str:
    """One sha256 for a multi-channel case from its channel files' sha256, channel 0 first."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _groups(cases: list[tuple[int, CaseRef]]) -> dict[tuple[str, str, str], dict[int, int]]:
    """Readable image-file cases named like nnU-Net channels, grouped by (folder, case name, format):
    channel number -> position in ``cases``."""
    groups: dict[tuple[str, str, str], dict[int, int]] = {}
    for position, (_, case) in enumerate(cases):
        fmt = format_of(case.image)
        named = channel_of(case.image)
        if case.error or case.files or fmt not in VOLUMES or named is None:
            continue
        key = (str(Path(case.image).parent.resolve()), named[0], fmt.name if fmt else "")
        groups.setdefault(key, {}).setdefault(named[1], position)
    return groups


def _problem(name: str, numbers: list[int], names: tuple[str, ...] | None) -> str | None:
    """Why channels ``numbers`` of case ``name`` are no nnU-Net case, or None."""
    held = ", ".join(f"{name}_{n:04d}" for n in numbers)
    if names and len(names) != len(numbers):
        listed = ", ".join(names)
        return (
            f"nnU-Net case {name}: dataset.json lists {len(names)} channels ({listed}), "
            f"the folder holds {held}"
        )
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        return f"nnU-Net case {name}: channel {missing[0]:04d} is missing (the folder holds {held})"
    return None


def channel_cases(
    cases: list[tuple[int, CaseRef]],
    case_id: Callable[[str], str],
    *,
    mask_stems: Collection[str] | None = None,
) -> list[tuple[int, CaseRef]]:
    """``cases`` (each with the index of the input it came from) with every nnU-Net case's channel files made
    one case (see the module doc): the case id is a keyed hash of its channels' ids, ``image`` channel 0,
    ``channels`` all of them; its input index is the smallest of its files'. ``mask_stems`` are the stems of
    a coarse-mask folder's files (None without one)."""
    merged: dict[int, tuple[int, CaseRef] | None] = {}
    for (folder, name, _), numbered in _groups(cases).items():
        names = dataset_channel_names(Path(folder))
        paired = mask_stems is not None and name in mask_stems and f"{name}_0000" not in mask_stems
        if names is None and not paired:
            continue
        numbers = sorted(numbered)
        members = [cases[numbered[n]] for n in numbers]
        index = min(i for i, _ in members)
        first = members[0][1]
        problem = _problem(name, numbers, names)
        if problem is not None:
            identity = "unreadable:nnunet:" + "|".join(case.case_id for _, case in members)
            case = replace(first, case_id=case_id(identity), kind="unreadable", error=problem)
        else:
            case = _one_case(first, [c for _, c in members], case_id, names or ())
        merged.update({numbered[n]: None for n in numbers})
        merged[numbered[numbers[0]]] = (index, case)
    kept = [merged.get(position, item) for position, item in enumerate(cases)]
    return [item for item in kept if item is not None]


def _one_case(
    first: CaseRef, members: list[CaseRef], case_id: Callable[[str], str], names: tuple[str, ...]
) -> CaseRef:
    """The channel files ``members`` (channel 0 first) as one case; one channel keeps its file's case id."""
    channels = tuple(c.image for c in members)
    if len(members) == 1:
        return replace(first, channels=channels, channel_names=names)
    digests = [c.content_sha256 for c in members]
    return replace(
        first,
        case_id=case_id("nnunet-channels:" + "|".join(c.case_id for c in members)),
        channels=channels,
        channel_names=names,
        content_sha256=channels_digest([d for d in digests if d]) if all(digests) else None,
        cached_from=tuple(dict.fromkeys(p for c in members for p in c.cached_from)),
    )


def channel_index(channel: int | str, names: Mapping[int, str], *, where: str) -> int:
    """The number of ``channel`` (a number, or a name among ``names``, ignoring case); ReadError naming
    ``where`` when a name is unknown."""
    if isinstance(channel, int):
        return channel
    found = [k for k, name in names.items() if name.lower() == channel.lower()]
    if found:
        return found[0]
    if not names:
        raise ReadError(
            f"{where}: channel '{channel}' is a name, but its channels have none (put nnU-Net's dataset.json "
            "beside the images' folder, give it with --labels, or give the channel's number)"
        )
    listed = ", ".join(f"{k} {name}" for k, name in sorted(names.items()))
    raise ReadError(f"{where}: no channel is named '{channel}' (channels: {listed})")


def select_channel(case: CaseRef, channel: int | str, names: Mapping[int, str] | None = None) -> CaseRef:
    """The case reading channel ``channel`` (its number or name; ``names``, else the case's own channel
    names, name the channels, and become its ``channel_names``); ReadError naming the case when it has no
    such channel. A case that is no multi-channel case is its own channel 0."""
    where = Path(case.image).name
    known = dict(names) if names else dict(enumerate(case.channel_names))
    index = channel_index(channel, known, where=where)
    count = len(case.channels) or 1
    if not 0 <= index < count:
        held = ", ".join(Path(c).name for c in case.channels) if case.channels else where
        raise ReadError(
            f"{where}: channel {index} was asked for (input.channel, --channel) but the case has "
            f"{count} channel{'s' if count > 1 else ''} ({held})"
        )
    if not case.channels:
        return case
    named = tuple(known.get(k, "") for k in range(count)) if known else ()
    return replace(case, image=case.channels[index], channel=index, channel_names=named)
