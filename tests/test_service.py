"""The service: one process per storage root (instance lock), start-up order, health of its threads."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dermnode.service import LOCK_FILE, InstanceLockedError, Service
from dermnode.settings import HttpSettings, ScpSettings, Settings, StorageSettings, WebSettings, WorkerSettings
from dermnode.workqueue.db import database_path
from dermnode.workqueue.jobs import JobQueue
from dermnode_proc import DermnodeProcess, dermnode_env
from peers import free_port


def settings_for(root: Path, *, port: int = 0, workers: int = 0, http: bool = False) -> Settings:
    return Settings(
        scp=ScpSettings(port=port),
        storage=StorageSettings(root=str(root), min_free_mb=1),
        workers=WorkerSettings(count=workers, poll_interval_s=0.02, shutdown_grace_s=2.0),
        http=HttpSettings(enabled=http, port=0),
        web=WebSettings(enabled=False),
    )


@pytest.fixture
def services() -> Iterator[list[Service]]:
    made: list[Service] = []
    yield made
    for service in made:
        service.close()


def interrupted_job(root: Path) -> JobQueue:
    """A job left ``running`` (by the live instance, or by a crash): only a legitimate start may re-queue it."""
    queue = JobQueue(database_path(root))
    queue.enqueue("1.2.826.0.1.3680043.10.99.1", "1.2.840.10008.5.1.4.1.1.7", root / "x.dcm")
    assert queue.claim("worker-0@1") is not None
    return queue


def job_state(queue: JobQueue) -> str:
    row = queue.get("1.2.826.0.1.3680043.10.99.1")
    assert row is not None
    return str(row["state"])


def test_second_service_on_the_same_root_is_refused_and_touches_nothing(
    tmp_path: Path, services: list[Service]
) -> None:
    root = tmp_path / "var"
    first = Service(settings_for(root), {})
    services.append(first)
    queue = interrupted_job(root)
    with pytest.raises(InstanceLockedError) as err:
        Service(settings_for(root), {})
    assert str(err.value) == f"another dermnode is running on {root} (pid {os.getpid()})"
    assert job_state(queue) == "running"
    first.close()
    again = Service(settings_for(root), {})  # the lock goes with its holder
    services.append(again)


def test_lock_file_is_owner_only_and_names_the_holder(tmp_path: Path, services: list[Service]) -> None:
    root = tmp_path / "var"
    services.append(Service(settings_for(root), {}))
    lock = root / LOCK_FILE
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert lock.read_text().strip() == str(os.getpid())


def test_port_clash_fails_before_recovery_and_starts_no_thread(tmp_path: Path, services: list[Service]) -> None:
    root = tmp_path / "var"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        service = Service(settings_for(root, port=port, workers=1), {})
        services.append(service)
        queue = interrupted_job(root)
        with pytest.raises(OSError, match="cannot bind the DICOM port"):
            service.start()
    assert job_state(queue) == "running", "recovery must not run when the service cannot start"
    assert service.pool._threads == []
    assert service.health().ok


def test_started_service_reports_thread_liveness(tmp_path: Path, services: list[Service]) -> None:
    root = tmp_path / "var"
    service = Service(settings_for(root, workers=2, http=True), {})
    services.append(service)
    queue = interrupted_job(root)
    service.set_processor(lambda job: "analysed")
    service.start()
    end = time.monotonic() + 10
    while job_state(queue) != "done" and time.monotonic() < end:  # recovered at start, then processed
        time.sleep(0.02)
    assert job_state(queue) == "done"
    with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/healthz", timeout=10) as rsp:
        doc = json.loads(rsp.read())
    assert rsp.status == 200 and doc["status"] == "ok"
    assert doc["threads"] == {"workers_alive": 2, "workers_configured": 2, "outbox_alive": True}
    health = service.health()
    assert health.running and health.ok
    service.stop()
    assert not service.health().running


@pytest.mark.integration
def test_second_serve_process_exits_with_a_clear_error_and_the_first_keeps_working(tmp_path: Path) -> None:
    """Two real ``dermnode serve`` on one storage root: the second stops before it touches anything."""
    port, port2 = free_port(), free_port()
    first = DermnodeProcess(tmp_path, port, dermnode_env(tmp_path, port, {"DERMNODE_WORKERS__COUNT": "0"}))
    first.start()
    try:
        assert first.proc is not None
        root = tmp_path / "var"
        queue = interrupted_job(root)  # stands for a job the first instance is working on
        env2 = dermnode_env(tmp_path, port2, {"DERMNODE_WORKERS__COUNT": "0"})
        second = subprocess.run(first.command("serve"), env=env2, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert f"another dermnode is running on {root} (pid {first.proc.pid})" in second.stderr
        assert job_state(queue) == "running", "the second instance must not re-queue the first one's jobs"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port2)) != 0, "the second instance must not listen"
        assert first.proc.poll() is None
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="DERMNODE")
        assert assoc.is_established
        status = assoc.send_c_echo()
        assoc.release()
        assert status.Status == 0x0000
    finally:
        assert first.stop() == 0
