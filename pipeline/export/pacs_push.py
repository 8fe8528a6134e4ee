"""`--push-seg URL`: each committed proposal stored in the PACS as a DICOM SEG (STOW-RS), once per version.

A case is pushed when its committed version (its signature) has not been pushed to that service before
(``STORE/_pushed/<case_id>.json``), so a rerun pushes what a killed or failed run left, and a new model's
proposals go out as new SEG instances. Cases whose input is not a DICOM series, or whose SEG cannot be
written, are reported as skipped with the reason; a PACS that refuses or stays unreachable fails the push of
that case with the reason (the case itself stays committed).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from medsam_engine.pipeline.core.errors import CaseError
from medsam_engine.pipeline.core.provenance import utc_stamp
from medsam_engine.pipeline.export.common import ExportCheckError
from medsam_engine.pipeline.export.dicom_seg import write_case_seg
from medsam_engine.pipeline.io.dicomweb import stow
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.records import PUSHED, read_record, write_record


@dataclass
class PushReport:
    pushed: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # case id -> why no SEG can be made
    failed: dict[str, str] = field(default_factory=dict)  # case id -> why the PACS did not take it

    def counts(self) -> dict[str, int]:
        """How many cases were pushed, already there, without a DICOM source, refused (no ids, no reasons)."""
        return {
            "pushed": len(self.pushed),
            "already": len(self.already),
            "no_dicom_source": len(self.skipped),
            "failed": len(self.failed),
        }


def push_segs(store: CaseStore, case_ids: list[str], url: str) -> PushReport:
    """Push the committed ``case_ids`` to the DICOMweb service at ``url`` as DICOM SEG (see the module
    doc)."""
    report = PushReport()
    for case_id in case_ids:
        attrs = store.attributes(case_id)
        if attrs is None:
            continue
        done = read_record(store, PUSHED, f"{case_id}.json") or {}
        if done.get("signature") == attrs.signature and done.get("service") == url:
            report.already.append(case_id)
            continue
        with tempfile.TemporaryDirectory(prefix="medsam-push-") as folder:
            try:
                seg = write_case_seg(store, case_id, Path(folder))
            except CaseError as exc:
                report.skipped[case_id] = exc.reason
                continue
            except ExportCheckError as exc:  # a writer bug fails this case's push, not the night
                report.failed[case_id] = str(exc)
                continue
            try:
                stow(url, [seg])
            except CaseError as exc:
                report.failed[case_id] = exc.reason
                continue
        write_record(
            store,
            {"case_id": case_id, "signature": attrs.signature, "service": url, "pushed_at": utc_stamp()},
            PUSHED,
            f"{case_id}.json",
        )
        report.pushed.append(case_id)
    return report
