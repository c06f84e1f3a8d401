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


def orthanc_instance_id(orthanc: Orthanc, sop_instance_uid: str) -> str:
    """Orthanc's identifier of the instance with ``sop_instance_uid``."""
    for iid in orthanc.instances():
        if orthanc.get(f"/instances/{iid}")["MainDicomTags"]["SOPInstanceUID"] == sop_instance_uid:
            return str(iid)
    raise AssertionError(f"{sop_instance_uid} is not in Orthanc")


def orthanc_bytes(orthanc: Orthanc, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}{path}", timeout=30) as rsp:
        return bytes(rsp.read())


def orthanc_dataset(orthanc: Orthanc, sop_instance_uid: str) -> pydicom.Dataset:
    """The instance as Orthanc stored it (``/instances/{id}/file``)."""
    import io

    data = orthanc_bytes(orthanc, f"/instances/{orthanc_instance_id(orthanc, sop_instance_uid)}/file")
    return pydicom.dcmread(io.BytesIO(data))


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
    stack.wait_delivered(4)  # SEG + presentation state + SR to Orthanc, bundle to FHIR
    # the outputs are queued before the job's own row is closed: the outbox may finish first
    wait_for(lambda: stack.db().execute("SELECT state FROM jobs").fetchone()["state"] == "done", timeout=60.0,
             what="job done")
    job = stack.db().execute("SELECT * FROM jobs").fetchone()
    assert job["state"] == "done" and job["outcome"] == "analysed"
    inst = orthanc_study_instances(stack.orthanc, src.StudyInstanceUID)
    assert sorted(inst.values()) == ["PR", "SEG", "SR"], inst
    assert stack.fhir.count("DiagnosticReport") == 1
    report = next(iter(stack.fhir.resources["DiagnosticReport"].values()))
    assert "decision support" in report["conclusion"].lower()
    # status agrees
    doc = json.loads(stack.dermnode.cli("status", "--json").stdout)
    assert doc["jobs"]["done"] == 1 and doc["deliveries"]["done"] == 4
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
    assert "dermnode_delivered_total 4" in metrics and "dermnode_queue_depth 0" in metrics
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
        stack.wait_delivered(4)
        inst = orthanc_study_instances(orthanc, src.StudyInstanceUID)
        assert sorted(inst.values()) == ["PR", "SEG", "SR"]
        assert len(orthanc.instances()) == 3  # delivered once
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
        wait_for(lambda: len(orthanc_study_instances(orthanc, src.StudyInstanceUID)) == 4, timeout=180,
                 what="SEG, presentation state and SR back in Orthanc")
        assert sorted(orthanc_study_instances(orthanc, src.StudyInstanceUID).values()) == ["DMS", "PR", "SEG", "SR"]
    finally:
        dermnode.stop()
        fhir.stop()
        orthanc.stop()


@needs_models
def test_not_analysable_image_gets_sr_with_reason_and_no_seg(stack: Stack, tmp_path: Path) -> None:
    blank = np.full((300, 400, 3), 128, np.uint8)
    src = write_source(tmp_path / "blank.dcm", blank, jpeg=False)
    stack.store(tmp_path / "blank.dcm")
    stack.wait_delivered(3)  # presentation state + SR, FHIR
    job = stack.db().execute("SELECT * FROM jobs").fetchone()
    assert job["outcome"] == "not_analysable"
    inst = orthanc_study_instances(stack.orthanc, src.StudyInstanceUID)
    assert sorted(inst.values()) == ["PR", "SR"]
    # the presentation state says why, on the image
    (pr_uid,) = [uid for uid, modality in inst.items() if modality == "PR"]
    pr = orthanc_dataset(stack.orthanc, pr_uid)
    text = " ".join(t.UnformattedTextValue for a in pr.GraphicAnnotationSequence
                    for t in a.get("TextObjectSequence", []))
    assert text.startswith("not analysable: ")
    assert "GraphicObjectSequence" not in pr.GraphicAnnotationSequence[0]  # no outline of a refused image
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
    stack.wait_delivered(4)
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
    stack.wait_delivered(4)
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
        for f in [*models_dir().glob("*.pt"), *models_dir().glob("*.onnx")]:  # weights and their ONNX exports
            blob = bytearray(f.read_bytes())
            blob[len(blob) // 2] ^= 0xFF
            (models / f.name).write_bytes(bytes(blob))
        res = proc.cli("serve", timeout=120)
        assert res.returncode != 0 and "sha256" in res.stderr.lower()
        for f in models.glob("*.onnx"):  # an export that is gone is named, not a traceback
            f.unlink()
        res = proc.cli("serve", timeout=120)
        assert res.returncode != 0 and ".onnx is missing" in res.stderr and "Traceback" not in res.stderr


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
        # SEG, presentation state and SR of an analysed image; presentation state and SR of a refused one
        n_objects = sum(3 if r["outcome"] == "analysed" else 2 for r in jobs.values())
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
        stack.wait_delivered(4)
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
    stack.wait_delivered(3)  # presentation state and SR, FHIR report
    assert sorted(orthanc_study_instances(stack.orthanc, ds.StudyInstanceUID).values()) == ["PR", "SR"]
    report = next(iter(stack.fhir.resources["DiagnosticReport"].values()))
    assert "Not analysable: image data could not be decoded" in report["conclusion"]
    assert report["status"] == "preliminary"


# --- issue 18: the outline in any viewer (presentation state, key image) -------------------------------------
GREEN = (0, 255, 0)  # OUTLINE_RGB of dermnode.dicom_io.presentation_state: the key image's outline colour


def boundary_centres(mask: np.ndarray) -> np.ndarray:
    """``(N, 2)`` PIXEL coordinates (column, row) of the centres of the mask's boundary pixels (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    interior = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    rows, cols = np.nonzero(inner & ~interior)
    return np.column_stack([cols, rows]).astype(np.float64) + 0.5


def nearest_distances(points: np.ndarray, targets: np.ndarray, chunk: int = 1024) -> np.ndarray:
    out = np.empty(len(points))
    for i in range(0, len(points), chunk):
        out[i : i + chunk] = np.linalg.norm(points[i : i + chunk, None, :] - targets[None, :, :], axis=2).min(axis=1)
    return out


def sample_polyline(points: np.ndarray, step: float = 0.1) -> np.ndarray:
    import itertools

    parts = []
    for p, q in itertools.pairwise(points):
        n = max(1, int(np.ceil(np.linalg.norm(q - p) / step)))
        parts.append(p + np.linspace(0.0, 1.0, n + 1)[:, None] * (q - p))
    return np.vstack(parts)


def sr_items(items: pydicom.Sequence) -> list[pydicom.Dataset]:
    found: list[pydicom.Dataset] = []
    for item in items:
        found.append(item)
        found.extend(sr_items(item.get("ContentSequence", [])))
    return found


@needs_models
def test_presentation_state_and_key_image_reach_the_source_study_and_show_the_outline(tmp_path: Path) -> None:
    """Issue 18: with ``output.burned_in_image`` on, Orthanc stores SEG, presentation state, key image and SR in the
    source's study. Read back from Orthanc: the presentation state's polyline stays within 1 px of the SEG's
    boundary and references the source instance; the key image rendered by Orthanc (``/preview``, PNG) has its
    green outline pixels within 2 px of the boundary; the SR names both. Resending every delivery and re-running
    the analysis give the same UIDs: nothing is duplicated."""
    import io

    from PIL import Image

    require("storescu")
    orthanc = start_orthanc(tmp_path / "orthanc")
    fhir = FhirTestServer().start()
    dermnode = start_dermnode(tmp_path / "dermnode", orthanc, fhir, DERMNODE_OUTPUT__BURNED_IN_IMAGE="true")
    stack = Stack(dermnode, orthanc, fhir)
    try:
        src = write_source(tmp_path / "src.dcm")
        stack.store(tmp_path / "src.dcm")
        stack.wait_delivered(5)  # SEG, PR, key image, SR; FHIR
        inst = orthanc_study_instances(orthanc, src.StudyInstanceUID)
        assert sorted(inst.values()) == ["OT", "PR", "SEG", "SR"], inst
        by_modality = {modality: uid for uid, modality in inst.items()}
        results = dermnode.root / "var" / "results" / src.SOPInstanceUID
        doc = json.loads((results / "result.json").read_text())
        assert doc["outputs"]["presentation_state_sop_instance_uid"] == by_modality["PR"]
        assert doc["outputs"]["key_image_sop_instance_uid"] == by_modality["OT"]
        assert {"pr.dcm", "key-image.dcm", "seg.dcm", "sr.dcm"} <= set(doc["outputs"]["files"])
        assert "errors" not in doc["outputs"]

        seg = orthanc_dataset(orthanc, by_modality["SEG"])
        mask = seg.pixel_array.astype(bool)
        assert mask.shape == (src.Rows, src.Columns) and mask.any()
        boundary = boundary_centres(mask)

        # the presentation state: the right image, and the outline on the SEG's boundary
        pr = orthanc_dataset(orthanc, by_modality["PR"])
        assert pr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.2" and pr.StudyInstanceUID == src.StudyInstanceUID
        (series_ref,) = pr.ReferencedSeriesSequence
        (image_ref,) = series_ref.ReferencedImageSequence
        assert series_ref.SeriesInstanceUID == src.SeriesInstanceUID
        assert image_ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert image_ref.ReferencedSOPClassUID == src.SOPClassUID
        assert "ReferencedFrameNumber" not in image_ref  # a single-frame source: the whole image (frame 1)
        (outline_annotation,) = [a for a in pr.GraphicAnnotationSequence if a.GraphicLayer == "LESION_OUTLINE"]
        assert outline_annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        (polyline,) = outline_annotation.GraphicObjectSequence
        assert polyline.GraphicType == "POLYLINE" and polyline.GraphicAnnotationUnits == "PIXEL"
        points = np.asarray(polyline.GraphicData, dtype=np.float64).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1]) and len(points) <= 300
        assert nearest_distances(sample_polyline(points), boundary).max() <= 1.0 + 1e-9
        # ... and it goes round the lesion (the mask of one lesion: its boundary lies within 1 px of the outline)
        assert np.mean(nearest_distances(boundary, sample_polyline(points, 0.05)) <= 1.05) >= 0.9

        # the key image as a PACS renders it: green outline pixels on the boundary
        ki = orthanc_dataset(orthanc, by_modality["OT"])
        assert ki.BurnedInAnnotation == "YES" and "not for diagnosis" in ki.SeriesDescription
        assert ki.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        png = orthanc_bytes(orthanc, f"/instances/{orthanc_instance_id(orthanc, by_modality['OT'])}/preview")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        rendered = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert rendered.shape == (src.Rows, src.Columns, 3)
        rows, cols = np.nonzero(np.all(rendered == np.array(GREEN, np.uint8), axis=2))
        green = np.column_stack([cols, rows]).astype(np.float64) + 0.5
        assert len(green) >= 0.5 * len(sample_polyline(points, 1.0)), "the outline is drawn"
        assert nearest_distances(green, boundary).max() <= 2.0
        # the source itself has no such pixels: they are the outline, not the skin
        assert not np.all(pydicom.dcmread(tmp_path / "src.dcm").pixel_array == np.array(GREEN, np.uint8), axis=2).any()

        # the SR names the presentation state with the source image and lists both objects as evidence
        sr = orthanc_dataset(orthanc, by_modality["SR"])
        library_refs = [
            ref for item in sr_items(sr.ContentSequence)
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeMeaning == "Source"
            for ref in item.ReferencedSOPSequence
        ]
        assert [r.ReferencedSOPInstanceUID for r in library_refs] == [src.SOPInstanceUID]
        assert library_refs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == by_modality["PR"]
        evidence = {
            ref.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert {src.SOPInstanceUID, by_modality["SEG"], by_modality["PR"], by_modality["OT"]} <= evidence

        # FHIR: the ImagingStudy lists the presentation state's and the key image's series
        (study,) = stack.fhir.resources["ImagingStudy"].values()
        listed = {i["uid"] for s in study["series"] for i in s["instance"]}
        assert {by_modality["PR"], by_modality["OT"]} <= listed

        # a resend (every delivery again) and a re-run of the analysis never duplicate anything
        with stack.db() as conn:
            conn.execute("UPDATE deliveries SET state = 'pending', next_attempt_at = 0")
        wait_for(lambda: len(stack.deliveries("done")) == 5, timeout=180, what="every delivery resent")
        assert len(orthanc.instances()) == 4
        assert sorted(orthanc_study_instances(orthanc, src.StudyInstanceUID).values()) == ["OT", "PR", "SEG", "SR"]
        again = tmp_path / "again"
        res = dermnode.cli("analyze", str(tmp_path / "src.dcm"), "--out", str(again))
        assert res.returncode == 0, res.stdout + res.stderr
        rerun = json.loads((again / src.SOPInstanceUID / "result.json").read_text())["outputs"]
        for key in ("seg_sop_instance_uid", "presentation_state_sop_instance_uid", "key_image_sop_instance_uid",
                    "sr_sop_instance_uid"):
            assert rerun[key] == doc["outputs"][key], key
    finally:
        dermnode.stop()
        fhir.stop()
        orthanc.stop()
