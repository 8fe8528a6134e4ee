"""DICOMweb inputs: a study or series URL -> its instances as Part 10 files in a local cache folder.

``http(s)://HOST/…/dicom-web/studies/<study>[/series/<series>]``: QIDO-RS lists the series and instances,
WADO-RS fetches each instance as stored (``transfer-syntax=*``, so compressed data stays compressed and is
decoded by the isolated reader like any file). Files are named by position (``s001/00001.dcm``), never by
UID; messages name the server, never the study. A finished download is renamed into place and reused.

A busy or briefly failing PACS costs retries, not cases: HTTP 429/500/502/503/504, refused or dropped
connections and read timeouts are retried with exponential backoff (honouring ``Retry-After``) by urllib3;
one that lasts is a transient failure (stage "io": never quarantined, the next run tries again). Settings from
the environment: ``MEDSAM_ENGINE_DICOMWEB_RETRIES`` (6), ``MEDSAM_ENGINE_DICOMWEB_BACKOFF_S`` (0.5, doubling up
to 30 s), ``MEDSAM_ENGINE_DICOMWEB_TIMEOUT_S`` (60 per request). Credentials, never logged or stored:
``MEDSAM_ENGINE_DICOMWEB_TOKEN`` (a bearer token) or ``MEDSAM_ENGINE_DICOMWEB_USER`` and
``MEDSAM_ENGINE_DICOMWEB_PASSWORD`` (HTTP basic); a refused login (401/403) is a lasting failure.
"""
from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.core.atomic import staged_folder
from pipeline.core.errors import ReadError

log = logging.getLogger(__name__)

URL_PATTERN = re.compile(r"^(?P<base>https?://.+?/)studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'
TIMEOUT_S = 60
COMPLETE = ".complete"
RETRY_STATUSES = (429, 500, 502, 503, 504)


class PacsUnavailableError(ReadError):
    """The server stayed busy or unreachable through every retry: the next run tries again (its reason says
    "temporarily unavailable", which pipeline.core.errors.is_transient reads, also once it is only text)."""


def _setting(name: str, default: float) -> float:
    value = os.environ.get(f"MEDSAM_ENGINE_DICOMWEB_{name}")
    try:
        return float(value) if value else default
    except ValueError as exc:
        raise ReadError(f"MEDSAM_ENGINE_DICOMWEB_{name} must be a number") from exc


def dicomweb_session(methods: tuple[str, ...] = ("GET", "HEAD")):
    """A requests session with the environment's credentials and urllib3's retries with backoff (for
    ``methods``: a STOW-RS POST is safe to repeat, the PACS keeps one copy of an instance)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retries = int(_setting("RETRIES", 6))
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0,
                  backoff_factor=_setting("BACKOFF_S", 0.5), backoff_max=30, status_forcelist=RETRY_STATUSES,
                  allowed_methods=frozenset(methods), respect_retry_after_header=True,
                  raise_on_status=False)
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    token = os.environ.get("MEDSAM_ENGINE_DICOMWEB_TOKEN")
    user = os.environ.get("MEDSAM_ENGINE_DICOMWEB_USER")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, os.environ.get("MEDSAM_ENGINE_DICOMWEB_PASSWORD", ""))
    return session


def is_dicomweb_url(text: str) -> bool:
    return bool(URL_PATTERN.match(str(text)))


def _server(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _request(session, method: str, url: str, **kwargs):
    """One request through the retrying session; what every DICOMweb call refuses alike is raised here: an
    unreachable or still busy server (PacsUnavailableError, transient) and refused credentials (lasting)."""
    import requests

    try:
        response = session.request(method, url, timeout=_setting("TIMEOUT_S", TIMEOUT_S), **kwargs)
    except requests.RequestException as exc:
        why = type(exc).__name__
        raise PacsUnavailableError(f"DICOMweb server {_server(url)} could not be reached ({why}): temporarily "
                                   "unavailable through every retry") from exc
    if response.status_code in (401, 403):
        raise ReadError(f"DICOMweb server {_server(url)} refused the credentials (HTTP {response.status_code}); "
                        "set MEDSAM_ENGINE_DICOMWEB_TOKEN or MEDSAM_ENGINE_DICOMWEB_USER/_PASSWORD")
    if response.status_code in RETRY_STATUSES:
        raise PacsUnavailableError(f"DICOMweb server {_server(url)} answered HTTP {response.status_code}: "
                                   "temporarily unavailable through every retry")
    return response


def _get(session, url: str, accept: str, *, allow: tuple[int, ...] = ()):
    response = _request(session, "GET", url, headers={"Accept": accept})
    if response.status_code == 404:
        raise ReadError(f"DICOMweb server {_server(url)}: study or series not found (HTTP 404)")
    if response.status_code >= 400 and response.status_code not in allow:
        raise ReadError(f"DICOMweb server {_server(url)} answered HTTP {response.status_code}")
    return response


def _qido(session, url: str, tag: str) -> list[str]:
    """The values of ``tag`` (e.g. '0020000E') in a QIDO-RS JSON answer (204 No Content -> [])."""
    response = _get(session, url, "application/dicom+json")
    if response.status_code == 204 or not response.content:
        return []
    try:
        return [str(item[tag]["Value"][0]) for item in response.json() if item.get(tag, {}).get("Value")]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ReadError(f"DICOMweb server {_server(url)} sent a QIDO-RS answer that is not DICOM JSON") \
            from exc


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart/related message (RFC 2046), without their part headers."""
    match = re.search(r'boundary="?([^";,]+)"?', content_type, flags=re.IGNORECASE)
    if not match:
        raise ValueError("multipart answer without a boundary")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk.partition(b"\r\n\r\n")
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


def _instance(session, url: str) -> bytes:
    response = _get(session, url, ACCEPT_AS_STORED, allow=(406,))
    if response.status_code == 406:  # the server cannot send as stored: take its default syntax
        response = _get(session, url, ACCEPT_DEFAULT)
    try:
        parts = multipart_parts(response.content, response.headers.get("Content-Type", ""))
    except ValueError as exc:
        raise ReadError(f"DICOMweb server {_server(url)} sent a WADO-RS answer that is not multipart") \
            from exc
    if len(parts) != 1:
        raise ReadError(f"DICOMweb server {_server(url)} sent {len(parts)} parts for one instance")
    return parts[0]


def _download_series(session, base: str, study: str, series: str, folder: Path) -> int:
    root = f"{base}studies/{study}/series/{series}"
    instances = _qido(session, f"{root}/instances", "00080018")
    folder.mkdir(parents=True)

    def fetch(item: tuple[int, str]) -> None:
        index, sop = item
        (folder / f"{index + 1:05d}.dcm").write_bytes(_instance(session, f"{root}/instances/{sop}"))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(fetch, enumerate(instances)))
    return len(instances)


def stow(root: str, files: list[Path]) -> None:
    """Store DICOM files in the PACS at ``root`` (STOW-RS, one multipart request); ReadError on failure (a
    PacsUnavailableError when it stayed busy or unreachable)."""
    boundary = f"medsam-engine-{os.urandom(8).hex()}"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + Path(f).read_bytes() + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    url = root.rstrip("/") + "/studies"
    with dicomweb_session(methods=("POST",)) as session:
        response = _request(session, "POST", url, data=body, headers=headers)
    if response.status_code >= 300:
        raise ReadError(f"DICOMweb server {_server(url)} refused the SEG (HTTP {response.status_code})")


def is_service_root(text: str) -> bool:
    """An http(s) URL that names a DICOMweb service (``…/dicom-web``), not one study or series in it."""
    return str(text).startswith(("http://", "https://")) and not is_dicomweb_url(text)


def query_studies(root: str, filters: dict[str, str] | None = None, *, page: int = 500) -> list[str]:
    """The StudyInstanceUIDs that QIDO-RS lists at ``root`` under ``filters`` (e.g. ``{"ModalitiesInStudy":
    "CT", "StudyDate": "20260101-"}``), page by page; ReadError naming the server (never a study) otherwise."""
    from urllib.parse import urlencode

    base = root.rstrip("/") + "/"
    uids: list[str] = []
    with dicomweb_session() as session:
        offset = 0
        while True:
            query = {**(filters or {}), "limit": page, "offset": offset}
            found = _qido(session, f"{base}studies?{urlencode(query)}", "0020000D")
            uids.extend(u for u in found if u not in uids)
            if len(found) < page:
                return uids
            offset += page


def fetch_dicomweb(url: str, dest: str | Path) -> Path:
    """Download the study or series at ``url`` into ``dest`` (reused when complete); ReadError on failure."""
    match = URL_PATTERN.match(url)
    if not match:
        raise ReadError("not a DICOMweb study or series URL (…/studies/<uid>[/series/<uid>])")
    dest = Path(dest)
    if (dest / COMPLETE).is_file():
        return dest
    base, study, series = match.group("base"), match.group("study"), match.group("series")
    with staged_folder(dest) as staging, dicomweb_session() as session:
        series_list = [series] if series else _qido(session, f"{base}studies/{study}/series", "0020000E")
        if not series_list:
            raise ReadError(f"DICOMweb server {_server(url)}: the study has no series")
        count = sum(_download_series(session, base, study, uid, staging / f"s{k + 1:03d}")
                    for k, uid in enumerate(series_list))
        (staging / COMPLETE).write_text(str(count))
    log.info("fetched %d instances in %d series from %s", count, len(series_list), _server(url))
    return dest
