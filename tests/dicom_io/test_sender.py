"""C-STORE delivery to real peers on loopback: DCMTK storescp and Orthanc; failure classification."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from dicom_output_cases import make_case

from dermnode.dicom_io.seg import build_segmentation
from dermnode.dicom_io.sender import is_transient_status, send_files
from dermnode.dicom_io.sr import build_report
from dermnode.errors import DeliveryError
from dermnode.settings import OutputSettings, PacsDestination
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


def _uids(paths: list[Path]) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


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
    """An in-process pynetdicom Storage SCP answering a fixed C-STORE status."""

    def __init__(self, status: int, *, require_called_aet: bool = False, storage: bool = True) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.port = free_port()
        self.received: list[str] = []
        ae = AE(ae_title="STATUSSCP")
        ae.require_called_aet = require_called_aet
        if storage:
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        else:
            ae.add_supported_context(Verification)

        def on_store(event: evt.Event) -> int:
            self.received.append(event.request.AffectedSOPInstanceUID)
            return status

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

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
