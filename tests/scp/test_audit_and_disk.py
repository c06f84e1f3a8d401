"""The SCP's audit line for a rejected association (issue 16 item 16) and its low-disk warning (item 18)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from pynetdicom import AE

from dermnode.dicom_io.wrap import WrapOptions, wrap_rgb
from dermnode.scp.server import start_server
from dermnode.scp.spool import Spool
from dermnode.settings import ScpSettings
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import JobQueue
from peers import free_port
from synthetic import synthetic_dermoscopy


def _server(tmp_path: Path, min_free_mb: int = 1, **scp: object):  # type: ignore[no-untyped-def]
    root = tmp_path / "var"
    spool = Spool(root, min_free_mb, fsync=False)
    queue = JobQueue(database_path(root), max_attempts=3, retry_delay_s=0.0)
    return start_server(ScpSettings(port=free_port(), **scp), spool, queue)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("calling", "called", "reason"),
    [
        ("MODALITY", "WRONGAET", "called AE title not recognised"),
        ("STRANGER", "DERMNODE", "calling AE title not recognised"),
    ],
)
def test_rejected_association_audit_names_called_aet_and_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, calling: str, called: str, reason: str
) -> None:
    srv = _server(tmp_path, allowed_calling_aets=("MODALITY",))
    try:
        ae = AE(ae_title=calling)
        ae.add_requested_context("1.2.840.10008.1.1")
        with caplog.at_level(logging.INFO, logger="dermnode.audit"):
            assoc = ae.associate("127.0.0.1", srv.server_address[1], ae_title=called)
            assert assoc.is_rejected
        lines = [r.getMessage() for r in caplog.records if r.name == "dermnode.audit" and "rejected" in r.getMessage()]
        assert lines, [r.getMessage() for r in caplog.records]
        line = lines[-1]
        assert f"calling AE {calling}" in line and f"called AE {called}" in line
        assert reason.lower() in line.lower() and "rejected permanent" in line.lower()
    finally:
        srv.shutdown()


def _store(port: int, seed: int) -> int:
    ds = wrap_rgb(synthetic_dermoscopy(60, 80, seed=seed), WrapOptions())
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def test_low_disk_is_warned_once_before_refusals_begin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Free disk between storage.min_free_mb and twice that: stored, with one warning (rate-limited)."""
    tmp_path.mkdir(exist_ok=True)
    free_mb = shutil.disk_usage(tmp_path).free / 1_048_576
    minimum = int(free_mb * 0.7)  # free is 1.43x the minimum: above it, but approaching
    srv = _server(tmp_path, min_free_mb=minimum)
    try:
        with caplog.at_level(logging.WARNING):
            assert _store(srv.server_address[1], 1) == 0x0000
            assert _store(srv.server_address[1], 2) == 0x0000
        warnings = [r.getMessage() for r in caplog.records if "storage.min_free_mb" in r.getMessage()
                    and "approach" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert str(minimum) in warnings[0]
    finally:
        srv.shutdown()


def test_enough_disk_gives_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    srv = _server(tmp_path, min_free_mb=1)
    try:
        with caplog.at_level(logging.WARNING):
            assert _store(srv.server_address[1], 3) == 0x0000
        assert not [r for r in caplog.records if "min_free_mb" in r.getMessage()]
    finally:
        srv.shutdown()
