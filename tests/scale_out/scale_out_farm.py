"""A scale-out farm on one machine for the tests and ``bench/scale_out.py`` (issue 15).

N ``dermnode serve --role receive`` + M ``--role analyze`` + K ``--role deliver`` processes on one throwaway
PostgreSQL cluster (``tests/pg.py``) and one shared storage root, delivering to Orthanc (``tests/peers.py``) and
the loopback FHIR server (``tests/fhir_server.py``). Receivers are ready when their SCP port listens; analyze and
deliver processes run the ``/healthz`` endpoint on a free port, which listens once their models are loaded.

Every wait is bounded in time; every server is stopped by PID. The exactly-once checks (:func:`check_once`) read
the jobs/deliveries tables, Orthanc's index and the FHIR server's request log.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from dermnode_proc import DermnodeProcess, dermnode_env
from fhir_server import FhirTestServer
from peers import Orthanc, dcmtk_tool, free_port, start_orthanc
from pg import PASSWORD, Cluster, running_cluster

CALLING_AET = "MODALITY"
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700


def write_sources(folder: Path, n: int, *, tag: str, rgb: np.ndarray | None = None) -> list[Path]:
    """``n`` JPEG Dermoscopic Photography Image files, each in its own study (so Orthanc's study = one source)."""
    from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
    from synthetic import synthetic_dermoscopy

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = rgb if rgb is not None else synthetic_dermoscopy(300, 400, seed=i)
        ds = wrap_rgb(image, WrapOptions(patient_id=f"SCALE-{tag}-{i}", patient_name="Scale^Out",
                                         pixel_spacing_mm=0.02, jpeg=True))
        path = folder / f"{tag}-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def send_each(port: int, files: Sequence[Path], *, called_aet: str = "DERMNODE",
              before_each: Callable[[int], None] | None = None,
              out: list[tuple[str, int | None]] | None = None,
              timeout_s: float = 30.0) -> list[tuple[str, int | None]]:
    """Send ``files`` over one pynetdicom association; ``(SOP Instance UID, status or None)`` per file sent (None:
    no answer, e.g. the receiver was killed; files after a broken association are not listed), appended to ``out``
    as they come (another thread may watch it) and returned. ``timeout_s``: ACSE, DIMSE and network timeouts (a
    killed receiver's association may only end with them)."""
    import pydicom
    from pydicom.uid import JPEGBaseline8Bit
    from pynetdicom import AE

    from dermnode.dicom_io.uids import DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE

    ae = AE(ae_title=CALLING_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE, JPEGBaseline8Bit)
    out = [] if out is None else out
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    try:
        for i, f in enumerate(files):
            if not assoc.is_established:
                break
            if before_each is not None:
                before_each(i)
            ds = pydicom.dcmread(f)
            status = assoc.send_c_store(ds)
            out.append((str(ds.SOPInstanceUID), int(status.Status) if status and "Status" in status else None))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def dcmtk_storescu() -> str | None:
    """DCMTK's ``storescu`` (not pynetdicom's Python app of the same name), or None."""
    return dcmtk_tool("storescu")


def storescu(port: int, files: Sequence[Path], *, called_aet: str = "DERMNODE") -> list[str]:
    """DCMTK ``storescu`` arguments for one association sending ``files`` (JPEG Baseline proposed)."""
    return [dcmtk_storescu() or "storescu", "-aet", CALLING_AET, "-aec", called_aet, "-R", "-xy",
            "-to", "30", "-ta", "30", "-td", "60", "127.0.0.1", str(port), *map(str, files)]


@dataclass
class Farm:
    """The running farm; ``processes`` by name (``receive-0``, ``analyze-1``, ``deliver-0``)."""

    cluster: Cluster
    orthanc: Orthanc
    fhir: FhirTestServer
    folder: Path
    storage: Path
    config: Path
    base_env: dict[str, str]
    processes: dict[str, DermnodeProcess] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    _conn: psycopg.Connection[dict[str, Any]] | None = None

    # -- processes ------------------------------------------------------------------------------------------
    def add(self, role: str, index: int, *, start: bool = True) -> DermnodeProcess:
        """Create (and launch, without waiting) ``dermnode serve --role ROLE``."""
        name = f"{role}-{index}"
        port = free_port()
        extra = dict(self.base_env)
        if role != "receive":  # /healthz listens once the models are loaded: the readiness signal
            extra.update({"DERMNODE_HTTP__ENABLED": "true", "DERMNODE_HTTP__PORT": str(port)})
            extra["DERMNODE_SCP__PORT"] = str(free_port())  # unused (no SCP), kept apart anyway
        root = self.folder / name
        env = dermnode_env(root, port, extra)
        env["DERMNODE_STORAGE__ROOT"] = str(self.storage)
        proc = DermnodeProcess(root, port, env, config=self.config)
        self.processes[name] = proc
        self.roles[name] = role
        if start:
            proc.launch("--role", role)
        return proc

    def restart(self, name: str, timeout: float = 120.0) -> None:
        proc = self.processes[name]
        proc.launch("--role", self.roles[name])
        proc.wait_ready(timeout)

    def by_role(self, role: str) -> list[DermnodeProcess]:
        return [p for n, p in self.processes.items() if n.startswith(role + "-")]

    def alive(self, role: str) -> list[DermnodeProcess]:
        return [p for p in self.by_role(role) if p.proc is not None and p.proc.poll() is None]

    def logs(self, role: str) -> str:
        return "".join(p.log() for p in self.by_role(role))

    # -- state ----------------------------------------------------------------------------------------------
    def sql(self, query: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of ``query`` on the shared state; reconnects after a PostgreSQL restart (raises while it is down)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.cluster.dsn, password=PASSWORD, autocommit=True, row_factory=dict_row,
                                         connect_timeout=5)
        try:
            cur = self._conn.execute(query, tuple(args))
            return list(cur.fetchall()) if cur.description is not None else []
        except psycopg.OperationalError:
            self._conn.close()
            raise

    def jobs(self, uids: Sequence[str]) -> list[dict[str, Any]]:
        return self.sql("SELECT * FROM jobs WHERE sop_instance_uid = ANY(%s) ORDER BY id", (list(uids),))

    def deliveries(self, uids: Sequence[str]) -> list[dict[str, Any]]:
        return self.sql(
            "SELECT d.*, j.sop_instance_uid FROM deliveries d JOIN jobs j ON j.id = d.job_id"
            " WHERE j.sop_instance_uid = ANY(%s) ORDER BY d.id",
            (list(uids),),
        )

    def processed(self, uids: Sequence[str]) -> bool:
        """Every job of ``uids`` done and every delivery of them done (deliveries are queued before the job
        closes, so a done job has all its rows)."""
        try:
            jobs = self.jobs(uids)
            if len(jobs) != len(set(uids)) or any(j["state"] != "done" for j in jobs):
                return False
            dels = self.deliveries(uids)
        except psycopg.OperationalError:
            return False
        return {d["job_id"] for d in dels} == {j["id"] for j in jobs} and all(d["state"] == "done" for d in dels)

    def wait_processed(self, uids: Sequence[str], timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.processed(uids):
                return
            time.sleep(0.25)
        try:
            jobs = self.jobs(uids)
            state = f"jobs {dict(Counter((j['state'], j['outcome']) for j in jobs))} (of {len(jobs)}), deliveries " \
                f"{dict(Counter(d['state'] for d in self.deliveries(uids)))}"
        except psycopg.OperationalError as exc:
            state = f"state database unavailable: {exc}"
        raise TimeoutError(f"{len(set(uids))} images not all processed after {timeout}s: {state}")

    # -- peers ----------------------------------------------------------------------------------------------
    def orthanc_by_study(self) -> dict[str, list[str]]:
        """Study Instance UID -> SOP Instance UIDs Orthanc holds (three REST calls, whatever the count)."""
        studies = {s["ID"]: s["MainDicomTags"]["StudyInstanceUID"] for s in self.orthanc.get("/studies?expand")}
        series = {s["ID"]: studies[s["ParentStudy"]] for s in self.orthanc.get("/series?expand")}
        out: dict[str, list[str]] = {}
        for inst in self.orthanc.get("/instances?expand", timeout=60.0):
            out.setdefault(series[inst["ParentSeries"]], []).append(inst["MainDicomTags"]["SOPInstanceUID"])
        return out

    def fhir_posts_per_source(self, uids: Sequence[str]) -> Counter[str]:
        """How many FHIR POSTs (transaction bundles) name each source SOP Instance UID."""
        wanted = set(uids)
        found: Counter[str] = Counter()
        pattern = re.compile(rb"[0-9]+(?:\.[0-9]+){4,}")
        for req in self.fhir.requests:
            if req.method != "POST":
                continue
            for uid in {m.decode() for m in pattern.findall(req.body)} & wanted:
                found[uid] += 1
        return found

    def analysed_lines(self) -> Counter[str]:
        """SOP Instance UID -> number of ``analysed <uid>`` lines in every analyze process's log."""
        return Counter(re.findall(r"analysed ([0-9.]+):", self.logs("analyze")))


@dataclass
class OnceReport:
    jobs: int
    deliveries: int
    orthanc_instances: int
    fhir_posts: int
    outcomes: dict[str, int]


def check_once(farm: Farm, uids: Sequence[str], *, analysed_at_most_twice: Sequence[str] = ()) -> OnceReport:
    """Assert that each of ``uids`` was analysed once and each of its results delivered once.

    * one job per image, ``done``; every delivery ``done`` on its first attempt;
    * Orthanc holds, in the image's study, exactly the SOP Instance UIDs of its DICOM deliveries (a second
      analysis with new output UIDs, or a second delivery row, would show up as an extra instance or row);
    * the FHIR server got exactly one POST naming the image per FHIR delivery (one per bundle);
    * the analyze logs say ``analysed <uid>`` once (``analysed_at_most_twice``: an image whose first worker was
      killed mid-job may have been logged by it before it died; the survivor logs it once).
    """
    uids = list(dict.fromkeys(uids))
    jobs = farm.jobs(uids)
    assert sorted(j["sop_instance_uid"] for j in jobs) == sorted(uids), "one job per acknowledged image"
    assert all(j["state"] == "done" for j in jobs), [(j["id"], j["state"], j["last_error"]) for j in jobs]
    dels = farm.deliveries(uids)
    assert all(d["state"] == "done" for d in dels)
    keys = Counter((d["destination"], d["object_key"]) for d in dels)
    assert max(keys.values(), default=1) == 1
    first_try = [d for d in dels if d["attempts"] != 1]
    assert not first_try, f"deliveries sent more than once: {[(d['id'], d['attempts']) for d in first_try]}"
    study_of = {j["sop_instance_uid"]: j["study_instance_uid"] for j in jobs}
    dicom: dict[str, set[str]] = {}
    fhir: Counter[str] = Counter()
    for d in dels:
        if d["kind"] == "dicom":
            dicom.setdefault(d["sop_instance_uid"], set()).add(d["object_key"])
        else:
            fhir[d["sop_instance_uid"]] += 1
    orthanc = farm.orthanc_by_study()
    for uid in uids:
        held = orthanc.get(study_of[uid], [])
        assert len(held) == len(set(held)) and set(held) == dicom.get(uid, set()), (uid, held, dicom.get(uid))
    posts = farm.fhir_posts_per_source(uids)
    assert {u: posts[u] for u in uids if posts[u] or fhir[u]} == {u: fhir[u] for u in uids if posts[u] or fhir[u]}, \
        "one FHIR POST per bundle"
    assert all(n == 1 for n in fhir.values())
    lines = farm.analysed_lines()
    for uid in uids:
        limit = 2 if uid in analysed_at_most_twice else 1
        assert 1 <= lines[uid] <= limit, (uid, lines[uid])
    return OnceReport(
        jobs=len(jobs),
        deliveries=len(dels),
        orthanc_instances=sum(len(orthanc.get(study_of[u], [])) for u in uids),
        fhir_posts=sum(posts[u] for u in uids),
        outcomes=dict(Counter(str(j["outcome"]) for j in jobs)),
    )


@contextlib.contextmanager
def running_farm(folder: Path, *, receivers: int = 2, analyzers: int = 2, deliverers: int = 1,
                 lease_s: float = 3.0, extra_env: dict[str, str] | None = None,
                 ready_timeout: float = 180.0) -> Iterator[Farm]:
    """Start PostgreSQL, Orthanc, the FHIR server and the dermnode processes (all launched at once, then waited
    for); stop everything by PID at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(running_cluster())
        orthanc = start_orthanc(folder / "orthanc")
        stack.callback(orthanc.stop)
        fhir = FhirTestServer().start()
        stack.callback(fhir.stop)
        config = folder / "dermnode.toml"
        config.write_text(
            f'[[pacs]]\nname = "orthanc"\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
            f"port = {orthanc.dicom_port}\n"
        )
        base_env = {
            "DERMNODE_STATE__BACKEND": "postgresql",
            "DERMNODE_STATE__DSN": cluster.dsn,
            "DERMNODE_STATE__PASSWORD": PASSWORD,
            "DERMNODE_STATE__LEASE_S": str(lease_s),
            "DERMNODE_STATE__NOTIFY_POLL_S": "0.5",
            "DERMNODE_STATE__CONNECT_TIMEOUT_S": "3",
            "DERMNODE_WORKERS__COUNT": "1",
            "DERMNODE_WORKERS__MAX_ATTEMPTS": "5",
            "DERMNODE_WORKERS__RETRY_DELAY_S": "0.5",
            "DERMNODE_WORKERS__RETRY_DELAY_MAX_S": "2",
            "DERMNODE_WORKERS__SHUTDOWN_GRACE_S": "10",
            "DERMNODE_FHIR__BASE_URL": fhir.url,
            "DERMNODE_FHIR__PATIENT_IDENTIFIER_SYSTEM": "http://hospital.example/mrn",
            "DERMNODE_DELIVERY__BACKOFF_INITIAL_S": "0.5",
            "DERMNODE_DELIVERY__BACKOFF_MAX_S": "2",
            "DERMNODE_ANALYSIS__TORCH_THREADS": "1",
            **(extra_env or {}),
        }
        farm = Farm(cluster, orthanc, fhir, folder, folder / "shared-storage", config, base_env)

        def stop_all() -> None:
            for proc in farm.processes.values():
                with contextlib.suppress(Exception):
                    proc.stop(timeout=30)
            if farm._conn is not None:
                farm._conn.close()

        stack.callback(stop_all)
        # the schema is created by the first process; starting them together is the concurrent-migration case
        for role, n in (("receive", receivers), ("analyze", analyzers), ("deliver", deliverers)):
            for i in range(n):
                farm.add(role, i)
        threads = [threading.Thread(target=p.wait_ready, args=(ready_timeout,)) for p in farm.processes.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(ready_timeout + 15)
        dead = [n for n, p in farm.processes.items() if p.proc is None or p.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"not started: {dead}\n" + "\n".join(farm.processes[n].log()[-2000:] for n in dead))
        yield farm
