"""Marks read from the PACS: GSPS and TID 1500 SR objects written with highdicom on the real chest CT (a DICOM
series in a real Orthanc, authentication on), listed by QIDO-RS, fetched by WADO-RS and annotated with
``--detector marks --detector-option marks=pacs`` (the box-fill runner in the model's place). A fault proxy
between the engine and Orthanc logs every request, so the tests see what was fetched."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import complete_dicom_headers, write_ct_series
from faults import FaultProxy
from marks_making import write_gsps, write_sr
from orthanc import MISSING, ORTHANC, PASSWORD, PLUGIN, USER, running_orthanc

from medsam_engine.detectors.evaluation import recist_axes
from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.geometry import align_to
from medsam_engine.pipeline.io.dicomweb import stow
from medsam_engine.pipeline.io.pacs_marks import MARKS, studies_with_marks, study_marks
from medsam_engine.pipeline.io.readers import read_volume
from medsam_engine.pipeline.store.case_store import CaseStore

pytestmark = pytest.mark.skipif(ORTHANC is None or PLUGIN is None, reason=MISSING)

UID = "1.2.826.0.1.3680043.8.498.76"
STUDY, NO_MARKS, MARKS_ONLY = f"{UID}00", f"{UID}10", f"{UID}20"
SERIES = (f"{UID}01", f"{UID}02", f"{UID}11", f"{UID}21")  # A1, A2 (study A), B1, C1 (never stored)
FRAME = f"{UID}09"
RIGHT_LUNG, LEFT_LUNG = 5, 6
MARK_TEXT = "Doe^Jane lesion 7"  # a mark's text: it must reach no log, record or message


def _series(root: Path, volume, series: str, study: str) -> list[pydicom.Dataset]:
    """The chest CT written as a DICOM series of ``study`` (with a Frame of Reference, a patient's name),
    its datasets by slice (write_ct_series keeps the canonical grid: column = x, row = y, file z + 1)."""
    write_ct_series(volume, root / series, series_uid=series)
    complete_dicom_headers(root / series, frame_of_reference_uid=FRAME)
    images = {}
    for path in sorted((root / series).iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.PatientName, ds.PatientID = study, "Doe^Jane", "PID-123"
        ds.save_as(path, enforce_file_format=True)
        images[int(str(ds.SOPInstanceUID).rpartition(".")[2]) - 1] = ds
    return [images[z] for z in sorted(images)]


def _axes(labels: np.ndarray, label: int, spacing) -> tuple[int, np.ndarray, np.ndarray]:
    mask = labels == label
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    long, short = recist_axes(mask[z], spacing[1:])
    return z, long, short


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, chest_volume, small_chest):
    """Orthanc with study A (CT series A1 and A2 on one Frame of Reference; on A1 a GSPS cross on the left
    lung with a text, a TID 1500 SR cross on the right lung, a TID 1500 SR whose measurements were taken out,
    and a report of another template), study B (CT only) and study C (a GSPS, no images)."""
    root = tmp_path_factory.mktemp("pacs_marks")
    labels = align_to(read_volume(small_chest[1]), chest_volume, what="reference")
    a1 = _series(root, chest_volume, SERIES[0], STUDY)
    a2 = _series(root, chest_volume, SERIES[1], STUDY)
    b1 = _series(root, chest_volume, SERIES[2], NO_MARKS)
    c1 = _series(root, chest_volume, SERIES[3], MARKS_ONLY)
    z, long, short = _axes(labels, LEFT_LUNG, chest_volume.spacing)
    rz, rlong, rshort = _axes(labels, RIGHT_LUNG, chest_volume.spacing)
    marks = root / "marks"
    marks.mkdir()
    gsps = write_gsps(
        marks / "pr.dcm",
        a1,
        [
            {
                "image": a1[z],
                "layer": "RECIST",
                "objects": [("POLYLINE", long, None), ("POLYLINE", short, None)],
            },
            {"image": a1[z], "layer": "RECIST", "arrows": [tuple(long.mean(axis=0))]},
        ],
    )
    state = pydicom.dcmread(gsps)
    state.GraphicAnnotationSequence[1].TextObjectSequence[0].UnformattedTextValue = MARK_TEXT
    state.save_as(gsps)
    report = write_sr(marks / "sr.dcm", a1, [{"image": a1[rz], "long": rlong, "short": rshort}])
    empty = pydicom.dcmread(write_sr(marks / "empty.dcm", a1, [{"image": a1[z], "long": long}]))
    empty.ContentSequence = [i for i in empty.ContentSequence if i.ValueType != "CONTAINER"]
    empty.save_as(marks / "empty.dcm")
    other = pydicom.dcmread(write_sr(marks / "other.dcm", a1, [{"image": a1[z], "long": long + 1}]))
    other.ContentTemplateSequence[0].TemplateIdentifier = "2000"  # a report of another template
    other.ConceptNameCodeSequence[0].CodeValue = "18748-4"
    other.ConceptNameCodeSequence[0].CodingSchemeDesignator = "LN"
    other.save_as(marks / "other.dcm")
    only = write_gsps(
        marks / "only.dcm", c1, [{"image": c1[z], "layer": "L", "objects": [("POLYLINE", long, None)]}]
    )
    with running_orthanc(root) as url, pytest.MonkeyPatch.context() as env:
        env.setenv("MEDSAM_ENGINE_DICOMWEB_BACKOFF_S", "0.05")
        env.setenv("MEDSAM_ENGINE_DICOMWEB_USER", USER)
        env.setenv("MEDSAM_ENGINE_DICOMWEB_PASSWORD", PASSWORD)
        files = [p for s in SERIES[:3] for p in sorted((root / s).iterdir())]
        stow(f"{url}/dicom-web", [*files, gsps, report, marks / "empty.dcm", marks / "other.dcm", only])
        yield {
            "url": url,
            "root": f"{url}/dicom-web",
            "key_slices": {LEFT_LUNG: z, RIGHT_LUNG: rz},
            "sops": {
                "gsps": str(state.SOPInstanceUID),
                "sr": str(pydicom.dcmread(report).SOPInstanceUID),
                "empty": str(empty.SOPInstanceUID),
                "other": str(other.SOPInstanceUID),
            },
            "images": {"a1": a1, "a2": a2, "b1": b1},
        }


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_PASSWORD", PASSWORD)
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_BACKOFF_S", "0.05")


def _wado(proxy: FaultProxy, part: str = "") -> list[str]:
    """The retrievals (WADO-RS: instances, series, metadata; not QIDO-RS queries) the proxy passed on."""
    paths = [path for method, path, _ in proxy.log if method == "GET" and part in path]
    return [p for p in paths if "?" not in p and ("/instances/" in p or p.endswith(("/metadata", *SERIES)))]


def _annotate(inputs: list[str], store: Path, box_fill: Path, *extra: str) -> int:
    args = ["annotate", *inputs, "--out", str(store), "--detector", "marks", "--config", str(box_fill)]
    return main([*args, "--detector-option", "marks=pacs", *extra])


def test_a_study_lists_its_gsps_and_measurement_reports_only(pacs, tmp_path):
    urls = study_marks(pacs["root"], STUDY, key=lambda text: f"k{abs(hash(text))}", cache=tmp_path)
    sops = {url.partition("#")[0].rpartition("/")[2] for url in urls}
    assert sops == {pacs["sops"][k] for k in ("gsps", "sr", "empty")}  # not the report of another template
    assert all("#k" in url for url in urls)
    assert len(list((tmp_path / MARKS).glob("*.other"))) == 1  # remembered: its header is not asked again


def test_the_studies_with_marks_are_listed_under_the_query(pacs):
    assert set(studies_with_marks(pacs["root"])) == {STUDY, MARKS_ONLY}
    assert set(studies_with_marks(pacs["root"], {"ModalitiesInStudy": "CT"})) == {STUDY}


def test_a_study_is_annotated_from_its_marks_and_a_rerun_fetches_nothing_again(
    pacs, tmp_path, box_fill, capsys
):
    store = tmp_path / "store"
    with FaultProxy(pacs["url"]) as proxy:
        study, plain = (f"{proxy.url}/dicom-web/studies/{uid}" for uid in (STUDY, NO_MARKS))
        assert _annotate([study, plain], store, box_fill, "-vv") == 1  # the study without marks fails
        fetched = _wado(proxy)
        cases = CaseStore(store)
        by_series = {cases.manifest(c)["dicom"]["series_uid"]: c for c in cases.committed_cases()}
        assert set(by_series) == set(SERIES[:2])
        for series in SERIES[:2]:  # A2: the marks drawn on A1, placed through the Frame of Reference
            _, attrs = cases.read_labels(by_series[series])
            origins = [r["prompt_origin"] for r in attrs.instances]  # the cross, its arrow, the SR's cross
            assert [o["rule"] for o in origins].count("long+short axis") == 2
            assert len(origins) == 3
            assert {o["key_slice"] for o in origins} == set(pacs["key_slices"].values())
            assert {m["type"] for o in origins for m in o["marks"]} == {"GSPS", "SR"}
            (warning,) = [w for w in attrs.raw["prompt_warnings"] if "references nothing" in w]
            assert "structured report" in warning
        (error,) = cases.errors().values()
        assert "holds no GSPS presentation state or TID 1500 SR" in error["reason"]
        assert not any(pacs["sops"]["other"] in path for path in fetched)  # decided by its header alone
        assert not [p for p in fetched if p.endswith(f"/series/{NO_MARKS}")]

        proxy.log.clear()
        assert _annotate([study], store, box_fill) == 0  # committed with the same signature: skipped
        assert _wado(proxy) == []  # nothing fetched again: no mark, no header, no image
    printed = capsys.readouterr()
    text = printed.out + printed.err + "".join(str(e) for e in cases.errors().values())
    assert "DEBUG" in text
    assert "fetched" in text
    for secret in (STUDY, *SERIES[:2], *pacs["sops"].values(), "Doe^Jane", "PID-123", MARK_TEXT):
        assert secret not in text
    assert not any(
        secret in p.name for p in (store / "_cache").rglob("*") for secret in pacs["sops"].values()
    )


def test_marks_drawn_on_another_series_are_placed_through_its_headers_without_its_pixels(
    pacs, tmp_path, box_fill
):
    store = tmp_path / "store"
    with FaultProxy(pacs["url"]) as proxy:
        url = f"{proxy.url}/dicom-web/studies/{STUDY}/series/{SERIES[1]}"
        assert _annotate([url], store, box_fill) == 0
        on_a1 = _wado(proxy, SERIES[0])
    assert on_a1
    assert all(p.endswith("/metadata") or "/instances/" in p for p in on_a1)
    assert not any(p.endswith(f"/series/{SERIES[0]}") for p in on_a1)  # never A1's pixels
    (case_id,) = CaseStore(store).committed_cases()
    _, attrs = CaseStore(store).read_labels(case_id)
    assert {r["prompt_origin"]["key_slice"] for r in attrs.instances} == set(pacs["key_slices"].values())


def test_marks_from_the_pacs_need_a_dicomweb_input(tmp_path, box_fill, chest_volume):
    folder = tmp_path / "local"
    write_ct_series(chest_volume, folder, series_uid=f"{UID}31")
    assert _annotate([str(folder)], tmp_path / "store", box_fill) == 1
    (error,) = CaseStore(tmp_path / "store").errors().values()
    assert "not a DICOMweb study, series or service root" in error["reason"]


def test_the_http_libraries_log_no_uid_nor_query():
    """What dicomweb-client and urllib3 log once a session is made: warnings, without UIDs and queries."""
    from medsam_engine.pipeline.io.dicomweb import dicomweb_session

    dicomweb_session("http://127.0.0.1:1/dicom-web")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        url = f"/dicom-web/studies/{STUDY}/series?PatientName=Doe"
        logging.getLogger("urllib3.connectionpool").warning("Retrying after connection broken: %s", url)
        logging.getLogger("dicomweb_client.web").info("search for series of study %s", STUDY)
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert "Retrying" in text
    assert "/studies/<uid>/series?…" in text
    assert STUDY not in text
    assert "Doe" not in text
    assert "search for series" not in text


def test_studies_under_a_filter_are_all_listed_across_pages(pacs):
    """Orthanc answers a second page under a ModalitiesInStudy filter with nothing: the listing still holds
    every study."""
    from medsam_engine.pipeline.io.dicomweb import query_studies

    assert set(query_studies(pacs["root"], {"ModalitiesInStudy": "PR"}, page=1)) == {STUDY, MARKS_ONLY}
    assert set(query_studies(pacs["root"], {}, page=1)) == {STUDY, NO_MARKS, MARKS_ONLY}
