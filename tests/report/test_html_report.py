"""`medsam-engine report`: one self-contained HTML page for a store, checked on real data (the chest CT with
its named labels, a broken file, stardist's nuclei) and opened in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from chromium import chromium_binary, load_page

from medsam_engine.pipeline.cli.main import main
from medsam_engine.pipeline.report.summary import INSTANCE_MAP_ROW
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.labels_meta import meanings_from_properties
from medsam_engine.pipeline.store.volumes import label_volumes_ml

PNG_URI = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


class _Tables(HTMLParser):
    """The text of every table cell, by the id of the heading or section the table follows."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.anchor, self.row, self.cell = "", None, None

    def handle_starttag(self, tag, attrs):
        found = dict(attrs)
        if found.get("id"):
            self.anchor = found["id"]
        if tag == "tr":
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = ""
        elif tag == "span" and self.cell is not None and "swatch" in (found.get("class") or ""):
            self.cell += f"[{found.get('style', 'many')}]"

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.row is not None and self.cell is not None:
            self.row.append(self.cell.strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.tables.setdefault(self.anchor, []).append(self.row)
            self.row = None


def _tables(page: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def _section(page: str, name: str) -> str:
    start = page.index(f"<section id='{name}'>")
    return page[start : page.index("</section>", start)]


def _decoded(uri_data: str) -> np.ndarray:
    import cv2

    picture = cv2.imdecode(np.frombuffer(base64.b64decode(uri_data), np.uint8), cv2.IMREAD_UNCHANGED)
    assert picture is not None, "an embedded PNG does not decode"
    return picture


def _annotate(store: Path, inputs: list[Path], masks: list[Path], config: Path, *extra: str) -> int:
    argv = ["annotate", *map(str, inputs), "--coarse-mask", *map(str, masks), "--out", str(store)]
    return main([*argv, "--config", str(config), *extra])


@pytest.fixture(scope="module")
def reported(tmp_path_factory, small_chest, nuclei_2d, chest_label_names, box_fill):
    """A store with the named chest CT (the box-fill runner), a broken NRRD and the nuclei image, and its
    report written by `medsam-engine report STORE --out DIR`: (store, page path, page text)."""
    root = tmp_path_factory.mktemp("html-report")
    names = root / "names.json"
    names.write_text(json.dumps({str(v): n for v, n in chest_label_names.items()}))
    broken = root / "broken.nrrd"
    broken.write_bytes(b"NRRD0004\nnot really")
    store = root / "store"
    chest = [small_chest[0], broken], [small_chest[1], small_chest[1]]
    assert _annotate(store, *chest, box_fill, "--labels", str(names)) == 1  # the broken file fails
    assert _annotate(store, [nuclei_2d[0]], [nuclei_2d[1]], box_fill) == 0
    assert main(["report", str(store), "--out", str(root / "out")]) == 0
    page = root / "out" / "report.html"
    return CaseStore(store), page, page.read_text()


def test_the_summary_lists_label_names_and_volumes_as_the_store_holds_them(reported):
    store, _, page = reported
    rows = {row[0].split("]")[-1]: row for row in _tables(page)["labels"][1:]}
    volumes = label_volumes_ml(store, store.committed_cases())
    chest = next(c for c in store.committed_cases() if store.attributes(c).geometry.shape[0] > 1)
    meanings = meanings_from_properties(store.label_properties(chest))
    assert {meanings[v].name for v in volumes[chest]} <= set(rows)
    assert "right lung" in rows  # by name, not value
    for value, ml in volumes[chest].items():
        meaning = meanings[value]
        label, values, cases, instances, volume = rows[meaning.name][:5]
        red, green, blue = meaning.rgb
        assert f"rgb({red},{green},{blue})" in label  # the store's colour swatch
        assert values == str(value)
        assert cases == "1"
        assert int(instances) == sum(i["label"] == value for i in store.attributes(chest).instances)
        assert float(volume.replace(",", "")) == pytest.approx(ml, abs=0.051)
    nuclei = next(c for c in store.committed_cases() if c != chest)
    objects = rows[INSTANCE_MAP_ROW]  # the nuclei: one row for the instance map
    assert int(objects[3]) == len(store.attributes(nuclei).instances) > 10
    assert objects[4] == ""  # no volume for a 2D image, an area instead
    assert float(objects[5].replace(",", "")) == pytest.approx(sum(volumes[nuclei].values()) * 1000, abs=0.1)


def test_the_summary_counts_cases_and_gives_the_failure_by_stage(reported):
    store, _, page = reported
    summary = _section(page, "summary")
    assert "<b>2</b>cases committed" in summary
    assert "<b>1</b>cases failed" in summary
    ((failed, error),) = store.errors().items()
    assert f"at stage <code>{error['stage']}</code>: 1 case(s)" in summary
    failures = _tables(page)["failures"]
    assert failures[1][0] == failed
    assert failures[1][1].endswith("broken.nrrd")
    assert "broken.nrrd: unreadable" in failures[1][2]
    assert "never routed" in summary


def test_the_worst_instances_are_crops_of_the_lowest_scores_first(reported):
    store, _, page = reported
    worst = _section(page, "worst")
    scores = sorted(
        (i.get("quality") or {}).get("score", i["predicted_iou"])
        for attrs in store.all_attributes().values()
        for i in attrs.instances
    )
    shown = [float(s) for s in re.findall(r"score <b>([0-9.]+)</b>", worst)]
    assert shown == pytest.approx(scores[:12], abs=5e-4)  # --worst defaults to 12, lowest first
    crops = [_decoded(data) for data in PNG_URI.findall(worst)]
    assert len(crops) == 12
    assert all(max(c.shape[:2]) == 240 and c.ndim == 3 for c in crops)
    assert all(c.std() > 5 for c in crops)  # an image, not a blank
    assert "right lung" in worst or "left lung" in worst or "ribs" in worst  # label names in the captions


def test_every_embedded_png_decodes_and_nothing_is_fetched(reported):
    _, page_path, page = reported
    pictures = PNG_URI.findall(page)
    assert len(pictures) == page.count("<img ") == 12 + 3 + 1  # crops, 3 chest slices, the nuclei image
    for data in pictures:
        assert _decoded(data).shape[2] == 3
    assert not re.search(r"(src|href)=['\"](?!data:|#)", page)  # no file, no URL: only embedded data
    assert "<script" not in page
    assert "<link" not in page
    assert [p.name for p in page_path.parent.iterdir()] == ["report.html"]  # one file


def test_a_store_without_images_draws_masks_on_grey_and_says_so(tmp_path, nuclei_2d, box_fill):
    config = tmp_path / "no-image.yaml"
    config.write_text(box_fill.read_text() + "store:\n  write_image: false\n")
    store = tmp_path / "store"
    assert _annotate(store, [nuclei_2d[0]], [nuclei_2d[1]], config) == 0
    assert main(["report", str(store)]) == 0  # default: STORE/_report
    page = (store / "_report" / "report.html").read_text()
    assert "kept no image" in page
    assert "no image stored: mask on grey" in _section(page, "worst")
    overview = _decoded(PNG_URI.findall(_section(page, "cases"))[0])
    assert (overview == 110).all(axis=2).mean() > 0.5  # mostly the grey background


def test_cases_that_cannot_be_read_are_listed_with_the_reason(reported, tmp_path, capsys):
    store, _, _ = reported
    copy = tmp_path / "store"
    shutil.copytree(store.root, copy, ignore=shutil.ignore_patterns("_cache"))
    damaged = CaseStore(copy)
    chest, nuclei = sorted(damaged.committed_cases(), key=lambda c: damaged.attributes(c).geometry.shape[0])[
        ::-1
    ]
    for chunk in (copy / f"{chest}.ome.zarr" / "labels" / "medsam" / "0").rglob("c/*/*/*"):
        chunk.write_bytes(b"not a compressed chunk")
    (copy / f"{nuclei}.ome.zarr" / "zarr.json").write_text("{ not json")
    assert main(["report", str(copy), "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    unreadable = {row[0]: row[1] for row in _tables(page)["unreadable"][1:]}
    assert set(unreadable) == {chest, nuclei}
    assert unreadable[chest].startswith("label map: ")
    assert unreadable[nuclei].startswith("metadata: JSONDecodeError")
    assert "Traceback" not in page
    assert "Traceback" not in capsys.readouterr().err
    assert "<b>2</b>cannot be read" in page


def test_report_refuses_what_is_not_a_store(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no store at" in capsys.readouterr().err


@pytest.mark.skipif(
    chromium_binary() is None, reason="no Chromium installed (Debian: apt-get install chromium)"
)
@pytest.mark.slow
def test_the_page_opens_in_a_real_headless_chromium(reported, tmp_path):
    import cv2

    _, page_path, page = reported
    load = load_page(page_path.resolve().as_uri(), tmp_path / "profile")
    assert load.console_errors == []
    assert {url.split(":", 1)[0] for url in load.requests} <= {"file", "data"}  # nothing from a network
    assert load.img_tags == page.count("<img ") == len(load.images) > 0
    assert all(complete and width > 0 and height > 0 for complete, width, height in load.images)
    assert load.text_length > 1000
    shot = cv2.imdecode(np.frombuffer(load.screenshot, np.uint8), cv2.IMREAD_COLOR)
    (tmp_path / "report.png").write_bytes(load.screenshot)  # to look at
    assert shot.shape == (2000, 1280, 3)
    assert shot.std() > 20
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000
