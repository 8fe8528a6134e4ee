"""A case's signature: what its committed result depends on (input bytes, prompts, model, configuration,
package version). Same signature -> nothing to do; another -> refused unless overwriting."""

from __future__ import annotations

import hashlib
from pathlib import Path

from medsam_engine.detectors.marks_files import as_paths
from medsam_engine.pipeline.annotate.config import EngineConfig
from medsam_engine.pipeline.core.errors import ReadError, is_transient
from medsam_engine.pipeline.core.provenance import package_version
from medsam_engine.pipeline.core.types import CaseRef
from medsam_engine.pipeline.io.channels import select_channel
from medsam_engine.pipeline.io.discover import case_content_hash, content_hash
from medsam_engine.pipeline.io.pacs_marks import marks_digest
from medsam_engine.pipeline.store.case_store import CaseStore


def case_signature(case: CaseRef, config: EngineConfig, model_sha256: str) -> dict:
    """The signature dict stored in the case's attributes; raises OSError when an input cannot be read."""
    signature = {
        "input_sha256": case_content_hash(case),
        "prompt_sha256": content_hash(case.coarse_mask) if case.coarse_mask else None,
        "model_sha256": model_sha256,
        "config_hash": config.result_hash(),
        "package_version": package_version(),
    }
    channel = _channel(case, config)
    if channel:  # another channel of the same files: another result (channel 0 keeps earlier signatures)
        signature["channel"] = channel
    artefact = config.prompts.options.get("artefact") if config.prompts.detector == "learned" else None
    if artefact:
        signature["detector_sha256"] = content_hash(str(artefact))
    if config.prompts.detector == "marks":  # the marks are the prompts: other marks, another result
        options = config.prompts.options
        marks = (  # marks in the PACS by SOP instance (which never changes): known before they are fetched
            [marks_digest(case.marks)]
            if config.prompts.marks_from_pacs()
            else list(map(content_hash, as_paths(options["marks"])))
        )
        images = [content_hash(path) for path in as_paths(options.get("images", []))]
        signature["marks_sha256"] = hashlib.sha256("\n".join(marks + images).encode()).hexdigest()
    return signature


def _channel(case: CaseRef, config: EngineConfig) -> int | str:
    """The channel the case segments: its number, or the name as configured when it names no channel of the
    case (the driver then fails the case with the reason)."""
    try:
        return select_channel(case, config.input.channel, config.input.channel_names).channel
    except ReadError:
        return config.input.channel


def signature_or_read_error(case: CaseRef, config: EngineConfig, model_sha256: str) -> dict:
    """The case's signature; an input that cannot be read raises ReadError naming the file and why. Errors
    worth retrying (pipeline/annotate/policy.py) are re-raised as they are."""
    try:
        return case_signature(case, config, model_sha256)
    except OSError as exc:
        if is_transient(exc):
            raise
        name = Path(exc.filename or case.image).name
        raise ReadError(f"{name}: cannot be read ({exc.strerror or exc})") from exc


def signature_or_none(case: CaseRef, config: EngineConfig, model_sha256: str) -> dict | None:
    """The signature, or None when the inputs cannot be read (a quarantine record then holds no signature)."""
    try:
        return case_signature(case, config, model_sha256)
    except OSError:
        return None


def committed_with(store: CaseStore, case_id: str, signature: dict) -> bool:
    """Whether the case is committed with exactly this signature (then there is nothing to do)."""
    return signed_with(store.case_attrs(case_id), signature)


def signed_with(attrs: dict | None, signature: dict) -> bool:
    """Whether committed attributes (None: not committed) carry exactly this signature."""
    return attrs is not None and attrs.get("signature") == signature
