"""The Store SCP against real DCMTK peers (echoscu, storescu) and a pynetdicom client.

``dermnode serve`` runs as a subprocess in receive-only mode (``workers.count = 0``) so these tests need no
models; processing of received images is covered in the end-to-end tests.
"""

from __future__ import annotations

import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE

from dermnode.dicom_io.reading import decode_rgb
from dermnode.dicom_io.uids import (
    DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE,
    MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    VL_PHOTOGRAPHIC_IMAGE_STORAGE,
)
from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
from dermnode_proc import DermnodeProcess, dermnode_env, require, run_tool, store_burst, wait_for
from peers import free_port
from synthetic import synthetic_dermoscopy

pytestmark = pytest.mark.integration


@pytest.fixture
def scp(tmp_path: Path):  # type: ignore[no-untyped-def]
    require("storescu")
    port = free_port()
    proc = DermnodeProcess(
        tmp_path,
        port,
        dermnode_env(
            tmp_path,
            port,
            {
                "DERMNODE_WORKERS__COUNT": "0",
                "DERMNODE_SCP__ALLOWED_CALLING_AETS": "MODALITY,ROUTER",
                "DERMNODE_SCP__MAX_ASSOCIATIONS": "25",
            },
        ),
    )
    proc.start()
    yield proc
    proc.stop()


def _db(proc: DermnodeProcess) -> sqlite3.Connection:
    conn = sqlite3.connect(proc.root / "var" / "dermnode.db")
    conn.row_factory = sqlite3.Row
    return conn


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def make_source(
    tmp: Path,
    name: str,
    *,
    sop_class: str = DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE,
    seed: int = 0,
    size: tuple[int, int] = (96, 128),
) -> Path:
    ds = wrap_rgb(synthetic_dermoscopy(*size, seed=seed), WrapOptions(pixel_spacing_mm=0.05))
    if sop_class != DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE:
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.Modality = "XC" if sop_class == VL_PHOTOGRAPHIC_IMAGE_STORAGE else "OT"
        if sop_class == MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE:
            ds.NumberOfFrames = 1
    return _write(ds, tmp / f"{name}.dcm")


def transcode(src: Path, dst: Path, syntax: str) -> Path:
    """Produce a file in ``syntax`` with DCMTK (JPEG, RLE, deflate) or pydicom (J2K, implicit VR)."""
    if syntax == JPEGBaseline8Bit:
        run_tool(["dcmcjpeg", "+eb", "+q", "95", str(src), str(dst)]).check_returncode()
    elif syntax == JPEGExtended12Bit:
        run_tool(["dcmcjpeg", "+ee", str(src), str(dst)]).check_returncode()
    elif syntax == JPEGLosslessSV1:
        run_tool(["dcmcjpeg", "+e1", str(src), str(dst)]).check_returncode()
    elif syntax == RLELossless:
        run_tool(["dcmcrle", str(src), str(dst)]).check_returncode()
    elif syntax == DeflatedExplicitVRLittleEndian:
        run_tool(["dcmconv", "+td", str(src), str(dst)]).check_returncode()
    elif syntax in (JPEG2000Lossless, JPEG2000):
        ds = pydicom.dcmread(src)
        kwargs = {} if syntax == JPEG2000Lossless else {"j2k_cr": [20]}
        ds.compress(syntax, encoding_plugin="pylibjpeg", **kwargs)
        ds.save_as(dst, enforce_file_format=True)
    elif syntax == ImplicitVRLittleEndian:
        ds = pydicom.dcmread(src)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(dst, implicit_vr=True, little_endian=True, enforce_file_format=True)
    else:
        dst.write_bytes(src.read_bytes())
    assert pydicom.dcmread(dst).file_meta.TransferSyntaxUID == syntax
    return dst


PROPOSE_FLAG = {
    ExplicitVRLittleEndian: "-xe",
    ImplicitVRLittleEndian: "-xi",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}


def storescu(
    proc: DermnodeProcess, files: list[Path], *extra: str, aet: str = "MODALITY", aec: str = "DERMNODE"
) -> subprocess.CompletedProcess[str]:
    return run_tool(["storescu", "-v", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(proc.port), *map(str, files)])


def test_echo_accepted_for_allowed_aet(scp: DermnodeProcess) -> None:
    res = run_tool(["echoscu", "-aet", "MODALITY", "-aec", "DERMNODE", "127.0.0.1", str(scp.port)])
    assert res.returncode == 0, res.stderr


def test_unknown_calling_aet_is_refused(scp: DermnodeProcess) -> None:
    res = run_tool(["echoscu", "-aet", "INTRUDER", "-aec", "DERMNODE", "127.0.0.1", str(scp.port)])
    assert res.returncode != 0
    assert "Rejected" in res.stdout + res.stderr


def test_wrong_called_aet_is_refused(scp: DermnodeProcess) -> None:
    res = run_tool(["echoscu", "-aet", "MODALITY", "-aec", "NOTDERM", "127.0.0.1", str(scp.port)])
    assert res.returncode != 0
    assert "Rejected" in res.stdout + res.stderr


def test_unsupported_sop_class_refused_at_negotiation(scp: DermnodeProcess, tmp_path: Path) -> None:
    ct = make_source(tmp_path, "ct", sop_class="1.2.840.10008.5.1.4.1.1.2")
    res = storescu(scp, [ct], "-R")
    assert res.returncode != 0 or "No presentation context" in res.stdout + res.stderr
    assert "No presentation context" in res.stdout + res.stderr or "no acceptable" in (res.stdout + res.stderr).lower()
    assert _db(scp).execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


@pytest.mark.parametrize(
    "sop_class",
    [
        DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE,
        VL_PHOTOGRAPHIC_IMAGE_STORAGE,
        SECONDARY_CAPTURE_IMAGE_STORAGE,
        MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE,
    ],
)
def test_every_accepted_sop_class_round_trips(scp: DermnodeProcess, tmp_path: Path, sop_class: str) -> None:
    src = make_source(tmp_path, "src", sop_class=sop_class)
    res = storescu(scp, [src], "-R", "-xe")
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_stored_intact(scp, src)


@pytest.mark.parametrize("syntax", list(PROPOSE_FLAG), ids=lambda s: s.name)
def test_every_transfer_syntax_round_trips(scp: DermnodeProcess, tmp_path: Path, syntax: str) -> None:
    require("dcmcjpeg")
    src = transcode(make_source(tmp_path, "native"), tmp_path / "ts.dcm", syntax)
    res = storescu(scp, [src], "-R", PROPOSE_FLAG[syntax])
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_stored_intact(scp, src)


def _assert_stored_intact(proc: DermnodeProcess, sent: Path) -> None:
    sent_ds = pydicom.dcmread(sent)
    row = _db(proc).execute("SELECT * FROM jobs WHERE sop_instance_uid = ?", (sent_ds.SOPInstanceUID,)).fetchone()
    assert row is not None, "acknowledged instance has no job"
    assert row["state"] == "pending" and row["calling_aet"] == "MODALITY"
    stored = pydicom.dcmread(row["path"])
    assert stored.file_meta.TransferSyntaxUID == sent_ds.file_meta.TransferSyntaxUID
    assert stored.SOPInstanceUID == sent_ds.SOPInstanceUID
    np.testing.assert_array_equal(decode_rgb(stored), decode_rgb(sent_ds))
    assert (Path(row["path"]).stat().st_mode & 0o077) == 0, "spool files must be owner-only"


def test_repeated_instance_is_stored_once(scp: DermnodeProcess, tmp_path: Path) -> None:
    src = make_source(tmp_path, "dup")
    for _ in range(2):
        res = storescu(scp, [src], "-R", "-xe")
        assert res.returncode == 0, res.stdout + res.stderr
    assert _db(scp).execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


def test_resent_instance_of_a_dead_lettered_job_is_processed_again(scp: DermnodeProcess, tmp_path: Path) -> None:
    """A modality re-sends an image whose first copy was dead-lettered: it is stored again and re-queued."""
    src = make_source(tmp_path, "poison")
    uid = str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)
    assert storescu(scp, [src], "-R", "-xe").returncode == 0
    with _db(scp) as conn:  # what a worker does when the analysis of the first copy fails for good
        conn.execute(
            "UPDATE jobs SET state = 'dead', attempts = 3, last_error = 'DecodeError: truncated'"
            " WHERE sop_instance_uid = ?",
            (uid,),
        )
        conn.execute(
            "INSERT INTO dead_letters (kind, ref_id, sop_instance_uid, attempts, error, created_at)"
            " SELECT 'job', id, sop_instance_uid, 3, 'DecodeError: truncated', 0 FROM jobs"
        )
    res = storescu(scp, [src], "-R", "-xe")
    assert res.returncode == 0, res.stdout + res.stderr
    row = _db(scp).execute("SELECT * FROM jobs WHERE sop_instance_uid = ?", (uid,)).fetchone()
    assert (row["state"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    assert pydicom.dcmread(row["path"]).SOPInstanceUID == uid
    assert _db(scp).execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    assert "re-received" in scp.log()


def _c_store(scp: DermnodeProcess, ds: pydicom.Dataset) -> pydicom.Dataset:
    """One C-STORE of ``ds`` from a pynetdicom client (Explicit VR Little Endian); the response status."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DERMNODE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    return status


def test_sop_instance_uid_with_a_path_is_refused(scp: DermnodeProcess, tmp_path: Path) -> None:
    """``../`` in the SOP Instance UID: 0xC213, nothing written outside the spool, nothing queued."""
    ds = pydicom.dcmread(make_source(tmp_path, "evil"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "../../../../ESCAPED"
    status = _c_store(scp, ds)
    assert status.Status == 0xC213
    assert not list(tmp_path.rglob("ESCAPED*")) and not list(tmp_path.parent.glob("ESCAPED*"))
    assert _db(scp).execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    assert "is not a valid DICOM UID" in scp.log()


GARBLED = [
    b"\x08\x00\x16\x00UI\xff\x7f1.2.3",  # an element announcing far more bytes than follow
    b"\x08\x00\x18\x00SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00abc",  # broken sequence
    b"\x28\x00\x10\x00US\x02",  # truncated element header
]


@pytest.mark.parametrize("garbage", GARBLED)
def test_corrupt_dataset_gets_error_status_and_server_keeps_serving(
    scp: DermnodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, garbage: bytes
) -> None:
    """The client sends a garbled dataset stream (pynetdicom's encoder replaced for this association)."""
    import pynetdicom.association

    ds = pydicom.dcmread(make_source(tmp_path, "good"))
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *a, **k: garbage)
    status = _c_store(scp, ds)
    monkeypatch.undo()
    assert 0xC000 <= status.Status <= 0xCFFF, hex(status.Status)
    assert _db(scp).execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    # still serving
    good = make_source(tmp_path, "after")
    assert storescu(scp, [good], "-R", "-xe").returncode == 0
    assert scp.proc is not None and scp.proc.poll() is None


def test_concurrent_associations_lose_nothing(scp: DermnodeProcess, tmp_path: Path) -> None:
    """20 concurrent storescu associations x 10 images each: all 200 acknowledged and queued."""
    batches = []
    for a in range(20):
        d = tmp_path / f"batch{a}"
        d.mkdir()
        batches.append([make_source(d, f"img{i}", seed=a * 10 + i, size=(48, 64)) for i in range(10)])
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda files: storescu(scp, files, "-R", "-xe"), batches))
    for res in results:
        assert res.returncode == 0, res.stdout + res.stderr
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for b in batches for f in b}
    stored = {r[0] for r in _db(scp).execute("SELECT sop_instance_uid FROM jobs")}
    assert stored == sent and len(sent) == 200


def test_kill9_mid_burst_keeps_every_acknowledged_image(tmp_path: Path) -> None:
    """kill -9 while a client is storing: every instance that got a success status is spooled and queued."""
    port = free_port()
    proc = DermnodeProcess(tmp_path, port, dermnode_env(tmp_path, port, {"DERMNODE_WORKERS__COUNT": "0"}))
    proc.start()
    files = [make_source(tmp_path, f"b{i}", seed=i, size=(48, 64)) for i in range(400)]
    acked: list[str] = []
    t = store_burst(port, files, acked)
    wait_for(lambda: len(acked) >= 20, timeout=60, what="first acknowledgements")
    proc.kill9()
    t.join(60)
    assert not t.is_alive()
    assert 20 <= len(acked) < len(files)
    proc.start()  # restart on the same storage: recovery must not lose or duplicate anything
    try:
        rows = {r["sop_instance_uid"]: r for r in _db(proc).execute("SELECT * FROM jobs")}
        for uid in acked:
            assert uid in rows, f"acknowledged {uid} lost"
            assert pydicom.dcmread(rows[uid]["path"]).SOPInstanceUID == uid
        assert len(rows) == len(set(rows))
    finally:
        proc.stop()


def test_status_command_reports_queue(scp: DermnodeProcess, tmp_path: Path) -> None:
    storescu(scp, [make_source(tmp_path, "s1"), make_source(tmp_path, "s2", seed=2)], "-R", "-xe")
    res = scp.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    import json

    doc = json.loads(res.stdout)
    assert doc["jobs"]["pending"] == 2 and doc["jobs"]["done"] == 0


def test_low_disk_space_answers_out_of_resources(tmp_path: Path) -> None:
    """Below storage.min_free_mb the SCP answers 0xA700, logs why, and stores nothing."""
    require("storescu")
    port = free_port()
    env = dermnode_env(tmp_path, port, {"DERMNODE_WORKERS__COUNT": "0", "DERMNODE_STORAGE__MIN_FREE_MB": "999999999"})
    proc = DermnodeProcess(tmp_path, port, env)
    proc.start()
    try:
        ds = pydicom.dcmread(make_source(tmp_path, "full"))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="DERMNODE")
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0xA700
        assert _db(proc).execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    finally:
        proc.stop()
    assert "storage.min_free_mb" in proc.log()
