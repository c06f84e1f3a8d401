"""Shared helpers of the speed benchmarks (``bench/ingest.py``, ``bench/end_to_end.py``, ``bench/run_all.py``).

The peers (``dermnode serve`` as a subprocess, DCMTK ``storescp``, Orthanc, the loopback FHIR server) are the
test helpers under ``tests/``; this module only puts ``tests/`` on ``sys.path`` and adds what the benchmarks
need on top: realistic input files, DCMTK ``storescu`` runs (one or several associations at once), a mix of
``storescu`` and pynetdicom client processes started together (``send_mixed``), percentiles, peak memory of a
process and a description of the machine.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import select
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` added to ``os.environ`` for what is started inside (the Orthanc of ``tests/peers`` inherits it)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: The environment of a DCMTK program (storescu, storescp, Orthanc) with Nagle's algorithm off: DCMTK >= 3.6.2
#: leaves it on unless ``TCP_NODELAY=1`` is set, and then stalls small writes on the peer's delayed ACK (~40 ms).
DCMTK_NODELAY = {"TCP_NODELAY": "1"}


def dcmtk_tool(name: str) -> str:
    """The DCMTK program ``name`` (``storescu``, ``storescp``) on ``PATH``, skipping the virtual environment's
    ``bin`` folder: pynetdicom installs Python apps of the same names there, which an activated venv puts first."""
    venv_bin = Path(sys.prefix, "bin").resolve()
    folders = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != venv_bin]
    return shutil.which(name, path=os.pathsep.join(folders)) or f"/usr/bin/{name}"


def storescu_args(port: int, files: Sequence[Path], *, jpeg: bool, called_aet: str,
                  calling_aet: str = CALLING_AET) -> list[str]:
    """DCMTK ``storescu -v -R -xy|-xe``: contexts for what the files hold (JPEG Baseline or uncompressed)."""
    return [dcmtk_tool("storescu"), "-v", "-aet", calling_aet, "-aec", called_aet, "-R", "-xy" if jpeg else "-xe",
            "127.0.0.1", str(port), *map(str, files)]


@dataclass
class SendResult:
    wall_s: float
    returncodes: list[int]
    success_responses: int
    other_responses: int
    ack_times: list[float]  # time.time() when each client process returned
    errors: str
    acknowledged: list[str]  # paths of the files answered with a success status
    kind: str = "storescu"  # or "pynetdicom"
    files: int = 0  # files handed to the clients of this kind
    associations_rejected: int = 0  # A-ASSOCIATE-RJ received
    statuses: dict[str, int] = field(default_factory=dict)  # response status -> count
    associations: list[dict[str, Any]] = field(default_factory=list)  # per client process (send_mixed only)

    @property
    def failed(self) -> int:
        """Files of this kind not acknowledged with a success status (error/warning status, no response, never
        sent because the association was rejected or aborted)."""
        return self.files - len(self.acknowledged)


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


STORE_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def parse_storescu(logs: Sequence[str], returncodes: list[int], *, wall_s: float, ack_times: list[float],
                   files: int) -> SendResult:
    """The outcome of ``storescu -v`` runs (one log per process/association)."""
    text = "\n".join(logs)
    statuses: dict[str, int] = {}
    for status in STORE_RESPONSE.findall(text):
        statuses[status] = statuses.get(status, 0) + 1
    ok = statuses.get("Success", 0)
    errors = "\n".join(line for line in text.splitlines() if line.startswith(("E:", "F:")))
    acked = [a for log in logs for a in _acknowledged(log)]
    rejected = sum(1 for log in logs if "Association Rejected" in log)
    return SendResult(wall_s, returncodes, ok, sum(statuses.values()) - ok, ack_times, errors, acked,
                      kind="storescu", files=files, associations_rejected=rejected, statuses=statuses)


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
    return parse_storescu(logs, [p.returncode for p in procs], wall_s=wall, ack_times=ack_times, files=len(files))


# --- storescu and pynetdicom clients together ----------------------------------------------------------------
@dataclass
class MixedSendResult:
    wall_s: float  # first client started -> last client exited
    by_kind: dict[str, SendResult]  # "storescu", "pynetdicom"
    started_at: float  # time.time() when the clients were released (pynetdicom "go", storescu started)

    @property
    def acknowledged(self) -> list[str]:
        """Paths answered with a success status (0x0000), by either client kind."""
        return [a for r in self.by_kind.values() for a in r.acknowledged]

    @property
    def success_responses(self) -> int:
        return sum(r.success_responses for r in self.by_kind.values())

    @property
    def associations_rejected(self) -> int:
        return sum(r.associations_rejected for r in self.by_kind.values())


def _set_nodelay(event: Any) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def pynetdicom_client(spec_file: str) -> int:
    """One pynetdicom SCU association sending the files of ``spec_file`` (JSON); run in its own process.

    Spec: ``files``, ``port``, ``called_aet``, ``calling_aet``, ``timeout_s`` (ACSE/DIMSE/network timeouts),
    ``nodelay`` (set ``TCP_NODELAY`` on the socket with an ``EVT_CONN_OPEN`` handler; pynetdicom leaves it off),
    ``result`` (where the outcome is written as JSON). The files are read and the presentation contexts built
    first (one per SOP Class with the files' transfer syntaxes); then ``ready`` is printed and the process waits
    for ``go`` on stdin, so that all clients start their associations together. Every C-STORE response status is
    recorded (``None``: no response, e.g. a DIMSE timeout or an aborted association).
    """
    from pydicom import dcmread
    from pynetdicom import AE, evt

    spec = json.loads(Path(spec_file).read_text())
    paths: list[str] = spec["files"]
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=spec["calling_aet"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = float(spec["timeout_s"])
    contexts: dict[str, set[str]] = {}
    for ds in datasets:
        contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, _set_nodelay)] if spec["nodelay"] else []
    out: dict[str, Any] = {"contexts": {k: sorted(v) for k, v in contexts.items()}, "nodelay": bool(spec["nodelay"]),
                           "association": "not started", "responses": [], "error": ""}
    print("ready", flush=True)
    if sys.stdin.readline().strip() == "go":
        out["started_at"] = time.time()
        try:
            assoc = ae.associate("127.0.0.1", int(spec["port"]), ae_title=spec["called_aet"], evt_handlers=handlers)
            if assoc.is_established:
                out["association"] = "established"
                for path, ds in zip(paths, datasets, strict=True):
                    if not assoc.is_established:
                        out["association"] = "aborted"
                        break
                    rsp = assoc.send_c_store(ds)
                    status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                    out["responses"].append({"path": path, "sop_instance_uid": str(ds.SOPInstanceUID),
                                             "status": None if status is None else f"0x{status:04X}",
                                             "t": time.time()})
                if assoc.is_established:
                    assoc.release()
            elif assoc.is_rejected:
                prim = assoc.acceptor.primitive
                out["association"] = "rejected"
                out["error"] = (f"result {getattr(prim, 'result_str', '?')}, "
                                f"source {getattr(prim, 'result_source', '?')}, "
                                f"diagnostic {getattr(prim, 'diagnostic', '?')}")
            elif assoc.is_aborted:
                out["association"] = "aborted"
            else:
                out["association"] = "failed"  # no connection, or no A-ASSOCIATE-AC in time
        except Exception as exc:  # recorded, not raised: the harness reads the outcome from the file
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["ended_at"] = time.time()
    Path(spec["result"]).write_text(json.dumps(out))
    ok = out["association"] == "established" and len(out["responses"]) == len(paths) and all(
        r["status"] == "0x0000" for r in out["responses"])
    return 0 if ok else 1


def pynetdicom_client_args(spec_file: Path) -> list[str]:
    """A separate Python process (no GIL shared with the harness) running ``pynetdicom_client``."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "from common import pynetdicom_client; raise SystemExit(pynetdicom_client(sys.argv[1]))")
    return [sys.executable, "-c", code, str(spec_file)]


def _pynetdicom_result(outcomes: Sequence[dict[str, Any]], parts: Sequence[Sequence[Path]], returncodes: list[int],
                       *, wall_s: float, ack_times: list[float]) -> SendResult:
    statuses: dict[str, int] = {}
    acked: list[str] = []
    errors: list[str] = []
    for i, o in enumerate(outcomes):
        for r in o.get("responses", []):
            key = r["status"] or "none"
            statuses[key] = statuses.get(key, 0) + 1
            if r["status"] == "0x0000":
                acked.append(r["path"])
        if o.get("error") or o.get("association") != "established":
            errors.append(f"pynetdicom client {i}: association {o.get('association')}: {o.get('error', '')}")
    ok = statuses.get("0x0000", 0)
    return SendResult(
        wall_s, returncodes, ok, sum(statuses.values()) - ok, ack_times, "\n".join(errors), acked, kind="pynetdicom",
        files=sum(len(p) for p in parts),
        associations_rejected=sum(1 for o in outcomes if o.get("association") == "rejected"), statuses=statuses,
        associations=[{"association": o.get("association"), "files": len(p), "responses": len(o.get("responses", [])),
                       "error": o.get("error", ""), "returncode": rc}
                      for o, p, rc in zip(outcomes, parts, returncodes, strict=True)])


def send_mixed(port: int, files: Sequence[Path], *, jpeg: bool, called_aet: str, associations: int,
               pynetdicom_associations: int, work: Path, timeout_s: float, nodelay: bool = False,
               ready_timeout_s: float = 120.0) -> MixedSendResult:
    """Send ``files`` over ``associations`` concurrent associations, ``pynetdicom_associations`` of them from
    pynetdicom client processes (``pynetdicom_client``) and the others from ``storescu`` processes.

    The files are split round-robin into ``associations`` parts; the last ``pynetdicom_associations`` parts go to
    the pynetdicom clients. The pynetdicom processes are started first and the harness waits (at most
    ``ready_timeout_s``) until each has loaded its files; then the clock starts, the pynetdicom clients are told
    to go and the ``storescu`` processes are started, so all associations open together. ``nodelay``: both kinds
    with Nagle's algorithm off (``TCP_NODELAY=1`` for storescu, the socket option for pynetdicom); default: both
    with their own defaults (Nagle on). Every process still running after ``timeout_s`` is killed by its PID;
    logs, specs and outcomes are kept under ``work``.
    """
    parts = split(list(files), associations)
    k = min(pynetdicom_associations, len(parts))
    s_parts, p_parts = parts[:len(parts) - k], parts[len(parts) - k:]
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"TCP_NODELAY": "1"} if nodelay else {})}
    pyn: list[subprocess.Popen[str]] = []
    scu: list[subprocess.Popen[str]] = []
    ended: dict[int, float] = {}
    try:
        for i, part in enumerate(p_parts):
            spec = work / f"pynetdicom-{i}.json"
            spec.write_text(json.dumps({
                "files": [str(p) for p in part], "port": port, "called_aet": called_aet,
                "calling_aet": f"BENCHPYN{i:02d}"[:16], "timeout_s": 60, "nodelay": nodelay,
                "result": str(work / f"pynetdicom-{i}.result.json")}))
            with open(work / f"pynetdicom-{i}.log", "w") as err:
                pyn.append(subprocess.Popen(pynetdicom_client_args(spec), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=err, text=True, env=env))
        ready_deadline = time.monotonic() + ready_timeout_s
        for i, p in enumerate(pyn):
            assert p.stdout is not None
            line = ""
            while not line and time.monotonic() < ready_deadline and p.poll() is None:
                r, _, _ = select.select([p.stdout], [], [], 0.5)
                if r:
                    line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"pynetdicom client {i} not ready within {ready_timeout_s} s (rc {p.poll()}): "
                                   f"{(work / f'pynetdicom-{i}.log').read_text()[-2000:]}")
        t0, started_at = time.perf_counter(), time.time()
        for p in pyn:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.close()
        for i, part in enumerate(s_parts):
            with open(work / f"storescu-{i}.log", "w") as log:
                scu.append(subprocess.Popen(storescu_args(port, part, jpeg=jpeg, called_aet=called_aet), env=env,
                                            stdout=log, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in (*pyn, *scu):
                if p.pid not in ended and p.poll() is not None:
                    ended[p.pid] = time.perf_counter()
            if len(ended) == len(pyn) + len(scu):
                break
            time.sleep(0.02)
    finally:
        for p in (*pyn, *scu):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    now = time.perf_counter()  # a process killed at the deadline counts as ending now

    def wall(procs: Sequence[subprocess.Popen[str]]) -> float:
        return max((ended.get(p.pid, now) for p in procs), default=t0) - t0

    def ack_times(procs: Sequence[subprocess.Popen[str]]) -> list[float]:
        return [time.time() - (now - ended.get(p.pid, now)) for p in procs]

    s_logs = [(work / f"storescu-{i}.log").read_text() for i in range(len(scu))]
    by_kind = {"storescu": parse_storescu(s_logs, [p.returncode for p in scu], wall_s=wall(scu),
                                          ack_times=ack_times(scu), files=sum(len(p) for p in s_parts))}
    outcomes = []
    for i in range(len(pyn)):
        res = work / f"pynetdicom-{i}.result.json"
        outcomes.append(json.loads(res.read_text()) if res.is_file()
                        else {"association": "killed or crashed", "responses": [],
                              "error": (work / f"pynetdicom-{i}.log").read_text()[-2000:]})
    by_kind["pynetdicom"] = _pynetdicom_result(outcomes, p_parts, [p.returncode for p in pyn], wall_s=wall(pyn),
                                               ack_times=ack_times(pyn))
    return MixedSendResult(wall((*pyn, *scu)), by_kind, started_at)


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
        "dcmtk": _cmd_version([dcmtk_tool("storescu"), "--version"], r"storescu v([\d.]+)"),
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
