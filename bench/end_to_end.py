"""End-to-end speed of the full stack: modality (``storescu``, pynetdicom) → ``dermnode serve`` → Orthanc + FHIR.

Usage::

    .venv/bin/python bench/end_to_end.py [--sequential 20] [--load 20x50] [--pynetdicom-associations K]
                                         [--client-nodelay] [--throughput-images 30]
                                         [--throughput-configs 1 2 2:2] [--out bench/results/x.json]

A phase is skipped with ``--sequential 0``, ``--load 0x0``, ``--throughput-images 0`` or an empty
``--throughput-configs``; e.g. only the load phase: ``--sequential 0 --load 20x50 --throughput-images 0``.

The stack is the one of ``tests/test_end_to_end.py``, started with the test helpers: Orthanc 1.10 on free
loopback ports (``tests/peers.start_orthanc``) as the PACS, the loopback FHIR server
(``tests/fhir_server.FhirTestServer``) as the EHR, and ``dermnode serve`` as a subprocess
(``tests/dermnode_proc.DermnodeProcess``) with one ``[[pacs]]`` table pointing to Orthanc and ``fhir.base_url``
pointing to the FHIR server. dermnode runs on its default settings except: ``workers.count`` (1 unless said),
``storage.min_free_mb = 1``; in particular the job poll interval (0.1 s), the outbox poll interval (0.2 s),
``analysis.torch_threads`` and fsync are the defaults. Every phase starts a fresh stack.

Inputs: JPEG Baseline Dermoscopic Photography Images (768x576, 0.02 mm/pixel) built from real photographs
when the shared data is present (see ``bench/common.py``), each with unique UIDs.

Phases
    (a) sequential: one image at a time (after 1 warm-up image); the next is sent when the previous one is
        fully delivered. Latency = last ``deliveries.delivered_at`` of the job (SEG and SR accepted by Orthanc,
        FHIR transaction answered) − ``jobs.received_at`` (the moment the job was committed, just before the
        C-STORE response). Both timestamps come from the state database ``var/dermnode.db``.
    (b) load: N concurrent associations × M images each, started together: K of them from pynetdicom client
        processes (``--pynetdicom-associations``, default N // 4, at least 1 when N ≥ 2; each a separate Python
        process with ONE association, presentation context Dermoscopic Photography Image Storage with the
        files' transfer syntax, recording the status of every C-STORE response; ``common.pynetdicom_client``),
        the other N − K from ``storescu`` processes; see ``common.send_mixed``. Both kinds run with their own
        TCP defaults (Nagle on: storescu without ``TCP_NODELAY=1``, pynetdicom without the socket option) unless
        ``--client-nodelay`` turns it off for both. dermnode runs with ``scp.max_associations = max(10, N)``.
        Acknowledged = a success (0x0000) response, from either client kind; per kind: acknowledged, failed
        (not acknowledged) and rejected associations. Same latency; peak RSS of the dermnode process (``VmHWM``
        of ``/proc/<pid>/status``), RSS idle after start, sampled every 5 s while the queue drains and at the
        end; exactly-once checks on the union of acknowledged images: every acknowledged image has one job, the
        job is done, each of its results (SEG+SR+FHIR when analysed, SR+FHIR when not analysable) was delivered
        on the first attempt, Orthanc's ``/instances`` holds exactly the delivered SEG/SR SOP Instance UIDs, and
        the FHIR server got one POST per bundle.
    (c) stage breakdown: ``timings_ms`` of every job's ``var/results/<SOPInstanceUID>/result.json`` (gate,
        artefacts, segmentation, measurements, classification); ``decode`` and ``outputs`` are not in
        result.json, they are read from the service's ``analysed <uid>: ... (decode=..ms, ...)`` log line.
        Delivery, from the sequential phase (the outbox sends one job's objects back to back): outbox wait + SEG
        C-STORE = SEG delivered − results queued; SR C-STORE = SR delivered − SEG delivered; FHIR POST = FHIR
        delivered − SR delivered.
    (d) throughput: T images are queued first with dermnode in receive-only mode (``workers.count = 0``), then
        dermnode is restarted on the same storage with W workers (and a given ``analysis.torch_threads``);
        analysed images/minute = (T − 1) / (last job done − first job done) (steady state, without model
        loading); from ready: T / (last job done − service ready) and T / (last delivery − service ready),
        "ready" being when the restarted service listens (models loaded, workers started).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DCMTK_NODELAY,
    REPO,
    SourceFile,
    busy_processes,
    db_rows,
    environment,
    machine_info,
    proc_status_kb,
    send_mixed,
    send_parallel,
    source_images,
    summary,
    wait_until,
    write_dicoms,
)

from dermnode.settings import DeliverySettings, ScpSettings, WorkerSettings

# the test helpers (tests/ is put on sys.path by common)
from dermnode_proc import DermnodeProcess, dermnode_env
from fhir_server import FhirTestServer
from peers import Orthanc, free_port, start_orthanc

STAGES = ("decode", "gate", "artefacts", "segmentation", "measurements", "classification", "outputs")
# the service's own defaults (the test helpers set faster polls; the benchmark measures the defaults)
DEFAULT_POLLS = {
    "DERMNODE_WORKERS__POLL_INTERVAL_S": str(WorkerSettings().poll_interval_s),
    "DERMNODE_DELIVERY__POLL_INTERVAL_S": str(DeliverySettings().poll_interval_s),
}
LOG_TIMINGS = re.compile(r"analysed (?P<uid>[0-9.]+): .*\((?P<t>[^()]*)\)\s*$")


def scp_max_associations(n_assoc: int) -> int:
    """``scp.max_associations`` of the benchmark's dermnode: the default 10, or N when the load needs more."""
    return max(10, n_assoc)


def default_pynetdicom_associations(n_assoc: int) -> int:
    """A quarter of N, at least 1 when N ≥ 2 (N = 1: storescu only)."""
    return max(1, n_assoc // 4) if n_assoc >= 2 else 0


def models_present(models_dir: Path) -> bool:
    return (models_dir / "segmentation.json").is_file() and (models_dir / "classifier.json").is_file()


@dataclass
class Stack:
    work: Path
    orthanc: Orthanc
    fhir: FhirTestServer
    dermnode: DermnodeProcess

    @property
    def db(self) -> Path:
        return self.dermnode.root / "var" / "dermnode.db"

    @property
    def pid(self) -> int:
        assert self.dermnode.proc is not None
        return self.dermnode.proc.pid

    def stop(self) -> None:
        try:
            self.dermnode.stop()
        finally:
            try:
                self.fhir.stop()
            finally:
                self.orthanc.stop()


def dermnode_process(work: Path, *, workers: int, torch_threads: int | None = None, max_associations: int = 10,
                     pacs: Orthanc | None = None, fhir_url: str = "", models_dir: Path | None = None,
                     fast_poll: bool = False) -> DermnodeProcess:
    """A (not yet started) ``dermnode serve`` with its storage under ``work/dermnode``."""
    root = work / "dermnode"
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "dermnode.toml"
    text = ""
    if pacs is not None:
        text = (f'[[pacs]]\nname = "orthanc"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
                f"port = {pacs.dicom_port}\n")
    cfg.write_text(text)
    port = free_port()
    extra = {} if fast_poll else dict(DEFAULT_POLLS)
    extra.update({
        "DERMNODE_WORKERS__COUNT": str(workers),
        "DERMNODE_SCP__MAX_ASSOCIATIONS": str(scp_max_associations(max_associations)),
    })
    if torch_threads is not None:  # None: the service's default (analysis.torch_threads)
        extra["DERMNODE_ANALYSIS__TORCH_THREADS"] = str(torch_threads)
    if fhir_url:
        extra["DERMNODE_FHIR__BASE_URL"] = fhir_url
        extra["DERMNODE_FHIR__PATIENT_IDENTIFIER_SYSTEM"] = "http://hospital.example/mrn"
    if models_dir is not None:
        extra["DERMNODE_ANALYSIS__MODELS_DIR"] = str(models_dir)
    return DermnodeProcess(root, port, dermnode_env(root, port, extra), config=cfg)


def start_stack(work: Path, *, orthanc_nodelay: bool = True, **kwargs: Any) -> Stack:
    """Orthanc, the FHIR server and dermnode (models loaded) on free loopback ports; all stopped on failure.

    ``orthanc_nodelay``: Orthanc (DCMTK inside) runs with ``TCP_NODELAY=1``, as every DCMTK program of the
    benchmarks; else with DCMTK's default (Nagle on), which adds a delayed-ACK stall to each delivery."""
    with environment(DCMTK_NODELAY if orthanc_nodelay else {}):
        orthanc = start_orthanc(work / "orthanc")
    fhir = None
    try:
        fhir = FhirTestServer().start()
        dermnode = dermnode_process(work, pacs=orthanc, fhir_url=fhir.url, **kwargs)
        try:
            dermnode.start(timeout=180)
        except BaseException:
            dermnode.stop()
            raise
    except BaseException:
        if fhir is not None:
            fhir.stop()
        orthanc.stop()
        raise
    return Stack(work, orthanc, fhir, dermnode)


# --- reading the outcome -----------------------------------------------------------------------------------
def job_rows(db: Path) -> list[dict[str, Any]]:
    """One row per job with its deliveries aggregated."""
    rows = db_rows(db, """
        SELECT j.id, j.sop_instance_uid, j.state, j.outcome, j.attempts AS job_attempts, j.received_at,
               j.updated_at AS done_at, COUNT(d.id) AS n_deliveries,
               COALESCE(SUM(d.state = 'done'), 0) AS n_delivered, MAX(d.delivered_at) AS last_delivered_at,
               MIN(d.created_at) AS results_at, COALESCE(SUM(d.attempts), 0) AS delivery_attempts
        FROM jobs j LEFT JOIN deliveries d ON d.job_id = j.id GROUP BY j.id ORDER BY j.id""")
    return [dict(r) for r in rows]


def delivery_rows(db: Path) -> list[dict[str, Any]]:
    return [dict(r) for r in db_rows(db, "SELECT * FROM deliveries ORDER BY id")]


def min_deliveries(outcome: str | None) -> int:
    """Fewest results a finished job queues: SEG + SR + FHIR when analysed, SR + FHIR when not analysable (the
    pipeline may add more PACS objects, e.g. the presentation state and a key image)."""
    return 3 if outcome == "analysed" else 2


def complete(job: dict[str, Any]) -> bool:
    """A finished job whose results were all delivered (the pipeline queues them all before the job is done)."""
    return (job["state"] == "done" and job["n_deliveries"] >= min_deliveries(job["outcome"])
            and job["n_delivered"] == job["n_deliveries"])


def all_finished(db: Path, expected_jobs: int) -> bool:
    if not db.exists():
        return False
    jobs = job_rows(db)
    if len(jobs) < expected_jobs or any(j["state"] in ("pending", "running") for j in jobs):
        return False
    busy = db_rows(db, "SELECT COUNT(*) AS n FROM deliveries WHERE state IN ('pending', 'sending')")[0]["n"]
    return busy == 0


def wait_finished(stack: Stack, expected_jobs: int, timeout_s: float,
                  on_poll: Callable[[], None] | None = None) -> bool:
    def done() -> bool:
        if on_poll is not None:
            on_poll()
        if stack.dermnode.proc is not None and stack.dermnode.proc.poll() is not None:
            code = stack.dermnode.proc.returncode
            raise RuntimeError(f"dermnode exited with {code}:\n{stack.dermnode.log()[-3000:]}")
        return all_finished(stack.db, expected_jobs)

    return bool(wait_until(done, timeout_s, 0.1))


def orthanc_uids(orthanc: Orthanc) -> list[str]:
    """SOP Instance UIDs of every instance Orthanc holds (duplicates kept, to count)."""
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances?expand", timeout=60)]


def orthanc_has(orthanc: Orthanc, uid: str) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/tools/lookup", data=uid.encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as rsp:
        return any(r.get("Type") == "Instance" for r in json.loads(rsp.read()))


def log_timings(log: str) -> dict[str, dict[str, float]]:
    """``{uid: {stage: ms}}`` from the service's ``analysed <uid>: ... (decode=12ms, gate=3ms, ...)`` lines."""
    out: dict[str, dict[str, float]] = {}
    for line in log.splitlines():
        m = LOG_TIMINGS.search(line)
        if m:
            parts = [p.strip().split("=") for p in m.group("t").split(",") if "=" in p]
            out[m.group("uid")] = {k: float(v.rstrip("ms")) for k, v in parts}
    return out


def stage_timings(stack: Stack, uids: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-stage summary over ``uids``: result.json ``timings_ms`` plus decode/outputs from the log."""
    from_log = log_timings(stack.dermnode.log())
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    per_stage["total_processing"] = []
    for uid in uids:
        path = stack.dermnode.root / "var" / "results" / uid / "result.json"
        if not path.is_file():
            continue
        timings = dict(json.loads(path.read_text())["timings_ms"])
        for k in ("decode", "outputs"):
            if k in from_log.get(uid, {}):
                timings[k] = from_log[uid][k]
        for k, v in timings.items():
            per_stage.setdefault(k, []).append(float(v))
        if uid in from_log:
            per_stage["total_processing"].append(sum(from_log[uid].values()))
    return {k: summary(v) for k, v in per_stage.items() if v}


def check_exactly_once(stack: Stack, sent: Sequence[SourceFile], acknowledged: Sequence[SourceFile]) -> dict[str, Any]:
    """Every acknowledged image analysed and each of its results delivered exactly once.

    ``ok`` is about the acknowledged images (an association rejected by the node is the modality's to retry);
    ``all_acknowledged`` says whether every sent image was acknowledged.
    """
    jobs = job_rows(stack.db)
    deliveries = delivery_rows(stack.db)
    acked_uids = {f.sop_instance_uid for f in acknowledged}
    job_uids = {j["sop_instance_uid"] for j in jobs}
    dicom_keys = [d["object_key"] for d in deliveries if d["kind"] == "dicom" and d["state"] == "done"]
    in_orthanc = orthanc_uids(stack.orthanc)
    fhir_posts = [r for r in stack.fhir.requests if r.method == "POST"]
    n_fhir = sum(1 for d in deliveries if d["kind"] == "fhir")
    n = len(acked_uids)
    checks = {
        "sent": len(sent),
        "acknowledged": n,
        "all_acknowledged": n == len(sent),
        "jobs": len(jobs),
        "jobs_match_acknowledged": job_uids == acked_uids,
        "jobs_done": sum(1 for j in jobs if j["state"] == "done"),
        "jobs_dead": sum(1 for j in jobs if j["state"] == "dead"),
        "job_attempts_gt1": sum(1 for j in jobs if j["job_attempts"] > 1),
        "outcomes": {str(o): sum(1 for j in jobs if j["outcome"] == o) for o in {j["outcome"] for j in jobs}},
        "deliveries": len(deliveries),
        "deliveries_expected": sum(j["n_deliveries"] for j in jobs),
        "jobs_with_fewer_results_than_expected": sum(1 for j in jobs
                                                     if j["n_deliveries"] < min_deliveries(j["outcome"])),
        "deliveries_done": sum(1 for d in deliveries if d["state"] == "done"),
        "delivery_attempts_gt1": sum(1 for d in deliveries if d["attempts"] > 1),
        "orthanc_instances": len(in_orthanc),
        "orthanc_duplicates": len(in_orthanc) - len(set(in_orthanc)),
        "orthanc_matches_deliveries": sorted(in_orthanc) == sorted(dicom_keys),
        "fhir_posts": len(fhir_posts),
        "fhir_deliveries": n_fhir,
        "fhir_diagnostic_reports": stack.fhir.count("DiagnosticReport"),
    }
    checks["ok"] = bool(
        n > 0 and checks["jobs_match_acknowledged"] and checks["jobs_done"] == n
        and checks["deliveries"] == checks["deliveries_expected"] == checks["deliveries_done"]
        and checks["jobs_with_fewer_results_than_expected"] == 0
        and checks["delivery_attempts_gt1"] == 0
        and checks["orthanc_matches_deliveries"] and checks["orthanc_duplicates"] == 0
        and checks["fhir_posts"] == n_fhir == checks["fhir_diagnostic_reports"] == n
    )
    return checks


def acknowledged_files(files: Sequence[SourceFile], acked_paths: Sequence[str]) -> list[SourceFile]:
    acked = set(acked_paths)
    return [f for f in files if str(f.path) in acked]


def latencies(jobs: Sequence[dict[str, Any]], uids: set[str]) -> dict[str, list[float]]:
    """Per job, in seconds: total (received → last delivered), queue+processing (received → done), delivery."""
    out: dict[str, list[float]] = {"total_s": [], "received_to_done_s": [], "done_to_delivered_s": []}
    for j in jobs:
        if j["sop_instance_uid"] not in uids or j["last_delivered_at"] is None:
            continue
        if not complete(j):
            continue
        out["total_s"].append(j["last_delivered_at"] - j["received_at"])
        out["received_to_done_s"].append(j["done_at"] - j["received_at"])
        out["done_to_delivered_s"].append(j["last_delivered_at"] - j["done_at"])
    return out


# --- phases ------------------------------------------------------------------------------------------------
def phase_sequential(work: Path, images: Sequence[Any], k: int, *, jpeg: bool, stack_kw: dict[str, Any],
                     log: Any) -> dict[str, Any]:
    files = write_dicoms(work / "src-seq", k + 1, jpeg=jpeg, images=images, tag="seq")
    stack = start_stack(work / "seq", workers=1, **stack_kw)
    try:
        ack_minus_received = []
        for i, f in enumerate(files):
            res = send_parallel(stack.dermnode.port, [f.path], jpeg=jpeg, called_aet="DERMNODE", associations=1,
                                timeout_s=60)
            if res.success_responses != 1:
                raise RuntimeError(f"C-STORE of {f.path.name} failed: {res.errors or res.returncodes}")
            if not wait_finished(stack, i + 1, 180):
                raise TimeoutError(f"image {i} not analysed and delivered within 180 s")
            job = next(j for j in job_rows(stack.db) if j["sop_instance_uid"] == f.sop_instance_uid)
            ack_minus_received.append(res.ack_times[0] - job["received_at"])
            lat = (job["last_delivered_at"] or float("nan")) - job["received_at"]
            log(f"e2e sequential {i}/{k}{' (warm-up)' if i == 0 else ''}: {job['outcome']} {lat * 1000:.0f} ms")
        measured = files[1:]
        uids = {f.sop_instance_uid for f in measured}
        jobs = job_rows(stack.db)
        deliveries = delivery_rows(stack.db)
        # Orthanc holds every DICOM result (SEG, SR, presentation state, ...) of every measured job
        dicom = [d for d in deliveries if d["kind"] == "dicom"]
        in_orthanc = sum(1 for d in dicom if orthanc_has(stack.orthanc, d["object_key"]))
        # delivery breakdown: one delivery thread per destination, so the PACS objects go one after the other
        # (oldest first) while the FHIR bundle goes beside them
        by_job: dict[int, list[dict[str, Any]]] = {}
        for d in deliveries:
            by_job.setdefault(d["job_id"], []).append(d)
        first_wait, next_send, pacs_chain, fhir_send, n_pacs = [], [], [], [], []
        uid_of = {j["id"]: j["sop_instance_uid"] for j in jobs}
        for job_id, ds in by_job.items():
            if uid_of.get(job_id) not in uids or any(d["delivered_at"] is None for d in ds):
                continue
            pacs = sorted((d for d in ds if d["kind"] == "dicom"), key=lambda d: d["id"])
            fhir = [d for d in ds if d["kind"] == "fhir"]
            if not pacs or len(fhir) != 1:
                continue
            n_pacs.append(len(pacs))
            first_wait.append((pacs[0]["delivered_at"] - pacs[0]["created_at"]) * 1000)
            next_send += [(b["delivered_at"] - a["delivered_at"]) * 1000 for a, b in itertools.pairwise(pacs)]
            pacs_chain.append((pacs[-1]["delivered_at"] - pacs[0]["created_at"]) * 1000)
            fhir_send.append((fhir[0]["delivered_at"] - fhir[0]["created_at"]) * 1000)
        lat = latencies(jobs, uids)
        return {
            "k": k,
            "latency_s": {name: summary(v) for name, v in lat.items()},
            "latency_values_s": lat["total_s"],
            "storescu_return_minus_received_at_s": summary(ack_minus_received[1:]),
            "stages_ms": stage_timings(stack, sorted(uids)),
            "delivery_ms": {"outbox_wait_plus_first_cstore": summary(first_wait), "next_cstore": summary(next_send),
                            "pacs_all_objects": summary(pacs_chain), "fhir_queued_to_accepted": summary(fhir_send)},
            "pacs_objects_per_job": summary(n_pacs),
            "orthanc_has_delivered_dicom": f"{in_orthanc}/{len(dicom)}",
            "exactly_once": check_exactly_once(stack, files, files),
            "peak_rss_mb": (proc_status_kb(stack.pid, "VmHWM") or 0) / 1024,
        }
    finally:
        stack.stop()


def phase_load(work: Path, images: Sequence[Any], n_assoc: int, m: int, *, jpeg: bool, stack_kw: dict[str, Any],
               log: Any, pynetdicom_assoc: int | None = None, client_nodelay: bool = False) -> dict[str, Any]:
    total = n_assoc * m
    k = default_pynetdicom_associations(n_assoc) if pynetdicom_assoc is None else pynetdicom_assoc
    if not 0 <= k <= n_assoc:
        raise ValueError(f"--pynetdicom-associations {k}: must be between 0 and N = {n_assoc}")
    files = write_dicoms(work / "src-load", total, jpeg=jpeg, images=images, tag="load")
    stack = start_stack(work / "load", workers=1, max_associations=n_assoc, **stack_kw)
    try:
        # The readiness probe of the harness (a bare TCP connect, tests/dermnode_proc.wait_port) is counted by
        # pynetdicom as an association until scp.acse_timeout_s passes: let it expire so that the N
        # associations of the burst are measured against an idle node (see docs/performance.md).
        time.sleep(ScpSettings().acse_timeout_s + 1.0)
        rss_idle = (proc_status_kb(stack.pid, "VmRSS") or 0) / 1024
        res = send_mixed(stack.dermnode.port, [f.path for f in files], jpeg=jpeg, called_aet="DERMNODE",
                         associations=n_assoc, pynetdicom_associations=k, work=work / "load-clients",
                         timeout_s=max(600, 2 * total), nodelay=client_nodelay)
        t_sent = time.time()
        t0 = res.started_at  # the clients released (the pynetdicom processes have loaded their files by then)
        rss_after_send = (proc_status_kb(stack.pid, "VmRSS") or 0) / 1024
        kinds = res.by_kind
        log(f"e2e load: {res.success_responses}/{total} acknowledged in {res.wall_s:.1f} s over {n_assoc} "
            "associations (" + ", ".join(f"{kind} {r.success_responses}/{r.files} over {len(r.returncodes)}"
                                        for kind, r in kinds.items()) + "); waiting for analysis and delivery")
        rss_samples: list[list[float]] = []

        def sample_rss() -> None:
            now = time.time()
            if not rss_samples or now - t0 - rss_samples[-1][0] >= 5.0:
                rss_samples.append([round(now - t0, 1), round((proc_status_kb(stack.pid, "VmRSS") or 0) / 1024, 1)])

        finished = wait_finished(stack, res.success_responses, 120 + 20 * total, on_poll=sample_rss)
        t_end = time.time()
        rss_end = (proc_status_kb(stack.pid, "VmRSS") or 0) / 1024
        jobs = job_rows(stack.db)
        uids = {f.sop_instance_uid for f in files}
        lat = latencies(jobs, uids)
        last = max((j["last_delivered_at"] or 0) for j in jobs) if jobs else t_end
        acked = acknowledged_files(files, res.acknowledged)
        done = sorted(j["done_at"] for j in jobs if j["state"] == "done")
        scu = kinds["storescu"]
        out: dict[str, Any] = {
            "associations": n_assoc,
            "images_per_association": m,
            "images": total,
            "scp_max_associations": scp_max_associations(n_assoc),
            "client_nodelay": client_nodelay,
            "finished_in_time": finished,
            "send_wall_s": res.wall_s,
            "storescu_returncodes": scu.returncodes,
            "storescu_errors": scu.errors[:2000],
            "associations_rejected": res.associations_rejected,
            "clients": {kind: {
                "associations": len(r.returncodes),
                "images": r.files,
                "acknowledged": len(r.acknowledged),
                "failed": r.failed,
                "associations_rejected": r.associations_rejected,
                "responses": r.statuses,
                "returncodes": r.returncodes,
                "send_wall_s": r.wall_s,
                "errors": r.errors[:2000],
                **({"per_association": r.associations} if r.associations else {}),
            } for kind, r in kinds.items()},
            "first_send_to_last_delivery_s": last - t0,
            "first_send_to_all_acknowledged_s": t_sent - t0,
            "analysed_per_min": (len(done) - 1) / (done[-1] - done[0]) * 60 if len(done) > 1 else float("nan"),
            "latency_s": {name: summary(v) for name, v in lat.items()},
            "latency_values_s": lat["total_s"],
            "stages_ms": stage_timings(stack, sorted(uids)),
            "rss_idle_after_start_mb": rss_idle,
            "rss_after_send_mb": rss_after_send,
            "rss_end_mb": rss_end,
            "rss_samples_s_mb": rss_samples,
            "peak_rss_mb": (proc_status_kb(stack.pid, "VmHWM") or 0) / 1024,
            "exactly_once": check_exactly_once(stack, files, acked),
        }
        log(f"e2e load: p50 {out['latency_s']['total_s']['p50']:.1f} s, p95 {out['latency_s']['total_s']['p95']:.1f}"
            f" s, peak RSS {out['peak_rss_mb']:.0f} MB, exactly once: {out['exactly_once']['ok']}")
        return out
    finally:
        stack.stop()


def phase_throughput(work: Path, images: Sequence[Any], t: int, workers: int, torch_threads: int | None, *,
                     jpeg: bool,
                     stack_kw: dict[str, Any], log: Any) -> dict[str, Any]:
    files = write_dicoms(work / "src", t, jpeg=jpeg, images=images, tag="tp")
    # 1. queue the images with a receive-only dermnode
    pre = dermnode_process(work, workers=0, models_dir=stack_kw.get("models_dir"))
    try:
        pre.start(timeout=120)
        res = send_parallel(pre.port, [f.path for f in files], jpeg=jpeg, called_aet="DERMNODE", associations=1,
                            timeout_s=300)
    finally:
        pre.stop()
    if res.success_responses != t:
        raise RuntimeError(f"queueing failed: {res.success_responses}/{t} acknowledged: {res.errors}")
    # 2. restart on the same storage with the workers
    kw = {k: v for k, v in stack_kw.items() if k != "torch_threads"}
    t_start = time.time()
    stack = start_stack(work, workers=workers, torch_threads=torch_threads, **kw)
    t_listening = time.time()
    try:
        finished = wait_finished(stack, t, 120 + 20 * t)
        jobs = job_rows(stack.db)
        done = sorted(j["done_at"] for j in jobs if j["state"] == "done")
        last_delivered = max((j["last_delivered_at"] or 0) for j in jobs)
        steady = (len(done) - 1) / (done[-1] - done[0]) * 60 if len(done) > 1 else float("nan")
        out = {
            "workers": workers,
            "torch_threads": torch_threads,
            "images": t,
            "finished_in_time": finished,
            "start_to_listening_s": t_listening - t_start,
            "analysed_per_min_steady": steady,
            "analysed_per_min_from_listening": len(done) / (done[-1] - t_listening) * 60 if done else float("nan"),
            "delivered_per_min_from_listening": len(done) / (last_delivered - t_listening) * 60 if done
            else float("nan"),
            "peak_rss_mb": (proc_status_kb(stack.pid, "VmHWM") or 0) / 1024,
            "stages_ms": stage_timings(stack, [f.sop_instance_uid for f in files]),
            "exactly_once": check_exactly_once(stack, files, files),
        }
        log(f"e2e throughput workers={workers} torch_threads={torch_threads}: "
            f"{steady:.1f} analysed/min (steady), {out['delivered_per_min_from_listening']:.1f} delivered/min")
        return out
    finally:
        stack.stop()


def run(sequential: int = 20, load: tuple[int, int] = (20, 50), throughput_images: int = 30,
        throughput_configs: Sequence[tuple[int, int | None]] = ((1, None), (2, None)), jpeg: bool = True,
        models_dir: Path | None = None, fast_poll: bool = False, log: Any = print,
        pynetdicom_associations: int | None = None, client_nodelay: bool = False,
        orthanc_nodelay: bool = True) -> dict[str, Any]:
    models = models_dir or REPO / "models"
    if not models_present(models):
        raise SystemExit(f"models not found in {models} (segmentation.json, classifier.json): cannot run")
    images, described = source_images(60)
    stack_kw: dict[str, Any] = {"fast_poll": fast_poll, "models_dir": models_dir, "orthanc_nodelay": orthanc_nodelay}
    k = default_pynetdicom_associations(load[0]) if pynetdicom_associations is None else pynetdicom_associations
    if load[0] > 0 and load[1] > 0 and not 0 <= k <= load[0]:
        raise SystemExit(f"--pynetdicom-associations {k}: must be between 0 and N = {load[0]}")
    out: dict[str, Any] = {
        "params": {"sequential": sequential, "load": {"associations": load[0], "images_per_association": load[1],
                                                      "pynetdicom_associations": k, "client_nodelay": client_nodelay},
                   "throughput_images": throughput_images, "throughput_configs": [list(c) for c in throughput_configs],
                   "encoding": "jpeg" if jpeg else "native", "images": described,
                   "polls": "test (0.1/0.2 s)" if fast_poll else
                   "defaults (job 0.1 s, outbox 0.2 s, as fallbacks: workers and outbox wake on a commit)",
                   "models_dir": str(models),
                   "orthanc": "TCP_NODELAY=1 (as every DCMTK program of the benchmarks)" if orthanc_nodelay
                   else "DCMTK default (Nagle on)"},
        "busy_at_start": busy_processes(),
    }
    with tempfile.TemporaryDirectory(prefix="dermnode-bench-e2e-") as tmp:
        work = Path(tmp)
        if sequential > 0:
            out["sequential"] = phase_sequential(work, images, sequential, jpeg=jpeg, stack_kw=stack_kw, log=log)
            shutil.rmtree(work / "seq", ignore_errors=True)
        if load[0] > 0 and load[1] > 0:
            out["load"] = phase_load(work, images, load[0], load[1], jpeg=jpeg, stack_kw=stack_kw, log=log,
                                     pynetdicom_assoc=k, client_nodelay=client_nodelay)
            shutil.rmtree(work / "load", ignore_errors=True)
        out["throughput"] = []
        for workers, threads in (throughput_configs if throughput_images > 0 else ()):
            sub = work / f"tp-{workers}-{threads}"
            out["throughput"].append(phase_throughput(sub, images, throughput_images, workers, threads, jpeg=jpeg,
                                                      stack_kw=stack_kw, log=log))
            shutil.rmtree(sub, ignore_errors=True)
    out["busy_at_end"] = busy_processes()
    return out


def _fmt(x: float | None, scale: float = 1.0, nd: int = 0) -> str:
    if x is None or x != x:
        return "–"
    return f"{x * scale:.{nd}f}"


def markdown(res: dict[str, Any]) -> str:
    p = res["params"]
    lines: list[str] = []
    seq, load = res.get("sequential"), res.get("load")
    lines += [f"Inputs: {p['encoding']} files, {p['images']}; dermnode polls: {p['polls']}; Orthanc: "
              f"{p.get('orthanc', 'DCMTK default (Nagle on)')}.", "",
              "**Latency** from the C-STORE acknowledgement (`jobs.received_at`) to the last result delivered "
              "(every DICOM result — SEG, SR, presentation state — stored in Orthanc, FHIR bundle accepted):", "",
              "| scenario | images | p50 | p95 | max | of which received → analysed (p50) | "
              "analysed → delivered (p50) | peak RSS | exactly once |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    load_name = f"load, {p['load']['associations']} associations × {p['load']['images_per_association']}"
    if load and load.get("clients", {}).get("pynetdicom", {}).get("associations"):
        c = load["clients"]
        load_name += f" ({c['storescu']['associations']} storescu + {c['pynetdicom']['associations']} pynetdicom)"
    for name, ph in (("sequential, 1 at a time", seq), (load_name, load)):
        if not ph:
            continue
        t = ph["latency_s"]
        lines.append(
            f"| {name} | {t['total_s']['n']} | {_fmt(t['total_s']['p50'], 1, 2)} s | "
            f"{_fmt(t['total_s']['p95'], 1, 2)} s"
            f" | {_fmt(t['total_s']['max'], 1, 2)} s | {_fmt(t['received_to_done_s']['p50'], 1, 2)} s | "
            f"{_fmt(t['done_to_delivered_s']['p50'], 1, 2)} s | {ph['peak_rss_mb']:.0f} MB | "
            f"{'yes' if ph['exactly_once']['ok'] else 'NO'} |")
    if load:
        e = load["exactly_once"]
        lines += ["", f"Load check: sent {e['sent']}, acknowledged {e['acknowledged']} "
                  f"({load.get('associations_rejected', 0)} associations rejected), jobs {e['jobs']} "
                  f"(done {e['jobs_done']}, dead {e['jobs_dead']}, outcomes {e['outcomes']}), deliveries "
                  f"{e['deliveries_done']}/{e['deliveries_expected']} done ({e['delivery_attempts_gt1']} needed a "
                  f"retry), Orthanc instances {e['orthanc_instances']} (duplicates {e['orthanc_duplicates']}, "
                  f"match the delivered DICOM results: {e['orthanc_matches_deliveries']}), "
                  f"FHIR POSTs {e['fhir_posts']}, "
                  f"DiagnosticReports {e['fhir_diagnostic_reports']}. All {load['images']} sent in "
                  f"{load['send_wall_s']:.1f} s; first send → last delivery {load['first_send_to_last_delivery_s']:.1f}"
                  f" s. RSS after start (models loaded, idle) {load['rss_idle_after_start_mb']:.0f} MB."]
        if "clients" in load:
            lines[-1] += (f" Analysed {_fmt(load['analysed_per_min'], 1, 1)}/min (first → last job done); RSS after "
                          f"the burst {load['rss_after_send_mb']:.0f} MB, at the end {load['rss_end_mb']:.0f} MB.")
            lines += ["", f"Load clients (started together; scp.max_associations = {load['scp_max_associations']}; "
                      f"client TCP_NODELAY: {'on' if load['client_nodelay'] else 'off (client defaults)'}):", "",
                      "| client | associations | images sent | acknowledged (0x0000) | failed | associations rejected "
                      "| responses | send time |", "|---|---:|---:|---:|---:|---:|---|---:|"]
            rows = list(load["clients"].items())
            for kind, c in rows:
                resp = ", ".join(f"{k}: {v}" for k, v in sorted(c["responses"].items())) or "–"
                lines.append(f"| {kind} | {c['associations']} | {c['images']} | {c['acknowledged']} | {c['failed']} | "
                             f"{c['associations_rejected']} | {resp} | {c['send_wall_s']:.1f} s |")
            tot = {key: sum(c[key] for _, c in rows)
                   for key in ("associations", "images", "acknowledged", "failed", "associations_rejected")}
            lines.append(f"| total | {tot['associations']} | {tot['images']} | {tot['acknowledged']} | {tot['failed']} "
                         f"| {tot['associations_rejected']} | | {load['send_wall_s']:.1f} s |")
    if seq or load:
        lines += ["", "**Stages** (ms per image; decode and outputs from the service log, the others from "
                  "result.json `timings_ms`):", "",
                  "| stage | sequential mean | sequential p50 | under load mean | under load p50 |",
                  "|---|---:|---:|---:|---:|"]
        s_st = seq["stages_ms"] if seq else {}
        l_st = load["stages_ms"] if load else {}
        for st in (*STAGES, "total_processing"):
            a, b = s_st.get(st, {}), l_st.get(st, {})
            lines.append(f"| {st} | {_fmt(a.get('mean'), 1, 1)} | {_fmt(a.get('p50'), 1, 1)} | "
                         f"{_fmt(b.get('mean'), 1, 1)} | {_fmt(b.get('p50'), 1, 1)} |")
        if seq and "pacs_all_objects" in seq["delivery_ms"]:
            d = seq["delivery_ms"]

            def ms(key: str) -> str:
                return f"mean {_fmt(d[key]['mean'], 1, 0)} / p50 {_fmt(d[key]['p50'], 1, 0)}"

            n_pacs = seq.get("pacs_objects_per_job", {}).get("p50")
            lines += ["", f"Delivery (sequential phase, ms; {_fmt(n_pacs, 1, 0)} DICOM objects per job to the PACS "
                      "one after the other, the FHIR bundle beside them): outbox wait + first C-STORE "
                      f"{ms('outbox_wait_plus_first_cstore')}; each further C-STORE {ms('next_cstore')}; all PACS "
                      f"objects {ms('pacs_all_objects')}; FHIR bundle queued → accepted "
                      f"{ms('fhir_queued_to_accepted')}."]
    if res.get("throughput"):
        lines += ["", f"**Throughput** ({p['throughput_images']} images queued first, then analysed):", "",
                  "| workers | torch threads | analysed/min (steady) | analysed/min (from ready) | "
                  "delivered/min (from ready) | processing p50 | peak RSS | exactly once |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        for t in res["throughput"]:
            tt = (f"default ({default_threads()})" if t["torch_threads"] is None
                  else "torch default" if t["torch_threads"] == 0 else str(t["torch_threads"]))
            proc = t["stages_ms"].get("total_processing", {}).get("p50")
            lines.append(f"| {t['workers']} | {tt} | {_fmt(t['analysed_per_min_steady'], 1, 1)} | "
                         f"{_fmt(t['analysed_per_min_from_listening'], 1, 1)} | "
                         f"{_fmt(t['delivered_per_min_from_listening'], 1, 1)} | {_fmt(proc, 1, 0)} ms | "
                         f"{t['peak_rss_mb']:.0f} MB | {'yes' if t['exactly_once']['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _pair(text: str) -> tuple[int, int]:
    a, b = text.lower().split("x")
    return int(a), int(b)


def _config(text: str) -> tuple[int, int | None]:
    a, _, b = text.partition(":")
    return int(a), (int(b) if b else None)


def default_threads() -> int:
    from dermnode.settings import AnalysisSettings

    return AnalysisSettings().torch_threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequential", type=int, default=20, help="images sent one at a time (default 20; 0: skip)")
    ap.add_argument("--load", type=_pair, default=(20, 50), help="NxM: N concurrent associations of M images "
                    "(default 20x50; 0x0: skip)")
    ap.add_argument("--pynetdicom-associations", type=int, default=None, metavar="K",
                    help="how many of the N load associations come from pynetdicom client processes (default: "
                    "N // 4, at least 1 when N >= 2); the others are storescu")
    ap.add_argument("--client-nodelay", action="store_true", help="load clients with Nagle off (TCP_NODELAY=1 for "
                    "storescu, the socket option for pynetdicom); default: both with their defaults (Nagle on)")
    ap.add_argument("--throughput-images", type=int, default=30, help="images queued per throughput run (30; "
                    "0: skip)")
    ap.add_argument("--throughput-configs", type=_config, nargs="*", default=[(1, None), (2, None)],
                    help="WORKERS[:TORCH_THREADS] (no threads: the service default analysis.torch_threads; 0: "
                    "torch's own default); default 1 2")
    ap.add_argument("--native", action="store_true", help="send native RGB instead of JPEG Baseline")
    ap.add_argument("--orthanc-dcmtk-default", action="store_true", help="run Orthanc with DCMTK's default (Nagle "
                    "on) instead of TCP_NODELAY=1")
    ap.add_argument("--models", type=Path, help="models folder (default: the shipped models/)")
    ap.add_argument("--fast-poll", action="store_true", help="the tests' poll intervals (0.1/0.2 s) instead of "
                    "the defaults (0.1/0.2 s)")
    ap.add_argument("--out", type=Path, help="write the raw JSON here")
    args = ap.parse_args(argv)
    res = {"machine": machine_info(),
           "end_to_end": run(args.sequential, args.load, args.throughput_images, args.throughput_configs,
                             not args.native, args.models, args.fast_poll, log=lambda s: print(s, flush=True),
                             pynetdicom_associations=args.pynetdicom_associations,
                             client_nodelay=args.client_nodelay, orthanc_nodelay=not args.orthanc_dcmtk_default)}
    print(markdown(res["end_to_end"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    e = res["end_to_end"]
    ok = all(ph["exactly_once"]["ok"] for ph in [e.get("sequential"), e.get("load"), *e["throughput"]] if ph)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
