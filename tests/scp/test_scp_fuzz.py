"""Fuzz campaign at the network level: garbled C-STORE data sets against a live Store SCP.

An announced data set must have at least one byte (a C-STORE whose data set never arrives is a protocol
violation that the server ends with its DIMSE timeout and an abort).
Every case must get either success (the bytes happened to form a valid dataset) or an error status in the
0xC000 range, and the server must keep answering. The number of cases tried is printed (run with ``-s``).
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom.association
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from dermnode.dicom_io.uids import DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE
from dermnode.dicom_io.wrap import wrap_rgb
from dermnode.scp.server import start_server
from dermnode.scp.spool import Spool
from dermnode.settings import ScpSettings
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import JobQueue
from peers import free_port
from synthetic import synthetic_dermoscopy

CASES = int(os.environ.get("DERMNODE_FUZZ_CASES", "120"))
_PIXELS = synthetic_dermoscopy(16, 16)


def _fresh() -> tuple[pydicom.Dataset, bytes]:
    """A new instance (new SOP Instance UID, so no case is answered as a duplicate) and its encoded data set."""
    ds = wrap_rgb(_PIXELS)
    meta = ds.file_meta
    del ds.file_meta
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    ds.file_meta = meta
    return ds, buf.getvalue()


_BODY = _fresh()[1]
tried = {"n": 0, "statuses": {}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = Path(tmp_path_factory.mktemp("fuzz"))
    queue = JobQueue(database_path(root))
    scp = ScpSettings(port=free_port(), max_associations=50, dimse_timeout_s=5, network_timeout_s=5)
    srv = start_server(scp, Spool(root, 1, fsync=False), queue)
    yield srv, queue
    srv.shutdown()
    print(f"\nSCP fuzz campaign: {tried['n']} garbled data sets, statuses {tried['statuses']}")


def _send(port: int, source: pydicom.Dataset, body: bytes, monkeypatch: pytest.MonkeyPatch) -> int | None:
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *a, **k: body)
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMNODE")
    assert assoc.is_established, "the server stopped accepting associations"
    try:
        status = assoc.send_c_store(source)
        return int(status.Status) if status else None
    finally:
        if assoc.is_established:
            assoc.release()
        monkeypatch.undo()


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(1, len(_BODY) - 1), st.just(b"")),
    st.tuples(st.just("overwrite"), st.integers(0, len(_BODY) - 1), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("insert"), st.integers(0, len(_BODY) - 1), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("random"), st.just(0), st.binary(min_size=1, max_size=300)),
)


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
@given(m=mutation)
def test_garbled_datasets_get_a_status_and_the_server_survives(server, monkeypatch, m) -> None:  # type: ignore[no-untyped-def]
    srv, queue = server
    kind, pos, data = m
    source, good = _fresh()
    pos = min(pos, len(good) - 1)  # UIDs differ in length from case to case
    if kind == "truncate":
        body = good[:pos]
    elif kind == "overwrite":
        body = good[:pos] + data + good[pos + len(data) :]
    elif kind == "insert":
        body = good[:pos] + data + good[pos:]
    else:
        body = data
    status = _send(srv.server_address[1], source, body, monkeypatch)
    tried["n"] += 1
    tried["statuses"][hex(status) if status is not None else "none"] = (
        tried["statuses"].get(hex(status) if status is not None else "none", 0) + 1
    )
    assert status is not None
    assert status == 0x0000 or 0xC000 <= status <= 0xCFFF, hex(status)
    if status == 0x0000:  # only a dataset that parsed and matched the request is acknowledged and queued
        assert queue.contains(str(source.SOPInstanceUID))
