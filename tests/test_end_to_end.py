"""End to end with real peers: modality (storescu) → dermnode serve → Orthanc (PACS) + FHIR endpoint.

Needs the shipped models (``models/``), DCMTK and Orthanc; the FHIR endpoint is ``tests/fhir_server.py``.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
from dermnode_proc import DermnodeProcess, dermnode_env, require, run_tool, store_burst, wait_for
from fhir_server import FhirTestServer
from peers import Orthanc, free_port, start_orthanc
from synthetic import data_root, synthetic_dermoscopy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PATIENT_NAME = "Zzyzx^Quintessa"
PATIENT_ID = "PHI-7731-XQ"


def models_dir() -> Path:
    import os

    return Path(os.environ.get("DERMNODE_ANALYSIS__MODELS_DIR") or REPO / "models")


def models_present() -> bool:
    return (models_dir() / "segmentation.json").is_file() and (models_dir() / "classifier.json").is_file()


needs_models = pytest.mark.skipif(not models_present(), reason="shipped models not found under models/")


def lesion_image() -> np.ndarray:
    """A real dermoscopy image when the shared data is present, else the synthetic lesion."""
    real = data_root() / "ham10000-sample" / "images" / "ISIC_0024311.jpg"
    if real.is_file():
        from dermnode.dicom_io.wrap import load_rgb

        return load_rgb(real)
    return synthetic_dermoscopy(450, 600)


def write_source(path: Path, rgb: np.ndarray | None = None, *, seed: int = 0, jpeg: bool = True) -> pydicom.Dataset:
    ds = wrap_rgb(lesion_image() if rgb is None else rgb,
                  WrapOptions(patient_id=PATIENT_ID, patient_name=PATIENT_NAME, pixel_spacing_mm=0.02, jpeg=jpeg))
    ds.save_as(path, enforce_file_format=True)
    return ds


@dataclass
class Stack:
    dermnode: DermnodeProcess
    orthanc: Orthanc
    fhir: FhirTestServer

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.dermnode.root / "var" / "dermnode.db")
        conn.row_factory = sqlite3.Row
        return conn

    def store(self, *files: Path) -> None:
        res = run_tool(["storescu", "-aet", "MODALITY", "-aec", "DERMNODE", "-R", "-xy", "127.0.0.1",
                        str(self.dermnode.port), *map(str, files)])
        assert res.returncode == 0, res.stdout + res.stderr

    def deliveries(self, state: str | None = None) -> list[sqlite3.Row]:
        sql = "SELECT * FROM deliveries" + (" WHERE state = ?" if state else "")
        return list(self.db().execute(sql, (state,) if state else ()))

    def wait_delivered(self, n: int, timeout: float = 180.0) -> None:
        wait_for(lambda: len(self.deliveries("done")) >= n, timeout=timeout, what=f"{n} deliveries")


def start_dermnode(tmp: Path, orthanc: Orthanc, fhir: FhirTestServer, port: int | None = None,
                   **extra: str) -> DermnodeProcess:
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "dermnode.toml"
    cfg.write_text(
        f'[[pacs]]\nname = "orthanc"\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
    )
    env = dermnode_env(tmp, port, {
        "DERMNODE_WORKERS__COUNT": "1",
        "DERMNODE_FHIR__BASE_URL": fhir.url,
        "DERMNODE_FHIR__PATIENT_IDENTIFIER_SYSTEM": "http://hospital.example/mrn",
        "DERMNODE_DELIVERY__BACKOFF_INITIAL_S": "0.5",
        "DERMNODE_DELIVERY__BACKOFF_MAX_S": "2",
        "DERMNODE_ANALYSIS__TORCH_THREADS": "1",
        **extra,
    })
    proc = DermnodeProcess(tmp, port, env, config=cfg)
    proc.start(timeout=120)
    return proc


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    require("storescu")
    orthanc = start_orthanc(tmp_path / "orthanc")
    fhir = FhirTestServer().start()
    dermnode = None
    try:
        dermnode = start_dermnode(tmp_path / "dermnode", orthanc, fhir)
        yield Stack(dermnode, orthanc, fhir)
    finally:
        if dermnode is not None:
            dermnode.stop()
        fhir.stop()
        orthanc.stop()


def orthanc_study_instances(orthanc: Orthanc, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> Modality of every instance Orthanc holds in the study."""
    out: dict[str, str] = {}
    for iid in orthanc.instances():
        tags = orthanc.get(f"/instances/{iid}/simplified-tags")
        if tags.get("StudyInstanceUID") == study_uid:
            out[tags["SOPInstanceUID"]] = tags.get("Modality", "")
    return out


@needs_models
def test_image_becomes_seg_sr_in_pacs_and_fhir_report(tmp_path: Path) -> None:
    require("storescu")
    orthanc = start_orthanc(tmp_path / "orthanc")
    fhir = FhirTestServer().start()
    http_port = free_port()
    dermnode = start_dermnode(tmp_path / "dermnode", orthanc, fhir, DERMNODE_HTTP__ENABLED="true",
                              DERMNODE_HTTP__PORT=str(http_port))
    try:
        _image_to_pacs_and_fhir(Stack(dermnode, orthanc, fhir), tmp_path, http_port)
    finally:
        dermnode.stop()
        fhir.stop()
        orthanc.stop()


def _image_to_pacs_and_fhir(stack: Stack, tmp_path: Path, http_port: int) -> None:
    src = write_source(tmp_path / "src.dcm")
    stack.store(tmp_path / "src.dcm")
    stack.wait_delivered(3)  # SEG + SR to Orthanc, bundle to FHIR
    job = stack.db().execute("SELECT * FROM jobs").fetchone()
    assert job["state"] == "done" and job["outcome"] == "analysed"
    inst = orthanc_study_instances(stack.orthanc, src.StudyInstanceUID)
    assert sorted(inst.values()) == ["SEG", "SR"], inst
    assert stack.fhir.count("DiagnosticReport") == 1
    report = next(iter(stack.fhir.resources["DiagnosticReport"].values()))
    assert "decision support" in report["conclusion"].lower()
    # status agrees
    doc = json.loads(stack.dermnode.cli("status", "--json").stdout)
    assert doc["jobs"]["done"] == 1 and doc["deliveries"]["done"] == 3
    # no PHI in the logs at INFO
    log = stack.dermnode.log()
    assert "Zzyzx" not in log and PATIENT_ID not in log
    assert src.SOPInstanceUID in log  # the audit trail names the instance by UID
    # operations endpoints agree with `dermnode status`
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10) as rsp:
        health = json.loads(rsp.read())
    assert health["status"] == "ok" and health["jobs"] == doc["jobs"]
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as rsp:
        metrics = rsp.read().decode()
    assert "dermnode_received_total 1" in metrics and "dermnode_analysed_total 1" in metrics
    assert "dermnode_delivered_total 3" in metrics and "dermnode_queue_depth 0" in metrics
    assert 'dermnode_stage_latency_seconds_count{stage="segmentation"} 1' in metrics


@needs_models
def test_orthanc_down_results_wait_then_delivered_once(tmp_path: Path) -> None:
    require("storescu")
    orthanc = start_orthanc(tmp_path / "orthanc")
    ports = (orthanc.dicom_port, orthanc.http_port)
    orthanc.stop()  # the PACS is down
    fhir = FhirTestServer().start()
    dermnode = start_dermnode(tmp_path / "dermnode", orthanc, fhir)
    stack = Stack(dermnode, orthanc, fhir)
    try:
        src = write_source(tmp_path / "src.dcm")
        stack.store(tmp_path / "src.dcm")
        wait_for(lambda: any(r["attempts"] >= 2 for r in stack.deliveries("pending")), timeout=180,
                 what="failed delivery attempts while the PACS is down")
        assert not orthanc_dicom_reachable(ports[0])
        orthanc = start_orthanc(tmp_path / "orthanc", dicom_port=ports[0], http_port=ports[1])
        stack.orthanc = orthanc
        stack.wait_delivered(3)
        inst = orthanc_study_instances(orthanc, src.StudyInstanceUID)
        assert sorted(inst.values()) == ["SEG", "SR"]
        assert len(orthanc.instances()) == 2  # delivered once
    finally:
        dermnode.stop()
        fhir.stop()
        orthanc.stop()


def orthanc_dicom_reachable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@needs_models
def test_pacs_routes_image_to_dermnode_and_gets_results(tmp_path: Path) -> None:
    """Orthanc knows dermnode as a modality and forwards an image, as an auto-router would."""
    require("storescu")
    dn_port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc",
                            extra={"DicomModalities": {"dermnode": ["DERMNODE", "127.0.0.1", dn_port]}})
    fhir = FhirTestServer().start()
    dermnode = start_dermnode(tmp_path / "dermnode", orthanc, fhir, port=dn_port)
    try:
        src = write_source(tmp_path / "src.dcm")
        req = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/instances",
                                     data=(tmp_path / "src.dcm").read_bytes(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as rsp:
            orthanc_id = json.loads(rsp.read())["ID"]
        body = json.dumps({"Resources": [orthanc_id], "Synchronous": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/modalities/dermnode/store",
                                     data=body, method="POST")
        with urllib.request.urlopen(req, timeout=60) as rsp:
            assert rsp.status == 200
        wait_for(lambda: len(orthanc_study_instances(orthanc, src.StudyInstanceUID)) == 3, timeout=180,
                 what="SEG and SR back in Orthanc")
        assert sorted(orthanc_study_instances(orthanc, src.StudyInstanceUID).values()) == ["DMS", "SEG", "SR"]
    finally:
        dermnode.stop()
        fhir.stop()
        orthanc.stop()


@needs_models
def test_not_analysable_image_gets_sr_with_reason_and_no_seg(stack: Stack, tmp_path: Path) -> None:
    blank = np.full((300, 400, 3), 128, np.uint8)
    src = write_source(tmp_path / "blank.dcm", blank, jpeg=False)
    stack.store(tmp_path / "blank.dcm")
    stack.wait_delivered(2)  # SR + FHIR
    job = stack.db().execute("SELECT * FROM jobs").fetchone()
    assert job["outcome"] == "not_analysable"
    assert sorted(orthanc_study_instances(stack.orthanc, src.StudyInstanceUID).values()) == ["SR"]
    report = next(iter(stack.fhir.resources["DiagnosticReport"].values()))
    assert report["status"] == "preliminary" and "conclusionCode" not in report


@needs_models
def test_fhir_endpoint_down_then_up_delivers_once(stack: Stack, tmp_path: Path) -> None:
    stack.fhir.mode = "503"
    write_source(tmp_path / "src.dcm")
    stack.store(tmp_path / "src.dcm")
    wait_for(lambda: any(r["kind"] == "fhir" and r["attempts"] >= 2 for r in stack.deliveries()), timeout=180,
             what="FHIR retries")
    stack.fhir.mode = "ok"
    stack.wait_delivered(3)
    assert stack.fhir.count("DiagnosticReport") == 1


@needs_models
def test_fhir_4xx_dead_letters_without_retry_storm(stack: Stack, tmp_path: Path) -> None:
    stack.fhir.mode = "400"
    write_source(tmp_path / "src.dcm")
    stack.store(tmp_path / "src.dcm")
    wait_for(lambda: [r for r in stack.deliveries("dead") if r["kind"] == "fhir"], timeout=180,
             what="FHIR delivery dead-lettered")
    (row,) = [r for r in stack.deliveries() if r["kind"] == "fhir"]
    assert row["attempts"] == 1 and "400" in row["last_error"]
    posts = [r for r in stack.fhir.requests if r.method == "POST"]
    assert len(posts) == 1
    dl = json.loads(stack.dermnode.cli("status", "--json", "--dead-letters").stdout)["dead_letters"]
    assert any("400" in d["error"] for d in dl)
    # the cause is fixed: replay re-sends the same bundle, once
    stack.fhir.mode = "ok"
    res = stack.dermnode.cli("replay", "--dead-letter")
    assert res.returncode == 0 and "re-queued 1" in res.stdout
    stack.wait_delivered(3)
    assert stack.fhir.count("DiagnosticReport") == 1


def test_missing_or_corrupt_model_refuses_to_start(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    port = free_port()
    proc = DermnodeProcess(tmp_path, port, dermnode_env(tmp_path, port, {"DERMNODE_ANALYSIS__MODELS_DIR": str(models)}))
    res = proc.cli("serve", timeout=120)
    assert res.returncode != 0 and "model" in res.stderr.lower()
    if models_present():
        import shutil

        for f in models_dir().glob("*.json"):
            shutil.copy(f, models / f.name)
        for f in models_dir().glob("*.pt"):
            blob = bytearray(f.read_bytes())
            blob[len(blob) // 2] ^= 0xFF
            (models / f.name).write_bytes(bytes(blob))
        res = proc.cli("serve", timeout=120)
        assert res.returncode != 0 and "sha256" in res.stderr.lower()


@needs_models
def test_kill9_during_burst_every_acknowledged_image_processed_exactly_once(tmp_path: Path) -> None:
    """kill -9 mid-burst with workers running; after restart each acknowledged image has one job, done, and one
    delivery per object (deterministic UIDs make any re-run idempotent)."""
    import signal

    require("storescu")
    orthanc = start_orthanc(tmp_path / "orthanc")
    fhir = FhirTestServer().start()
    dermnode = start_dermnode(tmp_path / "dermnode", orthanc, fhir)
    stack = Stack(dermnode, orthanc, fhir)
    files = []
    for i in range(40):
        f = tmp_path / f"s{i}.dcm"
        write_source(f, synthetic_dermoscopy(240, 320, seed=i), jpeg=False)
        files.append(f)
    acked: list[str] = []

    try:
        t = store_burst(dermnode.port, files, acked)
        wait_for(lambda: len(acked) >= 10 and stack.db().execute(
            "SELECT COUNT(*) FROM jobs WHERE state = 'done'").fetchone()[0] >= 1, timeout=180, what="work under way")
        assert dermnode.proc is not None
        dermnode.proc.send_signal(signal.SIGKILL)
        dermnode.proc.wait(10)
        t.join(60)
        dermnode.start(timeout=120)
        wait_for(lambda: stack.db().execute(
            "SELECT COUNT(*) FROM jobs WHERE state != 'done'").fetchone()[0] == 0, timeout=600, what="all jobs done")
        jobs = {r["sop_instance_uid"]: r for r in stack.db().execute("SELECT * FROM jobs")}
        assert set(acked) <= set(jobs), "an acknowledged image was lost"
        assert all(r["state"] == "done" for r in jobs.values())
        n_objects = sum(2 if r["outcome"] == "analysed" else 1 for r in jobs.values())
        wait_for(lambda: len(stack.deliveries("done")) == n_objects + len(jobs), timeout=300, what="deliveries")
        keys = [(r["destination"], r["object_key"]) for r in stack.deliveries()]
        assert len(keys) == len(set(keys)) == n_objects + len(jobs)  # one per object and destination
        assert len(orthanc.instances()) == n_objects
    finally:
        dermnode.stop()
        fhir.stop()
        orthanc.stop()


@needs_models
def test_sigterm_finishes_or_requeues_and_nothing_is_lost(stack: Stack, tmp_path: Path) -> None:
    for i in range(3):
        write_source(tmp_path / f"t{i}.dcm", synthetic_dermoscopy(240, 320, seed=i), jpeg=False)
    stack.store(*(tmp_path / f"t{i}.dcm" for i in range(3)))
    assert stack.dermnode.stop() == 0
    states = [r["state"] for r in stack.db().execute("SELECT state FROM jobs")]
    assert len(states) == 3 and set(states) <= {"pending", "done"}  # finished, or waiting for the next start
    stack.dermnode.start(timeout=120)
    wait_for(lambda: all(r["state"] == "done" for r in stack.db().execute("SELECT state FROM jobs")), timeout=300,
             what="jobs done after restart")


@needs_models
def test_outputs_are_owner_only_and_token_is_never_logged(tmp_path: Path) -> None:
    require("storescu")
    orthanc = start_orthanc(tmp_path / "orthanc")
    fhir = FhirTestServer().start()
    secret = "s3cr3t-token-9f8e7d"
    fhir.token = secret
    dermnode = start_dermnode(tmp_path / "dermnode", orthanc, fhir, DERMNODE_FHIR__BEARER_TOKEN=secret,
                              DERMNODE_LOGGING__LEVEL="DEBUG")
    stack = Stack(dermnode, orthanc, fhir)
    try:
        write_source(tmp_path / "src.dcm")
        stack.store(tmp_path / "src.dcm")
        stack.wait_delivered(3)
        assert stack.fhir.count("DiagnosticReport") == 1
        var = dermnode.root / "var"
        files = [p for p in var.rglob("*") if p.is_file()]
        assert any(p.name == "seg.dcm" for p in files) and any(p.suffix == ".dcm" for p in (var / "spool").rglob("*"))
        for p in files:
            assert p.stat().st_mode & 0o077 == 0, f"{p} is readable by others"
    finally:
        dermnode.stop()
        fhir.stop()
        orthanc.stop()
    assert secret not in dermnode.log()


@needs_models
def test_undecodable_pixel_data_is_dead_lettered_with_its_reason(stack: Stack, tmp_path: Path) -> None:
    """The data set parses (so the SCP stores it) but its JPEG stream is cut: the job dead-letters, explained, and a
    not-analysable SR and FHIR report still reach the PACS and the EHR."""
    ds = write_source(tmp_path / "src.dcm")
    from pydicom.encaps import encapsulate, generate_fragmented_frames

    frame = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    ds.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
    stack.store(tmp_path / "cut.dcm")
    wait_for(lambda: stack.db().execute("SELECT state FROM jobs").fetchone()["state"] == "dead", timeout=120,
             what="dead-lettered job")
    doc = json.loads(stack.dermnode.cli("status", "--json", "--dead-letters").stdout)
    assert doc["jobs"]["dead_letter"] == 1
    (dl,) = doc["dead_letters"]
    assert dl["sop_instance_uid"] == ds.SOPInstanceUID and "DecodeError" in dl["error"]
    assert "image data could not be decoded" in dl["error"]
    assert stack.dermnode.proc is not None and stack.dermnode.proc.poll() is None
    # the clinician is told too (issue 16 item 5): a not-analysable SR in the PACS, a report in the EHR
    stack.wait_delivered(2)
    assert sorted(orthanc_study_instances(stack.orthanc, ds.StudyInstanceUID).values()) == ["SR"]
    report = next(iter(stack.fhir.resources["DiagnosticReport"].values()))
    assert "Not analysable: image data could not be decoded" in report["conclusion"]
    assert report["status"] == "preliminary"
