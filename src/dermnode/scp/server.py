"""The DICOM Store SCP: association policy, C-ECHO and a durable C-STORE handler.

Handlers are thin: they check the policy, write the instance to the spool, record the job
(:func:`dermnode.scp.store.store_and_queue`, the write path the console's uploads share) and return a DICOM
status. The received dataset is parsed once to check it and written as received, never re-encoded. Dependencies
(spool, queue) are bound to the handlers with pynetdicom's handler arguments; there are no module-level globals.

Statuses returned by C-STORE (PS3.4 Annex B.2.3 and PS3.7 Annex C):

========  =====================================================================================
0x0000    stored durably and queued (also for a repeated SOP Instance UID, stored once; an instance
          whose job was dead-lettered is stored again and re-queued)
0xA700    out of resources: disk below ``storage.min_free_mb``, or the spool/queue read or write failed
0xC210    cannot understand: the dataset could not be parsed
0xC211    cannot understand: SOP Instance/Class UID in the dataset differ from the request
0xC212    cannot understand: a required UID (Study/Series/SOP Instance) is missing
0xC213    cannot understand: the SOP Instance UID is not a valid DICOM UID (it names the spool file)
========  =====================================================================================

With TLS, the handshake runs in the connection's own thread, bounded by ``scp.network_timeout_s``
(:class:`_DeferredHandshakeServer`), so a peer that connects and says nothing cannot hold up other associations.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.transport import ThreadedAssociationServer

from dermnode.dicom_io.uids import (
    ACCEPTED_STORAGE_CLASSES,
    ACCEPTED_TRANSFER_SYNTAXES,
    UID_MAX_LENGTH,
    VERIFICATION,
    is_valid_uid,
)
from dermnode.errors import InsufficientSpaceError, StorageError
from dermnode.scp.spool import Spool
from dermnode.scp.store import StoreOutcome, admit, store_and_queue
from dermnode.settings import ScpSettings, TLSSettings
from dermnode.workqueue.diskspace import LowDiskWarner, register_minimum
from dermnode.workqueue.jobs import JobQueue

logger = logging.getLogger(__name__)
audit = logging.getLogger("dermnode.audit")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_PARSE = 0xC210
STATUS_UID_MISMATCH = 0xC211
STATUS_MISSING_UID = 0xC212
STATUS_INVALID_UID = 0xC213


@dataclass
class StoreContext:
    """What the C-STORE handler needs; bound to the handler when the server starts."""

    spool: Spool
    queue: JobQueue
    disk_warner: LowDiskWarner = field(default_factory=LowDiskWarner)


def _peer(event: Any) -> tuple[str, str]:
    assoc = event.assoc
    calling = str(assoc.requestor.ae_title).strip()
    address = f"{assoc.requestor.address}:{assoc.requestor.port}"
    return calling, address


def handle_echo(event: Any) -> int:
    calling, address = _peer(event)
    audit.info("C-ECHO from %s (%s)", calling, address)
    return STATUS_SUCCESS


def handle_store(event: Any, ctx: StoreContext) -> int:
    """Store one instance durably, record its job, and answer only then.

    The SOP Instance UID names the spool file, so it must have the DICOM UID syntax (else 0xC213). A repeated
    SOP Instance UID is answered with success and not processed again, unless its job was dead-lettered: then
    the new copy replaces the spool file and the job is re-queued with a fresh attempt count.

    Returns
    -------
    int
        The C-STORE status (see the module docstring). Never raises for a storage or database failure
        (0xA700) or a bad dataset (0xC2xx).
    """
    calling, address = _peer(event)
    req = event.request
    sop_uid = str(req.AffectedSOPInstanceUID)
    sop_class = str(req.AffectedSOPClassUID)
    valid_uid = is_valid_uid(sop_uid)
    shown_uid = sop_uid if valid_uid else ascii(sop_uid)  # quoted and escaped: no forged log lines

    def answer(status: int, reason: str) -> int:
        log = audit.info if status == STATUS_SUCCESS else audit.warning
        log(
            "C-STORE from %s (%s) sop_class=%s sop_instance=%s status=0x%04X %s",
            calling,
            address,
            sop_class,
            shown_uid,
            status,
            reason,
        )
        return status

    if not valid_uid:
        logger.warning(
            "refusing C-STORE from %s (%s): SOP Instance UID %s is not a valid DICOM UID", calling, address, shown_uid
        )
        return answer(
            STATUS_INVALID_UID,
            f"SOP Instance UID is not a valid DICOM UID (digits and dots, at most {UID_MAX_LENGTH} characters)",
        )

    try:
        existing = admit(ctx.spool, ctx.queue, sop_uid, disk_warner=ctx.disk_warner)  # one statvfs, one SELECT
        if existing is not None and existing != "dead":
            return answer(STATUS_SUCCESS, StoreOutcome.DUPLICATE.value)
    except InsufficientSpaceError as exc:
        logger.error("refusing C-STORE: %s", exc)
        return answer(STATUS_OUT_OF_RESOURCES, "low disk space")
    except StorageError as exc:
        logger.error("refusing C-STORE: %s", exc)
        return answer(STATUS_OUT_OF_RESOURCES, "state database unavailable")

    try:
        ds = event.dataset
        ds.walk(lambda _ds, _elem: None)  # parse every element now: reject garbage before acknowledging
        ds_sop_uid = str(ds.SOPInstanceUID)
        ds_sop_class = str(ds.SOPClassUID)
        study_uid = str(ds.StudyInstanceUID)
        str(ds.SeriesInstanceUID)
    except AttributeError as exc:
        return answer(STATUS_MISSING_UID, f"required attribute missing: {exc}")
    except Exception as exc:  # a malformed stream can raise anything from pydicom's parser
        return answer(STATUS_CANNOT_PARSE, f"dataset cannot be parsed: {type(exc).__name__}: {exc}")
    if ds_sop_uid != sop_uid or ds_sop_class != sop_class:
        return answer(STATUS_UID_MISMATCH, "dataset SOP Instance/Class UID differ from the C-STORE request")

    parts = received_file(event)
    try:
        outcome, _path = store_and_queue(
            ctx.spool, ctx.queue, sop_instance_uid=sop_uid, sop_class_uid=sop_class, study_instance_uid=study_uid,
            data=parts, calling_aet=calling, peer=address, existing=existing,
        )
    except InsufficientSpaceError as exc:
        logger.error("refusing C-STORE: %s", exc)
        return answer(STATUS_OUT_OF_RESOURCES, "low disk space")
    except StorageError as exc:
        logger.error("refusing C-STORE, instance not stored: %s", exc)
        return answer(STATUS_OUT_OF_RESOURCES, "spool or queue write failed")
    finally:
        for part in parts:  # give pynetdicom its receive buffer back
            if isinstance(part, memoryview):
                part.release()
    return answer(STATUS_SUCCESS, outcome.value)


def received_file(event: Any) -> list[bytes | memoryview]:
    """The DICOM file of a C-STORE as two buffers: preamble, ``DICM`` and the file meta information, then the
    dataset exactly as the peer sent it (a view of pynetdicom's receive buffer: neither re-encoded nor copied)."""
    head = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
    stream = event.request.DataSet
    body = stream.getbuffer() if hasattr(stream, "getbuffer") else event.encoded_dataset(include_meta=False)
    return [head, body]


def _on_conn_open(event: Any) -> None:
    audit.info("connection opened from %s:%s", *event.address)


def _on_accepted(event: Any) -> None:
    calling, address = _peer(event)
    audit.info("association accepted: calling AE %s from %s", calling, address)


def _on_rejected(event: Any) -> None:
    calling, address = _peer(event)
    assoc = event.assoc
    request = getattr(assoc.requestor, "primitive", None)
    called = str(getattr(request, "called_ae_title", "") or "").strip() or "?"
    reject = getattr(assoc.acceptor, "primitive", None)
    if reject is not None and getattr(reject, "result", None) in (0x01, 0x02):
        why = f"{reject.result_str}, {reject.source_str}: {reject.reason_str}"
    else:
        why = "reason not recorded"
    audit.warning("association rejected: calling AE %s, called AE %s, from %s (%s)", calling, called, address, why)


def _on_released(event: Any) -> None:
    calling, address = _peer(event)
    audit.info("association released: calling AE %s from %s", calling, address)


def _on_aborted(event: Any) -> None:
    calling, address = _peer(event)
    audit.warning("association aborted: calling AE %s from %s", calling, address)


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS context for DICOM TLS (PS3.15 B.1/B.9 style: TLS 1.2+, optional client certificates).

    Raises
    ------
    ssl.SSLError, OSError
        When the certificate, key or CA file cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        ctx.load_verify_locations(tls.ca_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return ctx


class _DeferredHandshakeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved out of the accept loop.

    pynetdicom 3.0.4 wraps each accepted socket with ``wrap_socket(server_side=True)`` in ``get_request``, i.e.
    it runs the (blocking, untimed) TLS handshake in the single thread that accepts connections: one peer that
    opens a TCP connection and sends nothing (a load-balancer health check, a port scanner) blocks every later
    association. Here the socket is wrapped with ``do_handshake_on_connect=False`` and the handshake is done in
    the connection's own thread, bounded by the network timeout; a failed or timed-out handshake (no client
    certificate, an unknown CA, plain DICOM on the TLS port, silence) closes that connection only.

    Connection threads are daemon threads and are not joined on ``shutdown()``: one waiting for a silent
    peer's handshake must not delay the service's stop (pynetdicom's association threads are daemons too).
    """

    daemon_threads = True
    block_on_close = False

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; with TLS, wrap it without doing the handshake yet.

        Raises
        ------
        OSError
            When ``accept`` or the wrapping fails (``socketserver`` then drops the connection).
        """
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        if self.ssl_context:
            try:
                client_socket = self.ssl_context.wrap_socket(
                    client_socket, server_side=True, do_handshake_on_connect=False
                )
            except OSError:
                client_socket.close()
                raise
        return client_socket, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: finish the TLS handshake (bounded in time), then serve the association."""
        if isinstance(request, ssl.SSLSocket):
            peer = f"{client_address[0]}:{client_address[1]}"
            previous = request.gettimeout()
            try:
                request.settimeout(self.ae.network_timeout)
                request.do_handshake()
                request.settimeout(previous)
            except OSError as exc:  # ssl.SSLError, TimeoutError, ConnectionError
                audit.warning("TLS handshake with %s failed, connection closed: %s", peer, exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class _StoreAE(AE):
    """An AE whose association limit counts associations, not bare TCP connections.

    pynetdicom counts an acceptor thread from the moment the TCP connection opens, so load-balancer health
    checks (connect, no A-ASSOCIATE-RQ, held until the ACSE timeout) made real associations below
    ``scp.max_associations`` be rejected (measured in bench/results). Only connections that have sent their
    A-ASSOCIATE-RQ count here.
    """

    @property
    def active_associations(self) -> list[Any]:
        return [a for a in super().active_associations if not a.is_acceptor or a.requestor.primitive is not None]

    def make_server(
        self,
        address: Any,
        ae_title: Any = None,
        contexts: Any = None,
        ssl_context: Any = None,
        evt_handlers: Any = None,
        server_class: Any = None,
        **kwargs: Any,
    ) -> Any:
        """pynetdicom's server factory, with :class:`_DeferredHandshakeServer` for the threaded server.

        Raises
        ------
        ValueError, OSError
            As :meth:`pynetdicom.ae.ApplicationEntity.make_server` (no contexts, port cannot be bound).
        """
        if server_class is ThreadedAssociationServer:
            server_class = _DeferredHandshakeServer
        return super().make_server(
            address, ae_title, contexts, ssl_context, evt_handlers, server_class=server_class, **kwargs
        )


def build_ae(settings: ScpSettings) -> AE:
    """An application entity configured with dermnode's association policy and presentation contexts."""
    ae = _StoreAE(ae_title=settings.ae_title)
    ae.require_called_aet = True
    if settings.allowed_calling_aets:
        ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.maximum_pdu_size = settings.max_pdu
    ae.add_supported_context(VERIFICATION)
    for sop_class in ACCEPTED_STORAGE_CLASSES:
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    return ae


def start_server(
    settings: ScpSettings, spool: Spool, queue: JobQueue, *, extra_handlers: Sequence[Any] = ()
) -> ThreadedAssociationServer:
    """Start the Store SCP in background threads and return the server (``.shutdown()`` to stop).

    Raises
    ------
    OSError
        When the port cannot be bound.
    ssl.SSLError
        When TLS is enabled and the certificate or key cannot be loaded.
    """
    ae = build_ae(settings)
    ctx = StoreContext(spool=spool, queue=queue)
    register_minimum(spool.directory.parent, spool.min_free_mb)  # for /metrics (dermnode_storage_low)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_CONN_OPEN, _on_conn_open),
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_RELEASED, _on_released),
        (evt.EVT_ABORTED, _on_aborted),
        *extra_handlers,
    ]
    ssl_context = server_ssl_context(settings.tls) if settings.tls.enabled else None
    server = ae.start_server(
        (settings.bind, settings.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
    )
    assert server is not None  # block=False always returns the server
    logger.info(
        "Store SCP %s listening on %s:%d%s",
        settings.ae_title,
        settings.bind,
        server.server_address[1],
        " (TLS)" if ssl_context else "",
    )
    return server
