"""Association limit of the Store SCP (in-process server, real pynetdicom clients)."""

from __future__ import annotations

import socket
from pathlib import Path

from pynetdicom import AE

from dermnode.db import database_path
from dermnode.scp.queue import JobQueue
from dermnode.scp.server import start_server
from dermnode.scp.spool import Spool
from dermnode.settings import ScpSettings
from peers import free_port


def _associate(port: int):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title="DERMNODE")


def test_bare_tcp_connections_do_not_use_up_the_association_limit(tmp_path: Path) -> None:
    """Health checks that connect and say nothing must not make real associations be refused."""
    srv = start_server(ScpSettings(port=free_port(), max_associations=2, acse_timeout_s=30),
                       Spool(tmp_path, 1, fsync=False), JobQueue(database_path(tmp_path)))
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
