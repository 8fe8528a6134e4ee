"""A real, temporary Orthanc with its DICOMweb plugin and authentication on, on a loopback port (Debian
packages orthanc + orthanc-dicomweb; .ci/run installs them)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
PLUGIN = next(
    (
        p
        for p in (
            "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
            "/usr/lib/orthanc/libOrthancDicomWeb.so",
        )
        if Path(p).exists()
    ),
    None,
)
MISSING = "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
USER, PASSWORD = "engine", "s3cret-Pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 30) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {process.returncode}")
        try:
            if requests.get(url + "/system", timeout=1, auth=(USER, PASSWORD)).ok:
                return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError("Orthanc did not answer within 30 s")


@contextmanager
def running_orthanc(root: Path):
    """Start Orthanc with its database under ``root``; yields its URL (the REST API; DICOMweb at
    /dicom-web)."""
    port = free_port()
    config = {
        "Name": "medsam-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "wb") as log:
        process = subprocess.Popen(
            [ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process)
            yield url
        finally:
            process.kill()  # its database is a temporary folder: no need for a graceful shutdown
            process.wait(timeout=20)
