"""Real DICOM peers for integration tests: free ports, the dermnode service as a subprocess, DCMTK tools.

Every wait is bounded in time; every server is stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peers import PYNETDICOM_APP_NAMES, _wait_listening, dcmtk_tool

REPO = Path(__file__).resolve().parents[1]


def require(binary: str) -> str:
    """The path of ``binary`` (DCMTK's for the names pynetdicom's apps share), or skip the test."""
    path = dcmtk_tool(binary) if binary in PYNETDICOM_APP_NAMES else shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (make setup installs dcmtk and orthanc)")
    return path


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class DermnodeProcess:
    """``dermnode serve`` in a subprocess with its own storage root and config."""

    root: Path
    port: int
    env: dict[str, str]
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "service.log"

    def command(self, *args: str) -> list[str]:
        base = [sys.executable, "-m", "dermnode.cli"]
        if self.config is not None:
            base += ["--config", str(self.config)]
        return [*base, *args]

    def start(self, timeout: float = 90.0, args: Sequence[str] = ()) -> None:
        """Start ``dermnode serve [args]`` and wait (bounded) until something listens on :attr:`port`."""
        self.launch(*args)
        self.wait_ready(timeout)

    def launch(self, *args: str) -> None:
        """Start ``dermnode serve [args]`` without waiting (several processes can then load their models at once;
        :meth:`wait_ready` waits for each). The log is appended to :attr:`log_path` (kept across restarts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process lifetime
        self.proc = subprocess.Popen(self.command("serve", *args), env=self.env, stdout=log, stderr=log)
        log.close()

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until :attr:`port` listens (killing the process when it exits or the time is over)."""
        assert self.proc is not None
        try:
            _wait_listening(self.port, self.proc, timeout, self.log_path)
        except BaseException:
            self.proc.kill()
            self.proc.wait(10)
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def dermnode_env(root: Path, port: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    keep = ("DERMNODE_DATA", "DERMNODE_ANALYSIS__MODELS_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMNODE_") or k in keep}
    env.update(
        {
            "DERMNODE_STORAGE__ROOT": str(root / "var"),
            "DERMNODE_STORAGE__MIN_FREE_MB": "1",
            "DERMNODE_SCP__PORT": str(port),
            "DERMNODE_WORKERS__POLL_INTERVAL_S": "0.1",
            "DERMNODE_DELIVERY__POLL_INTERVAL_S": "0.2",
            "DERMNODE_WEB__ENABLED": "false",  # the console's fixed default port would collide between tests
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def run_tool(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a tool; ``storescu``, ``echoscu``, ... are DCMTK's even in an activated virtualenv (see ``require``)."""
    if args and args[0] in PYNETDICOM_APP_NAMES:
        args = [dcmtk_tool(args[0]) or args[0], *args[1:]]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def store_burst(port: int, files: list[Path], acked: list[str], called_aet: str = "DERMNODE") -> threading.Thread:
    """Send ``files`` over one pynetdicom association in a background thread, appending the SOP Instance UID of
    every instance answered with success to ``acked`` (the server may be killed at any point)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    from dermnode.dicom_io.uids import DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE

    def burst() -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
        try:
            for f in files:
                if not assoc.is_established:
                    break
                status = assoc.send_c_store(f)
                if status and status.Status == 0x0000:
                    acked.append(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        finally:
            if assoc.is_established:
                assoc.abort()

    thread = threading.Thread(target=burst, name="store-burst")
    thread.start()
    return thread
