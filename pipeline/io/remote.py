"""fsspec inputs (``s3://bucket/prefix``, ``gs://…``, ``memory://…``): copied into a local cache folder.

A URL naming a folder (a prefix) is copied with its relative layout; one naming a file keeps its name (so
a zip stays a zip and is then extracted like a local one). Nothing is written outside the destination:
relative names with ``..`` or absolute parts are refused. A finished copy is renamed into place and reused.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from medsam_engine.pipeline.core.atomic import staged_folder
from medsam_engine.pipeline.core.errors import ReadError
from medsam_engine.pipeline.io.archives import safe_member_path

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

COMPLETE = ".complete"


def is_remote_url(text: str) -> bool:
    """True for ``scheme://…`` inputs that fsspec handles (not http(s), which is DICOMweb, nor file)."""
    scheme = urlsplit(str(text)).scheme
    return len(scheme) > 1 and "://" in str(text) and scheme not in ("http", "https", "file")


def _label(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"  # bucket names are not PHI; object keys may be


def _listing(fs: AbstractFileSystem, path: str, label: str) -> tuple[bool, list[str]]:
    if fs.isdir(path):
        return True, sorted(fs.find(path))
    if fs.isfile(path):
        return False, [path]
    raise ReadError(f"{label}: nothing found at the given path")


def fetch_remote(url: str, dest: str | Path, *, max_bytes: int) -> Path:
    """Copy the file or folder at ``url`` into ``dest`` (reused when complete); returns the local path.

    Raises ReadError when the URL's filesystem is not installed, nothing is there, or it exceeds max_bytes.
    """
    import fsspec

    dest, label = Path(dest), _label(url)
    if (dest / COMPLETE).is_file():
        return dest / (dest / COMPLETE).read_text()
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ReadError(f"{label}: no filesystem for this URL ({exc})") from exc
    try:
        with staged_folder(dest) as staging:
            _copy_into(fs, path, label, staging, max_bytes)
    except ReadError:
        raise
    except Exception as exc:
        raise ReadError(f"{label}: could not be copied ({type(exc).__name__}: {str(exc)[:160]})") from exc
    return dest / (dest / COMPLETE).read_text()


def _copy_into(fs: AbstractFileSystem, path: str, label: str, staging: Path, max_bytes: int) -> None:
    """Copy the file or folder at ``path`` into ``staging`` and write the completion marker last."""
    is_folder, remote_files = _listing(fs, path, label)
    total = 0
    for remote in remote_files:
        relative = safe_member_path(
            PurePosixPath(remote).relative_to(path).as_posix() if is_folder else PurePosixPath(remote).name
        )
        if relative is None:
            continue
        total += int(fs.size(remote) or 0)
        if total > max_bytes:
            raise ReadError(f"{label}: more than {max_bytes} bytes under the given path; not copied")
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(staging / relative))
    (staging / COMPLETE).write_text("" if is_folder else PurePosixPath(remote_files[0]).name)
