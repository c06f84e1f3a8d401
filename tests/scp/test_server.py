"""The Store SCP in-process on a free port with real pynetdicom clients: association limit, C-STORE statuses."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
from dermnode.scp.server import STATUS_INVALID_UID, start_server
from dermnode.scp.spool import Spool
from dermnode.settings import ScpSettings
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import JobQueue
from peers import free_port
from synthetic import synthetic_dermoscopy


def _associate(port: int):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title="DERMNODE")


def test_bare_tcp_connections_do_not_use_up_the_association_limit(tmp_path: Path) -> None:
    """Health checks that connect and say nothing must not make real associations be refused."""
    srv = start_server(
        ScpSettings(port=free_port(), max_associations=2, acse_timeout_s=30),
        Spool(tmp_path, 1, fsync=False),
        JobQueue(database_path(tmp_path)),
    )
    port = srv.server_address[1]
    probes = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        first, second, third = _associate(port), _associate(port), _associate(port)
        assert first.is_established and second.is_established
        assert third.is_rejected  # the limit itself still holds
        for a in (first, second):
            a.release()
    finally:
        for p in probes:
            p.close()
        srv.shutdown()


@pytest.fixture
def store_scp(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An in-process Store SCP on a free port with its spool and queue under ``tmp_path/var``."""
    root = tmp_path / "var"
    spool = Spool(root, 1, fsync=False)
    queue = JobQueue(database_path(root), max_attempts=3, retry_delay_s=0.0)
    srv = start_server(ScpSettings(port=free_port()), spool, queue)
    yield srv.server_address[1], spool, queue
    srv.shutdown()


def _instance(sop_instance_uid: str | None = None, seed: int = 0) -> Dataset:
    ds = wrap_rgb(synthetic_dermoscopy(32, 48, seed=seed), WrapOptions(sop_instance_uid=sop_instance_uid))
    return ds


def _c_store(port: int, ds: Dataset) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(str(ds.SOPClassUID), ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert "Status" in status, "no C-STORE response"
    return int(status.Status)


def _files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("uid", ["../../../ESCAPED_REL", "ESCAPED_ABS", "1.2.3/../../../ESCAPED", "1.2.3.", "1..2"])
def test_sop_instance_uid_that_is_not_a_uid_is_refused_and_nothing_escapes(
    store_scp, tmp_path: Path, uid: str, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """The UID names the spool file: ``../`` or an absolute path must not write outside the spool."""
    port, spool, queue = store_scp
    with tempfile.TemporaryDirectory(dir="/tmp") as outside:  # short: a UID has at most 64 characters
        if uid == "ESCAPED_ABS":
            uid = f"{outside}/ESCAPED_ABS"
        before = _files_under(tmp_path)
        ds = _instance()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        with caplog.at_level(logging.WARNING, logger="dermnode"):
            assert _c_store(port, ds) == STATUS_INVALID_UID == 0xC213
        assert _files_under(tmp_path) - before <= {"var/dermnode.db-wal", "var/dermnode.db-shm"}
        assert os.listdir(outside) == []
    assert not list(spool.files()) and queue.counts()["pending"] == 0
    assert "is not a valid DICOM UID" in caplog.text
    # the server still stores valid instances
    good = _instance(seed=1)
    assert _c_store(port, good) == 0x0000
    assert queue.state(str(good.SOPInstanceUID)) == "pending"


def test_resent_instance_of_a_dead_job_is_stored_again_and_requeued(
    store_scp, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    port, spool, queue = store_scp
    ds = _instance()
    uid = str(ds.SOPInstanceUID)
    assert _c_store(port, ds) == 0x0000
    job = queue.claim("w")
    assert job is not None
    queue.fail(job, "DecodeError: truncated pixel data", permanent=True)
    assert queue.state(uid) == "dead"

    ds.SeriesDescription = "second copy"  # e.g. the modality re-sent a repaired file
    with caplog.at_level(logging.INFO, logger="dermnode"):
        assert _c_store(port, ds) == 0x0000
    row = queue.get(uid)
    assert row is not None
    assert (row["state"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    assert pydicom.dcmread(row["path"]).SeriesDescription == "second copy"  # the new copy replaced the old
    assert [p.name for p in spool.files()] == [f"{uid}.dcm"]
    assert queue.dead_letters()[0]["replayed_at"] is not None
    assert "re-received" in caplog.text

    # in any other state a re-sent instance stays a duplicate: success, not re-queued, file untouched
    job = queue.claim("w")
    assert job is not None
    queue.complete(job, "analysed")
    ds.SeriesDescription = "third copy"
    assert _c_store(port, ds) == 0x0000
    row = queue.get(uid)
    assert row is not None and row["state"] == "done" and row["attempts"] == 1
    assert pydicom.dcmread(row["path"]).SeriesDescription == "second copy"


class _BrokenConnection:
    def execute(self, *args: Any) -> Any:
        raise sqlite3.OperationalError("database disk image is malformed")


@pytest.mark.parametrize("broken", ["duplicate check", "enqueue"])
def test_database_error_answers_out_of_resources(store_scp, monkeypatch: pytest.MonkeyPatch, broken: str) -> None:  # type: ignore[no-untyped-def]
    """A raw sqlite3 error must not escape to pynetdicom (which would answer 0xC211)."""
    port, _spool, queue = store_scp
    if broken == "duplicate check":
        monkeypatch.setattr(queue, "_conn", _BrokenConnection)
    else:
        real_enqueue = queue.enqueue

        def enqueue(*args: Any, **kwargs: Any) -> bool:
            monkeypatch.setattr(queue, "_conn", _BrokenConnection)
            return real_enqueue(*args, **kwargs)

        monkeypatch.setattr(queue, "enqueue", enqueue)
    assert _c_store(port, _instance()) == 0xA700
