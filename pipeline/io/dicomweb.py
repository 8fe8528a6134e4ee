"""DICOMweb through dicomweb-client: QIDO-RS queries (a service root's studies, a study's series, the SEGs
that reference a series), a series downloaded as Part 10 files into a local cache folder, STOW-RS of the
engine's SEG.

``http(s)://HOST/…/dicom-web/studies/<study>[/series/<series>]``: QIDO-RS lists the series, WADO-RS streams
each series as stored (``transfer-syntax=*``, so compressed data stays compressed and is decoded by the
isolated reader like any file). Files are named by position (``s001/00001.dcm``), never by UID; messages
name the server, never the study. A finished download is renamed into place and reused.

A busy or briefly failing PACS costs retries, not cases: HTTP 429/500/502/503/504, refused or dropped
connections and read timeouts are retried with exponential backoff (honouring ``Retry-After``) by urllib3;
one that lasts is a transient failure (stage "io": never quarantined, the next run tries again). Settings from
the environment: ``MEDSAM_ENGINE_DICOMWEB_RETRIES`` (6), ``MEDSAM_ENGINE_DICOMWEB_BACKOFF_S`` (0.5, doubling
up to 30 s), ``MEDSAM_ENGINE_DICOMWEB_TIMEOUT_S`` (60 per request). Credentials, never logged or stored:
``MEDSAM_ENGINE_DICOMWEB_TOKEN`` (a bearer token) or ``MEDSAM_ENGINE_DICOMWEB_USER`` and
``MEDSAM_ENGINE_DICOMWEB_PASSWORD`` (HTTP basic), else the file ``MEDSAM_ENGINE_DICOMWEB_CREDENTIALS`` names,
else ``~/.config/medsam-engine/dicomweb.yaml`` (JSON or YAML: ``{"token": …}`` or ``{"user": …, "password":
…}``, or such entries keyed by the server's ``http(s)://host:port``); a refused login (401/403) is a lasting
failure. Ray actors download the series they annotate: they are given the file's path (never a secret).

The HTTP libraries underneath log the URLs they request, which name studies (and a query's values may name a
patient): wherever a session is made (:func:`dicomweb_session`, in every process: the command, Prefect
tasks, Ray actors), dicomweb-client's and urllib3's own logs are kept to warnings, and their warnings carry
``<uid>`` and ``?…`` in place of UIDs and query strings.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from medsam_engine.pipeline.core.atomic import staged_folder
from medsam_engine.pipeline.core.errors import ReadError

if TYPE_CHECKING:
    import requests
    from dicomweb_client.api import DICOMwebClient

log = logging.getLogger(__name__)

URL_PATTERN = re.compile(
    r"^(?P<base>https?://.+?/)studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$"
)
INSTANCE_PATTERN = re.compile(
    r"^(?P<base>https?://.+?/)studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)"
    r"/instances/(?P<sop>[0-9.]+)/?$"
)
# series that hold no image to annotate (a SEG is a coarse mask or a correction, never an input image)
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "SR", "PR", "KO", "DOC", "REG", "FID", "RWV", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "PLAN"}
)
AS_STORED = (("application/dicom", "*"),)  # WADO-RS media type: each instance in the syntax it is stored in
TIMEOUT_S = 60
COMPLETE = ".complete"
RETRY_STATUSES = (429, 500, 502, 503, 504)
LIBRARY_LOGGERS = ("dicomweb_client", "urllib3")
_UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")  # a DICOM UID (an IPv4 address has fewer parts)
_QUERY = re.compile(r"\?[^\s'\"]*")


class _Redacted(logging.Filter):
    """A library's log record without UIDs and query strings (the message is formatted first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _QUERY.sub("?…", _UID.sub("<uid>", record.getMessage())), ()
        record.exc_info, record.exc_text = None, None  # a request's exception text holds its URL
        return True


def _private_library_logs() -> None:
    """Keep the HTTP libraries' logs to warnings, redacted (see the module doc); idempotent."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("dicomweb_client.web", "dicomweb_client.session_utils", "urllib3.connectionpool"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Redacted) for f in logger.filters):
            logger.addFilter(_Redacted())


class PacsUnavailableError(ReadError):
    """The server stayed busy or unreachable through every retry: the next run tries again (its reason says
    "temporarily unavailable", which pipeline.core.errors.is_transient reads, also once it is only text)."""


def _setting(name: str, default: float) -> float:
    value = os.environ.get(f"MEDSAM_ENGINE_DICOMWEB_{name}")
    try:
        return float(value) if value else default
    except ValueError as exc:
        raise ReadError(f"MEDSAM_ENGINE_DICOMWEB_{name} must be a number") from exc


def _credentials(url: str) -> dict[str, Any]:
    """{"token"} or {"user", "password"} for the server of ``url``: the environment first, then the file
    MEDSAM_ENGINE_DICOMWEB_CREDENTIALS names (one entry, or entries keyed by ``scheme://host[:port]``)."""
    token = os.environ.get("MEDSAM_ENGINE_DICOMWEB_TOKEN")
    user = os.environ.get("MEDSAM_ENGINE_DICOMWEB_USER")
    if token:
        return {"token": token}
    if user:
        return {"user": user, "password": os.environ.get("MEDSAM_ENGINE_DICOMWEB_PASSWORD", "")}
    path = os.environ.get("MEDSAM_ENGINE_DICOMWEB_CREDENTIALS") or _default_credentials()
    if not path:
        return {}
    import yaml

    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ReadError(
            f"MEDSAM_ENGINE_DICOMWEB_CREDENTIALS: cannot read the credentials file ({type(exc).__name__})"
        ) from exc
    if not isinstance(entries, dict):
        raise ReadError("MEDSAM_ENGINE_DICOMWEB_CREDENTIALS: the credentials file must hold a mapping")
    entry = entries.get(_server(url), entries)
    if not isinstance(entry, dict) or not ({"token"} <= entry.keys() or {"user", "password"} <= entry.keys()):
        return {}
    return {k: str(v) for k, v in entry.items() if k in ("token", "user", "password")}


def _default_credentials() -> str | None:
    """$XDG_CONFIG_HOME/medsam-engine/dicomweb.yaml (~/.config/…) when it exists."""
    home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    path = os.path.join(home, "medsam-engine", "dicomweb.yaml")
    return path if os.path.isfile(path) else None


def dicomweb_session(url: str, methods: tuple[str, ...] = ("GET", "HEAD")) -> requests.Session:
    """A requests session for the server of ``url`` with its credentials and urllib3's retries with backoff
    (for ``methods``: a STOW-RS POST is safe to repeat, the PACS keeps one copy of an instance)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    _private_library_logs()
    retries = int(_setting("RETRIES", 6))
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        backoff_factor=_setting("BACKOFF_S", 0.5),
        backoff_max=30,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset(methods),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    login = _credentials(url)
    if "token" in login:
        session.headers["Authorization"] = f"Bearer {login['token']}"
    elif "user" in login:
        session.auth = (login["user"], login["password"])
    return session


def dicomweb_client(root: str, *, methods: tuple[str, ...] = ("GET", "HEAD")) -> DICOMwebClient:
    """A dicomweb-client for the service ``root`` (…/dicom-web) over :func:`dicomweb_session`; its own
    retries are off, urllib3's do the retrying."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(
        url=root.rstrip("/"),
        session=dicomweb_session(root, methods),
        timeout=_setting("TIMEOUT_S", TIMEOUT_S),
    )
    client.set_http_retry_params(retry=False)
    return client


@contextmanager
def answers(url: str, *, missing: str = "study or series not found") -> Iterator[None]:
    """What every DICOMweb call refuses alike, raised as the engine's errors naming the server only: an
    unreachable or still busy server (PacsUnavailableError, transient), refused credentials (lasting),
    ``missing`` on 404, any other refusal with its HTTP status."""
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        raise _refusal(url, status, missing) from exc
    except requests.RequestException as exc:
        why = type(exc).__name__
        raise PacsUnavailableError(
            f"DICOMweb server {_server(url)} could not be reached ({why}): temporarily "
            "unavailable through every retry"
        ) from exc


def _refusal(url: str, status: int, missing: str) -> ReadError:
    if status in (401, 403):
        return ReadError(
            f"DICOMweb server {_server(url)} refused the credentials (HTTP {status}); set "
            "MEDSAM_ENGINE_DICOMWEB_TOKEN or MEDSAM_ENGINE_DICOMWEB_USER/_PASSWORD (or "
            "MEDSAM_ENGINE_DICOMWEB_CREDENTIALS)"
        )
    if status in RETRY_STATUSES:
        return PacsUnavailableError(
            f"DICOMweb server {_server(url)} answered HTTP {status}: temporarily "
            "unavailable through every retry"
        )
    if status == 404:
        return ReadError(f"DICOMweb server {_server(url)}: {missing} (HTTP 404)")
    return ReadError(f"DICOMweb server {_server(url)} answered HTTP {status}")


def is_dicomweb_url(text: str) -> bool:
    return bool(URL_PATTERN.match(str(text)))


def _server(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def uid_values(items: list[dict[str, Any]], tag: str) -> list[str]:
    """The values of ``tag`` (e.g. '0020000E') in a QIDO-RS answer (DICOM JSON)."""
    try:
        return [str(item[tag]["Value"][0]) for item in items if item.get(tag, {}).get("Value")]
    except (TypeError, KeyError, AttributeError, IndexError) as exc:
        raise ReadError("a QIDO-RS answer that is not DICOM JSON") from exc


def _download_series(client: DICOMwebClient, url: str, study: str, series: str, folder: Path) -> int:
    """Stream one series as stored (its transfer syntax kept) into ``folder`` as Part 10 files."""
    folder.mkdir(parents=True)
    count = 0
    try:
        with answers(url):
            for count, dataset in enumerate(client.iter_series(study, series, media_types=AS_STORED), 1):
                dataset.save_as(folder / f"{count:05d}.dcm", enforce_file_format=True)
    except ReadError as exc:
        if "HTTP 406" not in exc.reason:
            raise
        # the server cannot send as stored: take its default syntax
        for old in folder.iterdir():
            old.unlink()
        with answers(url):
            for count, dataset in enumerate(client.iter_series(study, series), 1):
                dataset.save_as(folder / f"{count:05d}.dcm", enforce_file_format=True)
    return count


def stow(root: str, files: list[Path]) -> None:
    """Store DICOM files in the PACS at ``root`` (STOW-RS, one request); ReadError on failure (a
    PacsUnavailableError when it stayed busy or unreachable)."""
    import pydicom

    client = dicomweb_client(root, methods=("POST",))
    with answers(root, missing="no STOW-RS service here"):
        client.store_instances([pydicom.dcmread(f) for f in files])


def is_service_root(text: str) -> bool:
    """An http(s) URL that names a DICOMweb service (``…/dicom-web``), not one study or series in it."""
    return str(text).startswith(("http://", "https://")) and not is_dicomweb_url(text)


def query_studies(
    root: str, filters: dict[str, str] | None = None, *, page: int = 500
) -> dict[str, int | None]:
    """StudyInstanceUID -> number of instances (None when the server does not say) of the studies QIDO-RS
    lists at ``root`` under ``filters`` (e.g. ``{"ModalitiesInStudy": "CT", "StudyDate": "20260101-"}``),
    page by page; ReadError naming the server (never a study) otherwise. A filtered listing that runs past
    its first page is asked for once more without a limit: Orthanc 1.10 answers a later page under a
    ModalitiesInStudy filter with nothing."""
    client = dicomweb_client(root)
    studies: dict[str, int | None] = {}
    offset = 0
    while True:
        found = _studies_page(client, root, filters, limit=page, offset=offset)
        for uid, count in found.items():
            studies.setdefault(uid, count)
        if len(found) < page:
            if offset and filters:
                for uid, count in _studies_page(client, root, filters, limit=None, offset=0).items():
                    studies.setdefault(uid, count)
            return studies
        offset += page


def _studies_page(
    client: DICOMwebClient, root: str, filters: dict[str, str] | None, *, limit: int | None, offset: int
) -> dict[str, int | None]:
    """One QIDO-RS page of studies: StudyInstanceUID -> number of instances (None when not said)."""
    with answers(root, missing="no QIDO-RS service here"):
        found = client.search_for_studies(
            search_filters=dict(filters or {}),
            limit=limit,
            offset=offset,
            fields=["NumberOfStudyRelatedInstances"],
        )
    studies: dict[str, int | None] = {}
    for item in found:
        uid = uid_values([item], "0020000D")
        if uid:
            count = item.get("00201208", {}).get("Value") or [None]
            studies.setdefault(uid[0], None if count[0] is None else int(count[0]))
    return studies


def fetch_dicomweb(url: str, dest: str | Path) -> Path:
    """Download the study or series at ``url`` into ``dest`` (reused when complete); ReadError on failure."""
    match = URL_PATTERN.match(url)
    if not match:
        raise ReadError("not a DICOMweb study or series URL (…/studies/<uid>[/series/<uid>])")
    dest = Path(dest)
    if (dest / COMPLETE).is_file():
        return dest
    base, study, series = match.group("base"), match.group("study"), match.group("series")
    client = dicomweb_client(base.rstrip("/"))
    with staged_folder(dest) as staging:
        if series:
            series_list = [series]
        else:
            with answers(url):
                series_list = uid_values(client.search_for_series(study), "0020000E")
        if not series_list:
            raise ReadError(f"DICOMweb server {_server(url)}: the study has no series")
        count = sum(
            _download_series(client, url, study, uid, staging / f"s{k + 1:03d}")
            for k, uid in enumerate(series_list)
        )
        (staging / COMPLETE).write_text(str(count))
    log.info("fetched %d instances in %d series from %s", count, len(series_list), _server(url))
    return dest


@dataclass(frozen=True)
class PacsSeries:
    """A series a study or series URL names, from QIDO-RS: its URL, UIDs, modality and whether its first
    instance is a localizer (ImageType)."""

    url: str
    study: str
    series: str
    modality: str
    localizer: bool
    instances: int | None = None  # NumberOfSeriesRelatedInstances, when the server says


def list_series(url: str) -> list[PacsSeries]:
    """The series of the study or series at ``url`` (QIDO-RS only: nothing is downloaded); ReadError naming
    the server (never a study) when it cannot say, "not found" when it has no such study or series."""
    match = URL_PATTERN.match(url)
    if not match:
        raise ReadError("not a DICOMweb study or series URL (…/studies/<uid>[/series/<uid>])")
    root, study, only = match.group("base").rstrip("/"), match.group("study"), match.group("series")
    client = dicomweb_client(root)
    listed = []
    with answers(url):
        found = client.search_for_series(
            study,
            search_filters={"SeriesInstanceUID": only} if only else None,
            fields=["NumberOfSeriesRelatedInstances"],
        )
        for item in found:
            series, modality = _first(item, "0020000E"), _first(item, "00080060").upper()
            if not series:
                continue
            localizer = False
            if modality not in NON_IMAGE_MODALITIES:
                first = client.search_for_instances(study, series, fields=["ImageType"], limit=1)
                image_type = ((first[0].get("00080008") or {}).get("Value") or []) if first else []
                localizer = "LOCALIZER" in [str(v).upper() for v in image_type]
            count = _first(item, "00201209")
            listed.append(
                PacsSeries(
                    f"{root}/studies/{study}/series/{series}",
                    study,
                    series,
                    modality,
                    localizer,
                    int(count) if count.isdigit() else None,
                )
            )
    if not listed:
        raise ReadError(f"DICOMweb server {_server(url)}: study or series not found")
    return listed


def fetch_instance(url: str, path: Path) -> Path:
    """Download the instance at ``url`` (…/instances/<uid>) to ``path``, kept when already there (a SOP
    instance does not change)."""
    match = INSTANCE_PATTERN.match(url)
    if not match:
        raise ReadError("not a DICOMweb instance URL (…/series/<uid>/instances/<uid>)")
    root = match.group("base").rstrip("/")
    seg = PacsSeg(match.group("study"), match.group("series"), match.group("sop"), "", "")
    return fetch_seg(root, seg, path)


# -- DICOM SEG in the PACS: reviewers' corrections and coarse masks ------------------------------------------
ENGINE_MANUFACTURER = "medsam-engine"  # what pipeline/export/dicom_seg.py writes: the engine's own proposals


@dataclass(frozen=True)
class PacsSeg:
    """A DICOM SEG instance in the PACS: where it is, the series it references and when it was made
    (ContentDate + ContentTime, ``YYYYMMDDHHMMSS``; empty when the SEG does not say)."""

    study: str
    series: str
    sop: str
    references: str
    made: str


def _first(item: dict[str, Any], tag: str) -> str:
    value = (item.get(tag) or {}).get("Value") or [""]
    return str(value[0]) if not isinstance(value[0], dict) else ""


def find_segs(root: str, *, study: str | None = None) -> list[PacsSeg]:
    """The SEG instances at ``root`` (in ``study`` only, when given) not written by this engine, from QIDO-RS
    and WADO-RS metadata (no pixel data is fetched)."""
    client = dicomweb_client(root)
    with answers(root, missing="no QIDO-RS service here"):
        found = client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"})
        series = [(_first(item, "0020000D") or study, _first(item, "0020000E")) for item in found]
        segs = []
        for study_uid, series_uid in series:
            if not (study_uid and series_uid):
                continue
            for item in client.retrieve_series_metadata(study_uid, series_uid):
                if _first(item, "00080070") == ENGINE_MANUFACTURER:
                    continue
                refs = ((item.get("00081115") or {}).get("Value") or [{}])[0]
                made = _first(item, "00080023") + _first(item, "00080033").split(".")[0]
                segs.append(
                    PacsSeg(study_uid, series_uid, _first(item, "00080018"), _first(refs, "0020000E"), made)
                )
    return segs


def newest_per_series(segs: list[PacsSeg], wanted: Container[str] | None = None) -> dict[str, PacsSeg]:
    """The newest SEG referencing each series (of ``wanted`` series UIDs, when given)."""
    newest: dict[str, PacsSeg] = {}
    for seg in sorted(segs, key=lambda s: s.made):
        if seg.references and (wanted is None or seg.references in wanted):
            newest[seg.references] = seg
    return newest


def fetch_seg(root: str, seg: PacsSeg, path: Path) -> Path:
    """Download one SEG instance to ``path`` (kept when already there: a SOP instance does not change)."""
    if path.is_file():
        return path
    client = dicomweb_client(root)
    with answers(root):
        dataset = client.retrieve_instance(seg.study, seg.series, seg.sop)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    dataset.save_as(staging, enforce_file_format=True)
    staging.replace(path)
    return path
