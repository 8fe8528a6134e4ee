"""The FORMATS table (format name -> exporter) and :func:`export_store`, which runs one of them.

``out_dir`` may be a local folder or an fsspec URL (``s3://bucket/prefix``): files are then written and
checked locally first and uploaded once complete, cases.csv with them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from medsam_engine.pipeline.export.coco import export_coco
from medsam_engine.pipeline.export.common import ExportCheckError, ExportReport, per_case
from medsam_engine.pipeline.export.dicom_seg import write_case_seg
from medsam_engine.pipeline.export.nifti import write_case_nifti
from medsam_engine.pipeline.export.nnunet import export_nnunet
from medsam_engine.pipeline.export.seg_nrrd import write_case_seg_nrrd
from medsam_engine.pipeline.store.case_store import CaseStore

FORMATS: dict[str, Callable[..., ExportReport]] = {
    "nifti": per_case(write_case_nifti),
    "dicom-seg": per_case(write_case_seg),
    "nnunet": export_nnunet,
    "coco": export_coco,
    "seg-nrrd": per_case(write_case_seg_nrrd),
}


def export_store(store: CaseStore, fmt: str, out_dir: str | Path, **options) -> ExportReport:
    """Export every committed case of ``store`` in format ``fmt`` (one of FORMATS) to ``out_dir``;
    ``options`` go to the format's exporter (every format: ``name_by`` "id" or "input"; nnunet:
    ``dataset_id``, ``dataset_name``)."""
    import fsspec

    if fmt not in FORMATS:
        raise ValueError(f"Argument 'fmt' must be one of {tuple(FORMATS)}; got {fmt!r}.")
    exporter = FORMATS[fmt]
    fs, remote_path = fsspec.core.url_to_fs(str(out_dir))
    if "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = exporter(store, out, **options)
        report.format = fmt
        return report
    with tempfile.TemporaryDirectory(prefix="medsam-export-") as tmp:
        report = exporter(store, Path(tmp), **options)
        local = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        for path in local:
            target = f"{remote_path}/{path.relative_to(tmp).as_posix()}"
            fs.put_file(str(path), target)
            if fs.size(target) != path.stat().st_size:
                raise ExportCheckError(f"{target}: the uploaded object differs in size from the checked file")
        prefix = str(out_dir).rstrip("/")
        report.written = [f"{prefix}/{Path(p).relative_to(tmp).as_posix()}" for p in report.written]
        if report.cases_csv is not None:
            report.cases_csv = f"{prefix}/{Path(report.cases_csv).relative_to(tmp).as_posix()}"
    report.format = fmt
    return report
