"""DICOMweb inputs against a real Orthanc (Debian packages orthanc + orthanc-dicomweb) on loopback."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import complete_dicom_headers, write_ct_series
from faults import FaultProxy
from orthanc import MISSING, ORTHANC, PASSWORD, PLUGIN, USER, free_port, running_orthanc

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.core.errors import ReadError, is_transient
from medsam_engine.pipeline.io.dicomweb import fetch_dicomweb
from medsam_engine.pipeline.io.discover import DiscoveryOptions, discover, materialise
from medsam_engine.pipeline.io.readers import read_case
from medsam_engine.pipeline.store.case_store import CaseStore

STUDY = "1.2.826.0.1.3680043.8.498.7100"
SERIES = tuple(f"1.2.826.0.1.3680043.8.498.710{k}" for k in (1, 2, 3))
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

pytestmark = pytest.mark.skipif(ORTHANC is None or PLUGIN is None, reason=MISSING)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, chest_volume):
    """A temporary Orthanc on a loopback port holding one study: two real CT series (one RLE) and a scout."""
    import requests
    from pydicom.uid import RLELossless

    root = tmp_path_factory.mktemp("orthanc")
    with running_orthanc(root) as url:
        files = write_ct_series(chest_volume, root / "a", series_uid=SERIES[0])
        complete_dicom_headers(root / "a", frame_of_reference_uid=STUDY + ".9")  # a scanner's full headers
        files += write_ct_series(chest_volume, root / "b", series_uid=SERIES[1], syntax=RLELossless)
        files += write_ct_series(
            chest_volume,
            root / "c",
            series_uid=SERIES[2],
            slices=[0],
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        )
        for path in files:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = STUDY
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            requests.post(
                url + "/instances", data=buffer.getvalue(), timeout=10, auth=(USER, PASSWORD)
            ).raise_for_status()
        yield url


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    """The engine's login to the test PACS, from the environment as in production."""
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_PASSWORD", PASSWORD)
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_BACKOFF_S", "0.05")


def test_study_url_gives_one_case_per_series_downloaded_by_whoever_annotates_it(
    orthanc, tmp_path, chest_volume
):
    store = CaseStore(tmp_path / "store")
    cases = discover([f"{orthanc}/dicom-web/studies/{STUDY}"], store.case_ids())
    assert [c.kind for c in cases] == ["dicomweb-series", "dicomweb-series"]  # the scout is dropped (QIDO-RS)
    assert not (store.root / "_cache").exists()  # discovery only asked: nothing downloaded yet
    local = [materialise(case, store.cache_dir()) for case in cases]
    for case in local:
        assert case.kind == "dicom-series"
        assert Path(case.image).is_relative_to(store.root / "_cache" / "dicomweb")
        assert not any(uid in case.image or any(uid in f for f in case.files) for uid in (STUDY, *SERIES))
        assert np.array_equal(read_case(case).array, chest_volume.array)
    syntaxes = {
        str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for case in local
        for f in case.files
    }
    assert RLE_LOSSLESS in syntaxes  # fetched as stored, decoded locally


def test_series_url_and_cache_reuse(orthanc, tmp_path, chest_volume):
    store = CaseStore(tmp_path / "store")
    url = f"{orthanc}/dicom-web/studies/{STUDY}/series/{SERIES[1]}"
    (case,) = discover([url], store.case_ids())
    assert case.image.endswith("#4")  # its number of instances: a series that grows is fetched again
    local = materialise(case, store.cache_dir())
    marker = Path(local.image).parent / ".complete"
    stamp = marker.stat().st_mtime_ns
    assert materialise(case, store.cache_dir()) == local
    assert marker.stat().st_mtime_ns == stamp
    assert np.array_equal(read_case(local).array, chest_volume.array)


def test_unknown_study_is_one_failing_case_without_uids(orthanc, tmp_path):
    missing = "1.2.826.0.1.3680043.8.498.7199"
    (case,) = discover([f"{orthanc}/dicom-web/studies/{missing}"], CaseStore(tmp_path / "store").case_ids())
    assert case.kind == "unreadable"
    assert missing not in case.error
    assert missing not in case.image
    with pytest.raises(ReadError, match=r"not found"):
        read_case(case)


def test_unreachable_server_is_a_failing_case(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_RETRIES", "1")  # one retry shows it as well as six
    url = f"http://127.0.0.1:{free_port()}/dicom-web/studies/1.2.3"
    (case,) = discover([url], CaseStore(tmp_path).case_ids())
    assert "could not be reached" in case.error


def test_a_wrong_password_is_one_clear_lasting_error_that_never_shows_the_password(
    orthanc, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_PASSWORD", "wrong-password")
    (case,) = discover([f"{orthanc}/dicom-web/studies/{STUDY}"], CaseStore(tmp_path / "store").case_ids())
    assert case.kind == "unreadable"
    assert "refused the credentials (HTTP 401)" in case.error
    assert not is_transient(ReadError(case.error))  # a wrong password is not retried run after run as busy
    assert "wrong-password" not in case.error
    assert "wrong-password" not in caplog.text


def test_a_busy_pacs_costs_retries_not_cases(orthanc, tmp_path, chest_volume, monkeypatch):
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_TIMEOUT_S", "1")
    with FaultProxy(orthanc) as proxy:
        # one 429 says when to come back (in a second); the others leave it to the backoff
        proxy.inject(1, path_part="/dicom-web/", status=429, headers={"Retry-After": "1"})
        proxy.inject(2, path_part="/dicom-web/", status=429)
        proxy.inject(2, path_part="/series/", status=503)
        proxy.inject(1, path_part="/series/", drop=True)
        proxy.inject(1, path_part="/series/", stall_s=2.5)  # longer than the 1 s read timeout
        store = CaseStore(tmp_path / "store")
        cases = [
            materialise(case, store.cache_dir())
            for case in discover([f"{proxy.url}/dicom-web/studies/{STUDY}"], store.case_ids())
        ]
        assert proxy.injected() == 7
    assert [c.kind for c in cases] == ["dicom-series", "dicom-series"]
    for case in cases:
        assert np.array_equal(read_case(case).array, chest_volume.array)


def test_a_pacs_down_for_the_whole_run_fails_its_cases_for_the_next_run(
    orthanc, tmp_path, chest_volume, monkeypatch, capsys, box_fill, quick_case_retries
):
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_RETRIES", "2")
    store = tmp_path / "store"
    with FaultProxy(orthanc) as proxy:
        url = f"{proxy.url}/dicom-web/studies/{STUDY}/series/{SERIES[0]}"
        argv = ["annotate", url, "--out", str(store), "--detector", "intensity", "--config", str(box_fill)]
        proxy.inject(-1, status=503)
        assert main(argv) == 1
        (error,) = CaseStore(store).errors().values()
        assert error["stage"] == "io"
        assert "HTTP 503" in error["reason"]
        assert SERIES[0] not in error["reason"]
        proxy.heal()
        assert main(argv) == 0
        assert "1 done" in capsys.readouterr().out
        assert CaseStore(store).errors() == {}
        assert not any((store / "_cache" / "dicomweb").iterdir())  # the download went with its commit
        proxy.inject(-1, status=503)  # down again, then back: the case is done, the old failure closed
        assert main(argv) == 1
        proxy.heal()
        assert main(argv) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert CaseStore(store).errors() == {}


def test_a_committed_series_is_skipped_without_downloading_it_again(
    orthanc, tmp_path, capsys, box_fill, monkeypatch
):
    import medsam_engine.pipeline.io.discover as discovery

    store = tmp_path / "store"
    url = f"{orthanc}/dicom-web/studies/{STUDY}/series/{SERIES[0]}"
    argv = ["annotate", url, "--out", str(store), "--detector", "intensity", "--config", str(box_fill)]
    assert main(argv) == 0
    assert "1 done" in capsys.readouterr().out
    assert not any((store / "_cache" / "dicomweb").iterdir())  # the download went with its commit ...
    assert len(list((store / "_cache" / "digests").iterdir())) == 1  # ... its content hash stayed

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(discovery, "fetch_dicomweb", no_download)
    assert main(argv) == 0
    assert "1 skipped" in capsys.readouterr().out


def test_a_service_root_means_its_studies_filtered_by_the_query(
    orthanc, tmp_path, chest_volume, capsys, box_fill
):
    store = CaseStore(tmp_path / "store")
    root = f"{orthanc}/dicom-web"
    cases = discover(
        [root], store.case_ids(), options=DiscoveryOptions(pacs_query={"ModalitiesInStudy": "CT"})
    )
    assert [c.kind for c in cases] == ["dicomweb-series", "dicomweb-series"]
    assert np.array_equal(read_case(materialise(cases[0], store.cache_dir())).array, chest_volume.array)
    (none,) = discover(
        [root], store.case_ids(), options=DiscoveryOptions(pacs_query={"ModalitiesInStudy": "MR"})
    )
    assert none.kind == "unreadable"
    assert "no study matches" in none.error
    assert "MR" not in none.error
    assert (
        main(
            [
                "annotate",
                root,
                "--pacs-query",
                "ModalitiesInStudy=CT",
                "--out",
                str(tmp_path / "s"),
                "--detector",
                "intensity",
                "--config",
                str(box_fill),
            ]
        )
        == 0
    )
    assert "2 done" in capsys.readouterr().out
    assert main(["annotate", root, "--pacs-query", "ModalitiesInStudy", "--out", str(tmp_path / "s")]) == 2


def test_push_seg_stores_each_proposal_in_the_pacs_once_per_version(orthanc, tmp_path, capsys, box_fill):
    import requests

    url = f"{orthanc}/dicom-web/studies/{STUDY}/series/{SERIES[0]}"
    store = tmp_path / "store"
    argv = [
        "annotate",
        url,
        "--out",
        str(store),
        "--detector",
        "intensity",
        "--push-seg",
        f"{orthanc}/dicom-web",
        "--config",
        str(box_fill),
    ]
    assert main(argv) == 0
    assert "SEG: 1 pushed" in capsys.readouterr().out
    auth = (USER, PASSWORD)
    found = requests.get(
        f"{orthanc}/dicom-web/studies/{STUDY}/series",
        params={"Modality": "SEG"},
        auth=auth,
        headers={"Accept": "application/dicom+json"},
        timeout=10,
    ).json()
    assert len(found) == 1
    seg_series = found[0]["0020000E"]["Value"][0]
    metadata = requests.get(
        f"{orthanc}/dicom-web/studies/{STUDY}/series/{seg_series}/metadata",
        auth=auth,
        headers={"Accept": "application/dicom+json"},
        timeout=10,
    ).json()
    referenced = metadata[0]["00081115"]["Value"][0]["0020000E"]["Value"][0]
    assert referenced == SERIES[0]  # the proposal references the series it was made from
    assert main(argv) == 0  # a rerun: the case is skipped and its SEG not pushed twice
    assert "SEG: 0 pushed, 1 already there" in capsys.readouterr().out


def _post(orthanc: str, path: Path) -> None:
    import requests

    requests.post(
        orthanc + "/instances", data=path.read_bytes(), timeout=10, auth=(USER, PASSWORD)
    ).raise_for_status()


def _reviewer_seg_in_pacs(orthanc, case, small_chest, labels: tuple[int, ...], made: str, path: Path) -> Path:
    """A reviewer's SEG of ``labels`` (of the chest lungs) made from the case's series with highdicom, dated
    ``made`` (YYYYMMDDHHMMSS), stored in the PACS."""
    from seg_making import reviewer_seg

    from medsam_engine.pipeline.core.geometry import align_to
    from medsam_engine.pipeline.io.readers import read_volume

    volume = read_volume(Path(case.image))
    reference = align_to(read_volume(small_chest[1]), volume)
    names = {5: "Right lung", 6: "Left lung"}
    reviewer_seg(
        Path(case.image),
        np.where(np.isin(reference, labels), reference, 0).astype(np.uint16),
        {k: names[k] for k in labels},
        path,
    )
    ds = pydicom.dcmread(path)
    ds.ContentDate, ds.ContentTime = made[:8], made[8:]
    ds.save_as(path)
    _post(orthanc, path)
    return path


def test_coarse_mask_from_pacs_is_the_newest_seg_of_the_series_not_made_here(
    orthanc, tmp_path, small_chest, capsys, box_fill
):
    from medsam_engine.pipeline.io.dicom_seg_reader import referenced_series, seg_label_names

    url = f"{orthanc}/dicom-web/studies/{STUDY}/series/{SERIES[0]}"
    store = CaseStore(tmp_path / "store")
    plain = materialise(discover([url], store.case_ids())[0], store.cache_dir())
    _reviewer_seg_in_pacs(orthanc, plain, small_chest, (5,), "20260101080000", tmp_path / "old.dcm")
    _reviewer_seg_in_pacs(orthanc, plain, small_chest, (5, 6), "20260102080000", tmp_path / "new.dcm")
    assert (
        main(
            [
                "annotate",
                url,
                "--out",
                str(tmp_path / "pushed"),
                "--detector",
                "intensity",
                "--push-seg",
                f"{orthanc}/dicom-web",
                "--config",
                str(box_fill),
            ]
        )
        == 0
    )  # the engine's own SEG, newer still, is not taken
    (lazy,) = discover([url], store.case_ids(), coarse_masks=["from-pacs"])
    assert lazy.coarse_mask.startswith(orthanc)  # the SEG is downloaded with the series, by the annotator
    case = materialise(lazy, store.cache_dir())
    assert referenced_series(Path(case.coarse_mask)) == SERIES[0]
    assert sorted(seg_label_names(Path(case.coarse_mask)).values()) == ["Left lung", "Right lung"]
    assert SERIES[0] not in case.coarse_mask
    assert STUDY not in case.coarse_mask
    capsys.readouterr()
    from_pacs = ["--coarse-mask", "from-pacs", "--out", str(store.root), "--config", str(box_fill)]
    assert main(["annotate", url, *from_pacs]) == 0
    names = {entry.get("name") for entry in CaseStore(store.root).label_properties(case.case_id)}
    assert names == {"Right lung", "Left lung"}  # the reviewer's segment labels
    rle = f"{orthanc}/dicom-web/studies/{STUDY}/series/{SERIES[1]}"  # no SEG references this series
    assert main(["annotate", rle, *from_pacs]) == 1
    assert "no SEG there references this series" in capsys.readouterr().out


def test_review_import_pulls_the_reviewers_seg_newer_than_the_proposal(
    orthanc, tmp_path, small_chest, capsys, box_fill
):
    import time as clock

    url = f"{orthanc}/dicom-web/studies/{STUDY}/series/{SERIES[0]}"
    store = tmp_path / "store"
    argv = ["annotate", url, "--out", str(store), "--detector", "intensity", "--config", str(box_fill)]
    assert main(argv) == 0
    root = f"{orthanc}/dicom-web"
    capsys.readouterr()
    assert main(["review", "import", str(store), root, "--reviewer", "dr-a"]) == 0  # SEGs older than it only
    assert "older than the proposal" in capsys.readouterr().out
    (case_id,) = CaseStore(store).committed_cases()
    assert not any((store / "_cache" / "dicomweb").iterdir())  # the download went with its commit
    later = clock.strftime("%Y%m%d%H%M%S", clock.gmtime(clock.time() + 60))
    viewer = fetch_dicomweb(url, tmp_path / "viewer") / "s001"  # the series as the reviewer's viewer gets it
    _reviewer_seg_in_pacs(
        orthanc,
        type("Case", (), {"image": str(viewer)}),
        small_chest,
        (5, 6),
        later,
        tmp_path / "correction.dcm",
    )
    assert main(["review", "import", str(store), root, "--reviewer", "dr-a"]) == 0
    assert f"accepted {case_id}" in capsys.readouterr().out
    assert CaseStore(store).attributes(case_id).review_status == "accepted"
    assert main(["review", "import", str(store), root, "--reviewer", "dr-a"]) == 0
    assert f"already  {case_id}" in capsys.readouterr().out


def test_credentials_from_a_file_keyed_by_server(orthanc, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MEDSAM_ENGINE_DICOMWEB_USER")
    monkeypatch.delenv("MEDSAM_ENGINE_DICOMWEB_PASSWORD")
    secrets = tmp_path / "dicomweb.yaml"
    secrets.write_text(f"{orthanc}:\n  user: {USER}\n  password: {PASSWORD}\n")
    monkeypatch.setenv("MEDSAM_ENGINE_DICOMWEB_CREDENTIALS", str(secrets))
    url = f"{orthanc}/dicom-web/studies/{STUDY}/series/{SERIES[1]}"
    store = CaseStore(tmp_path / "store")
    (case,) = discover([url], store.case_ids())
    assert materialise(case, store.cache_dir()).kind == "dicom-series"
    secrets.write_text(f"{orthanc}:\n  user: {USER}\n  password: not-it\n")
    (case,) = discover([url], CaseStore(tmp_path / "other").case_ids())
    assert "refused the credentials" in case.error
    assert "not-it" not in case.error + caplog.text
