"""Shared helpers of the speed benchmarks (``bench/ingest.py``, ``bench/end_to_end.py``, ``bench/run_all.py``).

The peers (``dermnode serve`` as a subprocess, DCMTK ``storescp``, Orthanc, the loopback FHIR server) are the
test helpers under ``tests/``; this module only puts ``tests/`` on ``sys.path`` and adds what the benchmarks
need on top: realistic input files, DCMTK ``storescu`` runs (one or several associations at once), percentiles,
peak memory of a process and a description of the machine.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import numpy as np  # noqa: E402

WIDTH, HEIGHT = 768, 576
CALLING_AET = "BENCHSCU"
T = TypeVar("T")


def data_root() -> Path:
    """``$DERMNODE_DATA``, else ``<repo>/../shared/data`` (may be absent: synthetic images are used then)."""
    return Path(os.environ.get("DERMNODE_DATA", REPO.parent / "shared" / "data"))


def source_paths(limit: int = 60) -> list[Path]:
    """Real dermoscopy photographs: the HAM10000 sample (600x450) first, then ISIC 2017 validation images."""
    root = data_root()
    paths = sorted((root / "ham10000-sample" / "images").glob("*.jpg"))
    labels = root / "isic2017" / "labels.csv"
    if labels.is_file():
        for line in labels.read_text().splitlines()[1:]:
            fields = line.split(",")
            if len(fields) > 1 and fields[1] == "val":
                p = root / "isic2017" / "images" / f"{fields[0]}.jpg"
                if p.is_file():
                    paths.append(p)
            if len(paths) >= limit:
                break
    return paths[:limit]


def source_images(n_distinct: int = 60) -> tuple[list[np.ndarray], str]:
    """Up to ``n_distinct`` RGB images at 768x576 and a description of where they come from."""
    import cv2

    paths = source_paths(n_distinct)
    if paths:
        imgs = []
        for p in paths:
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            imgs.append(cv2.resize(rgb, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC))
        if imgs:
            n_ham = sum(1 for p in paths if "ham10000" in str(p))
            return imgs, (f"{len(imgs)} real dermoscopy photographs ({n_ham} HAM10000 600x450, "
                          f"{len(imgs) - n_ham} ISIC 2017 val 256x256) resized to {WIDTH}x{HEIGHT}")
    from synthetic import synthetic_dermoscopy

    imgs = [synthetic_dermoscopy(HEIGHT, WIDTH, seed=i) for i in range(min(n_distinct, 10))]
    return imgs, f"{len(imgs)} synthetic lesions {WIDTH}x{HEIGHT} (no shared data found)"


@dataclass(frozen=True)
class SourceFile:
    path: Path
    sop_instance_uid: str
    size: int


def write_dicoms(out: Path, n: int, *, jpeg: bool, images: Sequence[np.ndarray], tag: str = "") -> list[SourceFile]:
    """``n`` Dermoscopic Photography Image files (unique UIDs) cycling through ``images``; 0.02 mm/pixel."""
    from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        ds = wrap_rgb(images[i % len(images)], WrapOptions(patient_id=f"BENCH{i:05d}", patient_name="Bench^Patient",
                                                           pixel_spacing_mm=0.02, jpeg=jpeg))
        path = out / f"{tag}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(SourceFile(path, str(ds.SOPInstanceUID), path.stat().st_size))
    return files


def storescu_args(port: int, files: Sequence[Path], *, jpeg: bool, called_aet: str,
                  calling_aet: str = CALLING_AET) -> list[str]:
    """``storescu -v -R -xy|-xe``: contexts for what the files hold (JPEG Baseline or uncompressed)."""
    return ["storescu", "-v", "-aet", calling_aet, "-aec", called_aet, "-R", "-xy" if jpeg else "-xe",
            "127.0.0.1", str(port), *map(str, files)]


@dataclass
class SendResult:
    wall_s: float
    returncodes: list[int]
    success_responses: int
    other_responses: int
    ack_times: list[float]  # time.time() when each storescu process returned
    errors: str
    acknowledged: list[str]  # paths of the files answered with a success status


def _acknowledged(text: str) -> list[str]:
    """Files answered with success, from ``storescu -v`` output ("Sending file: X" ... "Store Response (Success)")."""
    current, out = None, []
    for line in text.splitlines():
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: "):].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            out.append(current)
            current = None
    return out


def split(items: Sequence[T], k: int) -> list[list[T]]:
    """Round-robin split into ``k`` non-empty parts (fewer when there are fewer items)."""
    parts: list[list[T]] = [list(items[i::k]) for i in range(max(1, k))]
    return [p for p in parts if p]


def send_parallel(port: int, files: Sequence[Path], *, jpeg: bool, called_aet: str, associations: int,
                  timeout_s: float, env: dict[str, str] | None = None) -> SendResult:
    """Send ``files`` with ``associations`` concurrent ``storescu`` processes (one association each).

    The wall time runs from just before the first process is started until the last one has exited.
    Every process is killed (by its PID) if it is still running after ``timeout_s``. ``env`` adds environment
    variables for storescu (e.g. ``TCP_NODELAY=1``).
    """
    parts = split(list(files), associations)
    logs = []
    procs: list[subprocess.Popen[str]] = []
    penv = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    try:
        for part in parts:
            procs.append(subprocess.Popen(storescu_args(port, part, jpeg=jpeg, called_aet=called_aet), env=penv,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + timeout_s
        ack_times = []
        for p in procs:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            ack_times.append(time.time())
            logs.append(out)
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    text = "\n".join(logs)
    ok = len(re.findall(r"Received Store Response \(Success\)", text))
    other = len(re.findall(r"Received Store Response \((?!Success)", text))
    errors = "\n".join(line for line in text.splitlines() if line.startswith(("E:", "F:")))
    acked = [a for log in logs for a in _acknowledged(log)]
    return SendResult(wall, [p.returncode for p in procs], ok, other, ack_times, errors, acked)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in 0..100; NaN for no values."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "mean": float(np.mean(values)) if values else math.nan,
            "p50": percentile(values, 50), "p95": percentile(values, 95),
            "max": float(max(values)) if values else math.nan}


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM`` peak RSS, ``VmRSS``); None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def wait_until(predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.2) -> T:
    """Poll ``predicate`` until truthy (returned) or ``timeout_s`` passes (its last value is returned)."""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= end:
            return value
        time.sleep(interval_s)


def db_rows(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read-only query of dermnode's state database (WAL: readers do not block the service)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30.0)
    try:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def _cmd_version(args: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "unknown"


def machine_info() -> dict[str, Any]:
    """Machine, load and software versions, for the report."""
    import pydicom
    import pynetdicom

    import dermnode

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    versions: dict[str, str] = {
        "python": platform.python_version(),
        "dermnode": dermnode.__version__,
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "numpy": np.__version__,
        "sqlite": sqlite3.sqlite_version,
        "dcmtk": _cmd_version(["storescu", "--version"], r"storescu v([\d.]+)"),
        "orthanc": _cmd_version([orthanc_binary(), "--version"], r"Orthanc ([\d.]+)"),
    }
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        versions["torch"] = "not installed"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=30).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(mem_kb / 1048576, 1),
        "kernel": platform.release(),
        "loadavg_at_start": list(os.getloadavg()),
        "git_commit": commit,
        "versions": versions,
    }


def orthanc_binary() -> str:
    return shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def busy_processes(pattern: str = "train|pytest") -> list[str]:
    """Command lines of running processes that match ``pattern`` (to warn that numbers are disturbed)."""
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, timeout=30).stdout
    me = str(os.getpid())
    return [line for line in out.splitlines() if line and not line.startswith(me + " ") and "pgrep" not in line]
