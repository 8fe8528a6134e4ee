"""Marks from a PACS: studies per second that the engine lists and fetches the marks of, against the
machine's raw QIDO-RS round-trip rate, in one run.

A local Orthanc (Debian orthanc + orthanc-dicomweb, started here on a loopback port, authentication on) is
loaded with ``--studies`` studies, each holding one small mark object and no images: alternately a GSPS (a
RECIST cross written with highdicom's ``hd.pr``) and a TID 1500 measurement report (``hd.sr``), copied per
study with new UIDs; and ``--with-images`` studies that also hold the 4-slice real chest CT (slicerio) as a
DICOM series. The engine's path, timed: `studies_with_marks` over the service root, then per study (on
``--workers`` threads, discovery's number of PACS queries at once) `study_marks` (QIDO-RS, and an SR's header)
and `fetch_marks` (WADO-RS of the PR/SR object only, as a case of the series the marks are drawn on fetches
them). "Raw QIDO" is one QIDO-RS request per study (its PR/SR instances) on one thread and one connection.
A second pass of the engine, with the marks kept in its cache, fetches nothing again.

    .venv/bin/python bench/pacs_marks.py [--studies 1000] [--with-images 5] [--workers 4]
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from marks_making import write_gsps, write_sr
from orthanc import PASSWORD, USER, running_orthanc


def _templates(root: Path):
    """A chest CT slice series (4 real slices, datasets), a GSPS and an SR on its second slice."""
    import pydicom
    import slicerio
    from conftest import complete_dicom_headers, write_ct_series

    from medsam_engine.pipeline.io.readers import read_volume

    data = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    files = write_ct_series(
        read_volume(data), root / "ct", series_uid="1.2.826.0.1.3680043.8.498.7900", slices=range(14, 18)
    )
    complete_dicom_headers(root / "ct", frame_of_reference_uid="1.2.826.0.1.3680043.8.498.7909")
    images = [pydicom.dcmread(f) for f in sorted(files)]
    cross = [np.array([[40.0, 50.0], [80.0, 70.0]]), np.array([[55.0, 75.0], [65.0, 45.0]])]
    gsps = write_gsps(
        root / "pr.dcm",
        images,
        [{"image": images[1], "layer": "RECIST", "objects": [("POLYLINE", c, None) for c in cross]}],
    )
    sr = write_sr(root / "sr.dcm", images, [{"image": images[1], "long": cross[0], "short": cross[1]}])
    return files, images, pydicom.dcmread(gsps), pydicom.dcmread(sr)


def _bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def load(url: str, studies: int, with_images: int, root: Path) -> tuple[list[str], str]:
    """Store the studies in Orthanc (REST, one instance a request); returns their UIDs and the series the
    marks are drawn on."""
    import pydicom
    import requests
    from pydicom.uid import generate_uid

    files, images, gsps, sr = _templates(root)
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    uids = []
    for n in range(studies + with_images):
        study = generate_uid()
        mark = copy.deepcopy(gsps if n % 2 == 0 else sr)
        mark.StudyInstanceUID, mark.SeriesInstanceUID = study, generate_uid()
        mark.SOPInstanceUID = mark.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        blobs = [_bytes(mark)]
        if n >= studies:  # a study with its images
            for path in files:
                image = pydicom.dcmread(path)
                image.StudyInstanceUID = study
                blobs.append(_bytes(image))
        for blob in blobs:
            session.post(f"{url}/instances", data=blob, timeout=30).raise_for_status()
        uids.append(study)
    return uids, str(images[0].SeriesInstanceUID)


def raw_qido(root: str, uids: list[str]) -> float:
    """QIDO-RS round trips per second: one request per study, one thread, one connection."""
    import requests

    session = requests.Session()
    session.auth = (USER, PASSWORD)
    headers = {"Accept": "application/dicom+json"}
    start = time.perf_counter()
    for uid in uids:
        session.get(
            f"{root}/studies/{uid}/instances", params={"Modality": "PR"}, headers=headers
        ).raise_for_status()
    return len(uids) / (time.perf_counter() - start)


def engine_pass(root: str, cache: Path, drawn_on: str, workers: int) -> tuple[float, int, int]:
    """(seconds, studies, mark files) of the engine listing the studies with marks and fetching them."""
    from medsam_engine.pipeline.io.pacs_marks import fetch_marks, studies_with_marks, study_marks
    from medsam_engine.pipeline.store.case_store import CaseStore

    key = CaseStore(cache.parent / "store").case_id

    def one(study: str) -> int:
        urls = study_marks(root, study, key=key, cache=cache)
        return len(fetch_marks(urls, cache, own_series=drawn_on))

    start = time.perf_counter()
    studies = list(studies_with_marks(root))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        files = sum(pool.map(one, studies))
    return time.perf_counter() - start, len(studies), files


def main() -> None:
    import os

    from medsam_engine.pipeline.io.discover import PACS_QUERIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000, help="studies with one mark object, no images")
    parser.add_argument("--with-images", type=int, default=5, help="studies with a mark and a CT series")
    parser.add_argument("--workers", type=int, default=PACS_QUERIES, help="studies handled at once")
    args = parser.parse_args()
    os.environ["MEDSAM_ENGINE_DICOMWEB_USER"], os.environ["MEDSAM_ENGINE_DICOMWEB_PASSWORD"] = USER, PASSWORD
    with tempfile.TemporaryDirectory() as tmp, running_orthanc(Path(tmp)) as url:
        root = f"{url}/dicom-web"
        start = time.perf_counter()
        uids, drawn_on = load(url, args.studies, args.with_images, Path(tmp))
        print(f"loaded {len(uids)} studies into Orthanc in {time.perf_counter() - start:.1f} s")
        qido = raw_qido(root, uids)
        cache = Path(tmp) / "cache"
        seconds, studies, files = engine_pass(root, cache, drawn_on, args.workers)
        assert studies == len(uids), (studies, files)
        assert files == len(uids), (studies, files)
        again, _, _ = engine_pass(root, cache, drawn_on, args.workers)
        rate = studies / seconds
        print(f"raw QIDO-RS: {qido:.0f} round trips/s (one thread)")
        print(
            f"engine: {studies} studies, {files} mark objects listed and fetched in {seconds:.1f} s: "
            f"{rate:.1f} studies/s on {args.workers} threads ({rate / qido:.2f} x the raw QIDO rate); "
            f"again with the marks cached: {studies / again:.1f} studies/s"
        )


if __name__ == "__main__":
    main()
