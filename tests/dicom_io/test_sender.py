"""C-STORE delivery to real peers on loopback: DCMTK storescp and Orthanc; failure classification; one job's objects
over one association, each with its own outcome (issue 12)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicom_output_cases import make_case
from pydicom.uid import generate_uid

from dermnode.delivery import build_deliverers
from dermnode.dicom_io import sender
from dermnode.dicom_io.seg import build_segmentation
from dermnode.dicom_io.sender import is_transient_status, send_each, send_files
from dermnode.dicom_io.sr import build_report
from dermnode.errors import DeliveryError
from dermnode.settings import DeliverySettings, OutputSettings, PacsDestination, ScpSettings, Settings
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import JobQueue
from dermnode.workqueue.outbox import BatchDeliverer, Outbox
from peers import free_port, start_orthanc, start_storescp, wait_until


@pytest.fixture
def outputs(tmp_path: Path) -> list[Path]:
    case = make_case()
    settings = OutputSettings()
    seg = build_segmentation(case.source, case.result, settings, software_version="0.1.0")
    sr = build_report(case.source, case.result, seg, settings, software_version="0.1.0")
    paths = [tmp_path / "seg.dcm", tmp_path / "sr.dcm"]
    seg.save_as(paths[0], enforce_file_format=True)
    sr.save_as(paths[1], enforce_file_format=True)
    return paths


@pytest.fixture
def job_outputs(tmp_path: Path, outputs: list[Path]) -> list[Path]:
    """Three result objects of one job (SEG, SR, and a third instance standing for the presentation state)."""
    third = pydicom.dcmread(outputs[1])
    third.SOPInstanceUID = generate_uid()
    third.file_meta.MediaStorageSOPInstanceUID = third.SOPInstanceUID
    path = tmp_path / "third.dcm"
    third.save_as(path, enforce_file_format=True)
    return [*outputs, path]


def _uids(paths: list[Path]) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.integration
def test_send_to_storescp(tmp_path: Path, outputs: list[Path]) -> None:
    scp = start_storescp(tmp_path / "received")
    try:
        destination = PacsDestination(name="dcmtk", ae_title=scp.aet, host="127.0.0.1", port=scp.port)
        send_files(destination, "DERMNODE", outputs, timeout_s=20)
        received = wait_until(lambda: len(scp.received()) >= 2 and scp.received(), timeout=20)
        assert received, scp.log.read_text(errors="replace")[-2000:]
        assert _uids(received) == _uids(outputs)
    finally:
        scp.stop()


@pytest.mark.integration
def test_send_to_orthanc(tmp_path: Path, outputs: list[Path]) -> None:
    orthanc = start_orthanc(tmp_path / "orthanc")
    try:
        destination = PacsDestination(name="orthanc", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
        send_files(destination, "DERMNODE", outputs, timeout_s=20)
        send_files(destination, "DERMNODE", outputs, timeout_s=20)  # idempotent: same UIDs, stored once
        stored = wait_until(lambda: len(orthanc.instances()) >= 2, timeout=20)
        assert stored
        assert orthanc.sop_instance_uids() == _uids(outputs)
    finally:
        orthanc.stop()


def test_closed_port_is_a_transient_failure(outputs: list[Path]) -> None:
    destination = PacsDestination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    with pytest.raises(DeliveryError) as info:
        send_files(destination, "DERMNODE", outputs, timeout_s=5)
    assert info.value.permanent is False


def test_unreadable_file_is_a_permanent_failure(tmp_path: Path) -> None:
    bogus = tmp_path / "not-dicom.dcm"
    bogus.write_bytes(b"not a dicom file")
    destination = PacsDestination(name="any", ae_title="ANY", host="127.0.0.1", port=free_port())
    with pytest.raises(DeliveryError) as info:
        send_files(destination, "DERMNODE", [bogus], timeout_s=5)
    assert info.value.permanent is True


def test_nothing_to_send_opens_no_association() -> None:
    send_files(PacsDestination(port=free_port()), "DERMNODE", [], timeout_s=1)


@pytest.mark.parametrize(
    ("status", "transient"),
    [(0xA700, True), (0xA7FF, True), (0xFE00, True), (0xA900, False), (0xC000, False), (0x0122, False)],
)
def test_status_classification(status: int, transient: bool) -> None:
    assert is_transient_status(status) is transient


class _StatusScp:
    """An in-process pynetdicom Storage SCP answering a fixed C-STORE status (or one per SOP Instance UID in
    ``statuses``); it counts the associations it was asked for."""

    def __init__(
        self,
        status: int,
        *,
        require_called_aet: bool = False,
        storage: bool = True,
        statuses: dict[str, int] | None = None,
    ) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.port = free_port()
        self.received: list[str] = []
        self.associations = 0  # A-ASSOCIATE requests received
        self._lock = threading.Lock()
        by_uid = statuses or {}
        ae = AE(ae_title="STATUSSCP")
        ae.require_called_aet = require_called_aet
        if storage:
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        else:
            ae.add_supported_context(Verification)

        def on_store(event: evt.Event) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            self.received.append(uid)
            return by_uid.get(uid, status)

        def on_requested(event: evt.Event) -> None:
            with self._lock:
                self.associations += 1

        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_REQUESTED, on_requested)],
        )

    def destination(self, ae_title: str = "STATUSSCP") -> PacsDestination:
        return PacsDestination(name="status", ae_title=ae_title, host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(0x0000, None), (0xB000, None), (0xB007, None), (0xA700, False), (0xA900, True), (0xC000, True)],
)
def test_store_status_mapping(outputs: list[Path], status: int, permanent: bool | None) -> None:
    scp = _StatusScp(status)
    try:
        if permanent is None:
            send_files(scp.destination(), "DERMNODE", outputs, timeout_s=10)
            assert len(scp.received) == 2
        else:
            with pytest.raises(DeliveryError) as info:
                send_files(scp.destination(), "DERMNODE", outputs, timeout_s=10)
            assert info.value.permanent is permanent
            assert len(scp.received) == 1  # the first failure ends the call
    finally:
        scp.stop()


def test_rejected_association_is_permanent(outputs: list[Path]) -> None:
    scp = _StatusScp(0x0000, require_called_aet=True)
    try:
        with pytest.raises(DeliveryError, match="rejected") as info:
            send_files(scp.destination("WRONGAET"), "DERMNODE", outputs, timeout_s=10)
        assert info.value.permanent is True
    finally:
        scp.stop()


def test_peer_without_storage_contexts_is_permanent(outputs: list[Path]) -> None:
    scp = _StatusScp(0x0000, storage=False)
    try:
        with pytest.raises(DeliveryError) as info:
            send_files(scp.destination(), "DERMNODE", outputs, timeout_s=10)
        assert info.value.permanent is True
    finally:
        scp.stop()


def test_send_each_stores_one_jobs_objects_over_one_association(job_outputs: list[Path]) -> None:
    scp = _StatusScp(0x0000)
    try:
        assert send_each(scp.destination(), "DERMNODE", job_outputs, timeout_s=10) == [None, None, None]
        assert scp.received == [_uid(p) for p in job_outputs]
        assert scp.associations == 1
    finally:
        scp.stop()


def test_send_each_permanent_refusal_of_one_file_spares_the_others(job_outputs: list[Path]) -> None:
    refused = _uid(job_outputs[1])
    scp = _StatusScp(0x0000, statuses={refused: 0xC000})
    try:
        first, second, third = send_each(scp.destination(), "DERMNODE", job_outputs, timeout_s=10)
        assert first is None and third is None
        assert second is not None and second.permanent is True and "0xC000" in str(second)
        assert scp.received == [_uid(p) for p in job_outputs]  # the file after the refused one was sent
        assert scp.associations == 1
    finally:
        scp.stop()


def test_send_each_transient_failure_ends_the_association(job_outputs: list[Path]) -> None:
    scp = _StatusScp(0x0000, statuses={_uid(job_outputs[1]): 0xA700})
    try:
        first, second, third = send_each(scp.destination(), "DERMNODE", job_outputs, timeout_s=10)
        assert first is None, "stored before the failure: delivered"
        assert second is not None and second.permanent is False and "0xA700" in str(second)
        assert third is not None and third.permanent is False and "not sent" in str(third)
        assert scp.received == [_uid(p) for p in job_outputs[:2]]
    finally:
        scp.stop()


def test_send_each_unreadable_file_fails_alone(tmp_path: Path, job_outputs: list[Path]) -> None:
    bogus = tmp_path / "not-dicom.dcm"
    bogus.write_bytes(b"not a dicom file")
    scp = _StatusScp(0x0000)
    try:
        outcomes = send_each(scp.destination(), "DERMNODE", [job_outputs[0], bogus, job_outputs[2]], timeout_s=10)
        assert outcomes[0] is None and outcomes[2] is None
        assert outcomes[1] is not None and outcomes[1].permanent is True
        assert scp.received == [_uid(job_outputs[0]), _uid(job_outputs[2])] and scp.associations == 1
        assert send_each(scp.destination(), "DERMNODE", [bogus], timeout_s=10)[0] is not None
        assert scp.associations == 1, "nothing readable: no association"
    finally:
        scp.stop()


@pytest.mark.parametrize(("require_called_aet", "permanent"), [(False, False), (True, True)])
def test_send_each_association_failure_is_every_files_outcome(
    job_outputs: list[Path], require_called_aet: bool, permanent: bool
) -> None:
    if require_called_aet:  # rejected-permanent
        scp = _StatusScp(0x0000, require_called_aet=True)
        destination = scp.destination("WRONGAET")
    else:  # nobody listens: transient
        scp = None
        destination = PacsDestination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    try:
        outcomes = send_each(destination, "DERMNODE", job_outputs, timeout_s=5)
        assert all(o is not None and o.permanent is permanent for o in outcomes), outcomes
    finally:
        if scp is not None:
            scp.stop()


def _settings(destination: PacsDestination) -> Settings:
    return Settings(scp=ScpSettings(ae_title="DERMNODE"), pacs=(destination,))


def _outbox_with_job(tmp_path: Path, destination: str, paths: list[Path], **settings: Any) -> tuple[Outbox, int]:
    """An outbox (SQLite) with one job whose result objects ``paths`` are queued for ``destination``."""
    db = database_path(tmp_path / "state")
    queue = JobQueue(db)
    assert queue.enqueue("1.2.3.4", "1.2.840.10008.5.1.4.1.1.77.1.4", tmp_path / "src.dcm")
    (job_id,) = queue._conn().execute("SELECT id FROM jobs").fetchone()
    outbox = Outbox(db, DeliverySettings(**settings))
    for path in paths:
        assert outbox.add(job_id, "dicom", destination, path.name, path)
    return outbox, job_id


def test_outbox_sends_one_jobs_objects_over_one_association(tmp_path: Path, job_outputs: list[Path]) -> None:
    """The service's path: the outbox claims the job's three DICOM deliveries at once and the DICOM deliverer stores
    them over one association; one refused permanently is dead-lettered alone."""
    refused = _uid(job_outputs[2])
    scp = _StatusScp(0x0000, statuses={refused: 0xC000})
    try:
        deliverers = build_deliverers(_settings(scp.destination()))
        assert isinstance(deliverers["dicom"], BatchDeliverer)
        outbox, job_id = _outbox_with_job(tmp_path, "pacs:status", job_outputs, max_attempts=3)
        assert outbox.pump_once(deliverers, stop=threading.Event())
        assert scp.associations == 1
        assert scp.received == [_uid(p) for p in job_outputs]
        assert [row["state"] for row in outbox.for_job(job_id)] == ["done", "done", "dead"]
        assert outbox.counts()["dead_letter"] == 1
        assert not outbox.pump_once(deliverers, stop=threading.Event())
    finally:
        scp.stop()


def test_outbox_with_a_destination_no_longer_configured(tmp_path: Path, job_outputs: list[Path]) -> None:
    deliverers = build_deliverers(_settings(PacsDestination(name="other", ae_title="X", host="127.0.0.1", port=1)))
    outbox, job_id = _outbox_with_job(tmp_path, "pacs:gone", job_outputs)
    assert outbox.pump_once(deliverers)
    rows = outbox.for_job(job_id)
    assert [r["state"] for r in rows] == ["dead"] * 3
    assert all("no longer configured" in r["last_error"] for r in rows)


@pytest.mark.integration
def test_outbox_delivers_a_job_to_orthanc_over_one_association(
    tmp_path: Path, job_outputs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    associations: list[str] = []
    associate = sender._associate

    def counting(*args: Any, **kwargs: Any) -> Any:
        assoc = associate(*args, **kwargs)
        associations.append(args[1].name)
        return assoc

    monkeypatch.setattr(sender, "_associate", counting)
    orthanc = start_orthanc(tmp_path / "orthanc")
    try:
        destination = PacsDestination(name="orthanc", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
        deliverers = build_deliverers(_settings(destination))
        outbox, job_id = _outbox_with_job(tmp_path, "pacs:orthanc", job_outputs)
        assert outbox.pump_once(deliverers)
        assert associations == ["orthanc"]
        assert [r["state"] for r in outbox.for_job(job_id)] == ["done"] * 3
        assert wait_until(lambda: len(orthanc.instances()) >= 3, timeout=20)
        assert orthanc.sop_instance_uids() == _uids(job_outputs)
    finally:
        orthanc.stop()
