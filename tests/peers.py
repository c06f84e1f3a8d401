"""Reusable DICOM peers for integration tests: DCMTK ``storescp`` and Orthanc on free loopback ports.

Every wait is bounded in time; every server is stopped by its PID (terminate, bounded wait, then kill).
A missing binary makes the calling test skip with the reason.

Usage::

    scp = start_storescp(tmp_path / "in")      # scp.port, scp.aet, scp.directory, scp.received()
    try: ...
    finally: scp.stop()

    orthanc = start_orthanc(tmp_path / "orthanc")  # .dicom_port, .http_port, .aet, .instances(), .stop()
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ORTHANC_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: DCMTK programs that pynetdicom also installs, as Python apps of the same name, in the virtualenv's ``bin``
#: (first on ``PATH`` once the venv is activated): the tests want DCMTK's.
PYNETDICOM_APP_NAMES = frozenset(
    {"echoscu", "echoscp", "findscu", "getscu", "movescu", "qrscp", "storescp", "storescu"}
)


def dcmtk_tool(name: str) -> str | None:
    """The DCMTK program ``name`` on ``PATH`` (then /usr/bin), skipping scripts: pynetdicom's Python apps of the
    same names (``storescu``, ``storescp``, ``echoscu``, ...) come first on ``PATH`` in an activated virtualenv and
    take other options. ``None`` when DCMTK's is not installed."""
    import os

    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        candidate = Path(folder or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            try:
                with candidate.open("rb") as fh:
                    if fh.read(2) == b"#!":
                        continue
            except OSError:
                continue
            return str(candidate)
    return None


def _which(*candidates: str) -> str:
    for name in candidates:
        path = dcmtk_tool(name) if name in PYNETDICOM_APP_NAMES else shutil.which(name)
        if path is not None:
            return path
    pytest.skip(f"{candidates[0]} is not installed")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"peer exited with {proc.returncode} before listening on {port}\n{tail}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Poll ``predicate()`` until it returns a truthy value (returned) or ``timeout`` seconds pass (None)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= end:
            return value
        time.sleep(interval)


@dataclass
class StoreScp:
    """A running DCMTK ``storescp``."""

    proc: subprocess.Popen[bytes]
    port: int
    aet: str
    directory: Path
    log: Path

    def received(self) -> list[Path]:
        """Files stored so far (storescp writes complete files under ``directory``)."""
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def stop(self) -> None:
        _stop(self.proc)


def start_storescp(directory: Path, aet: str = "TEST", timeout: float = 30.0) -> StoreScp:
    """Start ``storescp -od DIRECTORY -aet AET +xa PORT`` (accepts all transfer syntaxes it knows).

    Skips the test when storescp is not installed.
    """
    binary = _which("storescp")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = directory.parent / f"storescp-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "-od", str(directory), "-aet", aet, "+xa", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(port, proc, timeout, log)
    except BaseException:
        _stop(proc)
        raise
    return StoreScp(proc=proc, port=port, aet=aet, directory=directory, log=log)


@dataclass
class Orthanc:
    """A running Orthanc with its DICOM and (loopback-only) HTTP ports."""

    proc: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int
    aet: str
    root: Path
    log: Path

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``path`` of the REST API and decode the JSON answer."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout) as rsp:
            return json.loads(rsp.read().decode())

    def instances(self) -> list[str]:
        """Orthanc identifiers of the stored instances."""
        return list(self.get("/instances"))

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of the stored instances."""
        return {self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in self.instances()}

    def stop(self) -> None:
        _stop(self.proc, timeout=30.0)


def start_orthanc(
    root: Path,
    aet: str = "ORTHANC",
    timeout: float = 60.0,
    *,
    dicom_port: int | None = None,
    http_port: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Orthanc:
    """Start ``Orthanc --no-jobs CONFIG`` with storage under ``root`` and free DICOM/HTTP ports.

    HTTP listens on loopback only (RemoteAccessAllowed false), without authentication, no plugins. Skips
    the test when Orthanc is not installed. Give the ports of a stopped Orthanc (and the same ``root``) to
    restart it on its database; ``extra`` adds configuration keys (e.g. ``DicomModalities``).
    """
    binary = _which(*ORTHANC_CANDIDATES)
    root.mkdir(parents=True, exist_ok=True)
    dicom_port = dicom_port or free_port()
    http_port = http_port or free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = {
        "Name": "dermnode-test",
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "Plugins": [],
        "StableAge": 1,
        **(extra or {}),
    }
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = root / "orthanc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "--no-jobs", str(cfg)], stdout=out, stderr=subprocess.STDOUT, cwd=root)
    handle = Orthanc(proc=proc, dicom_port=dicom_port, http_port=http_port, aet=aet, root=root, log=log)
    try:
        _wait_listening(http_port, proc, timeout, log)
        _wait_listening(dicom_port, proc, timeout, log)

        def ready() -> bool:
            try:
                return bool(handle.get("/system", timeout=2.0))
            except (urllib.error.URLError, OSError, ValueError):
                return False

        if not wait_until(ready, timeout=timeout):
            raise TimeoutError(f"Orthanc REST API not ready after {timeout}s")
    except BaseException:
        handle.stop()
        raise
    return handle
