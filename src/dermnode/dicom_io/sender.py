"""C-STORE SCU: deliver dermnode's SEG/SR files to a PACS.

One association per call. Presentation contexts are proposed explicitly: for every SOP class of the files
(always including Segmentation Storage and Comprehensive 3D SR Storage) one context with the file's own
transfer syntax and one with Explicit VR Little Endian, so a compressed file can be sent as is or, when the
peer only accepts the uncompressed syntax, decompressed.

Failure classification (``DeliveryError.permanent``), see also ``docs/dicom-conformance.md``:

============================================================ =========
Condition                                                    permanent
============================================================ =========
TCP connect fails, times out, TLS handshake fails            False
A-ASSOCIATE-RJ with result "rejected-transient" (2)          False
A-ASSOCIATE-RJ with result "rejected-permanent" (1)          True
association accepted but no proposed context accepted        True
A-ABORT / no C-STORE response (DIMSE timeout, link lost)     False
C-STORE status 0x0000 success                                (success)
C-STORE status 0xB000, 0xB006, 0xB007 warning                (success)
C-STORE status 0x0111 duplicate SOP instance                 (success: already stored; UIDs are stable)
C-STORE status 0xA7xx out of resources                       False
C-STORE status 0xFE00 cancel                                 False
C-STORE any other status (0xA9xx, 0xC0xx, 0x01xx, 0x02xx...) True
file missing/unreadable, SOP class not accepted by the peer  True
============================================================ =========

:func:`send_files` raises the failure of the first failing file, which ends the call (files sent before it stay
stored; a retry resends them, which the deterministic UIDs make idempotent). :func:`send_each` (the outbox sends
all due deliveries of one destination with it, over one association) answers one outcome per file instead: a
file refused for good (an unreadable file, a SOP class the peer does not accept, a permanent C-STORE status) fails
alone and the next file is sent; a transient failure of a file (an A-ABORT, no response, 0xA7xx, 0xFE00) ends the
association, and each file not sent yet fails as transient too; a failure of the association itself (it cannot
be opened, is rejected, accepts no context) is every file's outcome. Files stored before a failure count as
stored. Logs carry AE titles, host, SOP classes, UIDs and status codes, never patient attributes.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dermnode.dicom_io.reading import (
    TRUNCATED_OR_NOT_DICOM,
    check_pixel_data_complete,
    read_dataset,
    read_headerless_dataset,
)
from dermnode.dicom_io.seg import SEGMENTATION_STORAGE
from dermnode.dicom_io.sr import COMPREHENSIVE_3D_SR_STORAGE
from dermnode.errors import DecodeError, DeliveryError
from dermnode.settings import PacsDestination, TLSSettings

logger = logging.getLogger(__name__)

#: C-STORE statuses treated as success besides 0x0000 (warnings, and "duplicate SOP instance").
SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007, 0x0111})


def is_transient_status(status: int) -> bool:
    """Whether a failed C-STORE status may succeed on retry.

    Parameters
    ----------
    status:
        The Status (0000,0900) of the C-STORE response.

    Returns
    -------
    bool
        ``True`` for 0xA7xx (out of resources) and 0xFE00 (cancel); ``False`` for every other failure.
    """
    return (status & 0xFF00) == 0xA700 or status == 0xFE00


def tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """A client-side TLS context for a DICOM association (TLS 1.2+, peer certificate verified).

    Parameters
    ----------
    tls:
        ``ca_certificates`` verifies the peer (system defaults when empty); ``certificate`` and
        ``private_key`` are the client certificate for mutual TLS (optional).

    Returns
    -------
    ssl.SSLContext
        The context.

    Raises
    ------
    DeliveryError
        Permanent, when a certificate or key file cannot be loaded.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificates or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.certificate:
            ctx.load_cert_chain(tls.certificate, tls.private_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"cannot load TLS certificates: {exc}", permanent=True) from exc
    return ctx


#: What a file that is not DICOM at all (a photograph) is told: the modality simulator makes one.
NOT_DICOM_HINT = "not a DICOM file: wrap it first with `dermnode wrap`"


def read_for_sending(path: Path) -> pydicom.Dataset:
    """Read one file to C-STORE, refusing with a sentence what cannot be sent whole.

    A file without the ``DICM`` prefix that is not a DICOM dataset either (a photograph) is "not a DICOM file:
    wrap it first with `dermnode wrap`"; a DICOM file that cannot be parsed, names no SOP Class/Instance UID or
    whose pixel data is cut short is "truncated or not DICOM". pydicom's warnings are logged at DEBUG only.

    Raises
    ------
    DeliveryError
        Permanent, with one of the reasons above (or the operating system's, e.g. "Is a directory").
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise DeliveryError(f"{path}: cannot read: {exc.strerror or exc}", permanent=True) from exc
    try:
        if head[128:132] == b"DICM":
            ds = read_dataset(path)
        else:
            found = read_headerless_dataset(path)
            if found is None:
                raise DeliveryError(f"{path}: {NOT_DICOM_HINT}", permanent=True)
            ds = found
        check_pixel_data_complete(ds)
    except DecodeError as exc:
        text = str(exc)
        if text.startswith(path.name):  # "<name> is truncated or not DICOM (...)": name the path once
            raise DeliveryError(f"{path}{text[len(path.name):]}", permanent=True) from exc
        raise DeliveryError(f"{path}: {text}", permanent=True) from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        raise DeliveryError(f"{path}: {TRUNCATED_OR_NOT_DICOM} (no Transfer Syntax UID)", permanent=True)
    return ds


def _read(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    return [read_for_sending(path) for path in paths]


def _contexts(datasets: Sequence[pydicom.Dataset]) -> list[tuple[UID, UID]]:
    """(abstract syntax, transfer syntax) pairs to propose, one context each, in a stable order."""
    pairs: list[tuple[UID, UID]] = []

    def add(sop_class: UID, ts: UID) -> None:
        if (sop_class, ts) not in pairs:
            pairs.append((sop_class, ts))

    for ds in datasets:
        add(UID(ds.SOPClassUID), UID(ds.file_meta.TransferSyntaxUID))
        add(UID(ds.SOPClassUID), ExplicitVRLittleEndian)
    add(SEGMENTATION_STORAGE, ExplicitVRLittleEndian)
    add(COMPREHENSIVE_3D_SR_STORAGE, ExplicitVRLittleEndian)
    if len(pairs) > 128:
        raise DeliveryError("too many SOP class / transfer syntax combinations for one association", permanent=True)
    return pairs


def _no_delay(event: Any) -> None:
    """Disable Nagle's algorithm: each C-STORE otherwise waits ~40 ms on the peer's delayed ACK (measured)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(ae: AE, destination: PacsDestination, tls: ssl.SSLContext | None) -> Association:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    tls_args = None if tls is None else (tls, destination.host)
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
        )
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"cannot connect to {where}: {exc}", permanent=False) from exc
    if assoc.is_established:
        return assoc
    primitive = assoc.acceptor.primitive
    if assoc.is_rejected and primitive is not None:
        permanent = primitive.result == 0x01
        raise DeliveryError(
            f"{where} rejected the association ({primitive.result_str}, source {primitive.source_str}: "
            f"{primitive.reason_str})",
            permanent=permanent,
        )
    if primitive is not None and primitive.result == 0x00:
        raise DeliveryError(f"{where} accepted none of the proposed presentation contexts", permanent=True)
    raise DeliveryError(f"cannot establish an association with {where} (peer down or timed out)", permanent=False)


def _context_for(assoc: Association, ds: pydicom.Dataset) -> PresentationContext | None:
    sop_class = ds.SOPClassUID
    ts = ds.file_meta.TransferSyntaxUID
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
    for cx in accepted:
        if cx.transfer_syntax and cx.transfer_syntax[0] == ts:
            return cx
    return accepted[0] if accepted else None


def send_files(destination: PacsDestination, calling_aet: str, paths: list[Path], *, timeout_s: float = 30.0) -> None:
    """Store ``paths`` on ``destination`` over one association; the first failing file ends the call.

    Parameters
    ----------
    destination:
        The peer: AE title, host, port and optional TLS.
    calling_aet:
        Our AE title.
    paths:
        DICOM files (with file meta information) to store, in order.
    timeout_s:
        Connection, ACSE, DIMSE and network timeout in seconds.

    Raises
    ------
    DeliveryError
        When a file could not be stored; ``permanent`` tells whether retrying can help (see the module
        docstring for the mapping). No association is opened when a file cannot be read.
    """
    if not paths:
        return
    datasets = _read(paths)
    files = list(zip(paths, datasets, strict=True))
    for outcome in _store(destination, calling_aet, files, timeout_s, keep_going=False):
        if outcome is not None:
            raise outcome


def send_each(
    destination: PacsDestination, calling_aet: str, paths: Sequence[Path], *, timeout_s: float = 30.0
) -> list[DeliveryError | None]:
    """Store ``paths`` on ``destination`` over one association and tell each file's outcome.

    A permanent failure of one file does not stop the others; a transient one ends the association and the files
    not sent yet fail as transient too (see the module docstring). Never raises for a failed store.

    Parameters
    ----------
    destination:
        The peer: AE title, host, port and optional TLS.
    calling_aet:
        Our AE title.
    paths:
        DICOM files (with file meta information) to store, in order.
    timeout_s:
        Connection, ACSE, DIMSE and network timeout in seconds.

    Returns
    -------
    list of DeliveryError or None
        One per path, in order: ``None`` when the file is stored (or was already: duplicate, warning status),
        otherwise why not, ``permanent`` telling whether retrying can help. No association is opened when no
        file can be read.
    """
    outcomes: list[DeliveryError | None] = [None] * len(paths)
    readable: list[tuple[int, Path, pydicom.Dataset]] = []
    for i, path in enumerate(paths):
        try:
            readable.append((i, path, read_for_sending(path)))
        except DeliveryError as exc:
            outcomes[i] = exc
    if not readable:
        return outcomes
    try:
        stored = _store(destination, calling_aet, [(p, ds) for _, p, ds in readable], timeout_s, keep_going=True)
    except DeliveryError as exc:  # the association itself failed: every file's outcome
        stored = [exc] * len(readable)
    for (i, _, _), outcome in zip(readable, stored, strict=True):
        outcomes[i] = outcome
    return outcomes


def _store(
    destination: PacsDestination,
    calling_aet: str,
    files: list[tuple[Path, pydicom.Dataset]],
    timeout_s: float,
    *,
    keep_going: bool,
) -> list[DeliveryError | None]:
    """C-STORE ``files`` over one association; one outcome per file.

    The first failure ends the association unless ``keep_going`` and it is permanent (the association is still
    fine); each file not sent then gets a transient failure naming the one that ended it.

    Raises
    ------
    DeliveryError
        When the association cannot be used at all (TLS certificates, connection, rejection, no context).
    """
    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    for sop_class, ts in _contexts([ds for _, ds in files]):
        ae.add_requested_context(sop_class, [ts])
    tls = tls_context(destination.tls) if destination.tls.enabled else None

    assoc = _associate(ae, destination, tls)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    outcomes: list[DeliveryError | None] = []
    try:
        for path, ds in files:
            try:
                _store_one(assoc, where, path, ds)
            except DeliveryError as exc:
                outcomes.append(exc)
                if keep_going and exc.permanent:
                    continue
                unsent = DeliveryError(
                    f"not sent: the association with {where} ended when {path.name} failed ({exc})", permanent=False
                )
                outcomes += [unsent] * (len(files) - len(outcomes))
                break
            outcomes.append(None)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _store_one(assoc: Association, where: str, path: Path, ds: pydicom.Dataset) -> None:
    """C-STORE one file on an established association.

    Raises
    ------
    DeliveryError
        When the file is not stored (see the module docstring for ``permanent``).
    """
    cx = _context_for(assoc, ds)
    if cx is None:
        raise DeliveryError(f"{where} does not accept SOP class {ds.SOPClassUID.name}", permanent=True)
    if cx.transfer_syntax[0] != ds.file_meta.TransferSyntaxUID and ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            ds.decompress()
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            raise DeliveryError(
                f"{where} only accepts {cx.transfer_syntax[0].name} and {path.name} cannot be decompressed",
                permanent=True,
            ) from exc
    try:
        status_ds = assoc.send_c_store(ds)
    except (RuntimeError, ValueError, OSError) as exc:
        raise DeliveryError(f"C-STORE of {path.name} to {where} failed: {exc}", permanent=False) from exc
    if "Status" not in status_ds:
        raise DeliveryError(f"no C-STORE response from {where} for {path.name} (aborted or timed out)", permanent=False)
    status = int(status_ds.Status)
    if status not in SUCCESS_STATUSES:
        raise DeliveryError(
            f"{where} answered C-STORE status 0x{status:04X} for {path.name}",
            permanent=not is_transient_status(status),
        )
    if status != 0x0000:
        logger.warning("%s stored %s with status 0x%04X", where, ds.SOPInstanceUID, status)
    logger.info("stored %s %s on %s", ds.SOPClassUID.name, ds.SOPInstanceUID, where)
