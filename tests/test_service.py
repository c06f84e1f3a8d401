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


def test_roles_need_the_shared_state(tmp_path: Path) -> None:
    from dermnode.errors import ConfigError

    with pytest.raises(ConfigError, match="needs the shared state"):
        Service(settings_for(tmp_path), {}, role="analyze")
    with pytest.raises(ConfigError, match="unknown role"):
        Service(settings_for(tmp_path), {}, role="everything")


@pytest.fixture
def pg_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings on a PostgreSQL state (emptied) and a storage root shared by every process of the test."""
    import dataclasses

    from dermnode.settings import StateSettings
    from pg import PASSWORD, find_pg_bin, fresh_pg, shared_cluster

    if find_pg_bin()[0] is None:
        pytest.skip(find_pg_bin()[1])
    cluster = shared_cluster()
    fresh_pg(cluster).close_all()
    state = StateSettings(backend="postgresql", dsn=cluster.dsn, password=PASSWORD, lease_s=2.0, notify_poll_s=0.5)
    yield dataclasses.replace(settings_for(tmp_path / "shared", workers=1), state=state)


def test_receive_analyze_and_deliver_roles_share_one_state_and_root(
    pg_settings: Settings, services: list[Service], tmp_path: Path
) -> None:
    """Three processes' worth of services on one PostgreSQL and one storage root: no instance lock between them, an
    instance queued by the receiver is analysed by the analyze role once and delivered by the deliver role once."""
    delivered: list[str] = []
    receiver = Service(pg_settings, {}, role="receive")
    analyzer = Service(pg_settings, {}, role="analyze")
    deliverer = Service(pg_settings, {"dicom": lambda d: delivered.append(d.object_key)}, role="deliver")
    services += [receiver, analyzer, deliverer]
    analysed: list[str] = []

    def processor(job: object) -> str:
        uid = job.sop_instance_uid  # type: ignore[attr-defined]
        analysed.append(uid)
        analyzer.outbox.add(job.id, "dicom", "pacs:main", uid + ".seg", tmp_path / "seg.dcm")  # type: ignore[attr-defined]
        return "analysed"

    analyzer.set_processor(processor)
    for s in (receiver, analyzer, deliverer):
        s.start()
    assert receiver.port > 0 and analyzer.port == 0 and deliverer.port == 0
    assert not analyzer.health().dead and not deliverer.health().dead
    uids = [f"1.2.826.0.1.3680043.10.99.{i}" for i in range(5)]
    for uid in uids:
        assert receiver.queue.enqueue(uid, "1.2.840.10008.5.1.4.1.1.7", tmp_path / f"{uid}.dcm")
        assert not receiver.queue.enqueue(uid, "1.2.840.10008.5.1.4.1.1.7", tmp_path / f"{uid}.dcm")  # 2nd copy
    end = time.monotonic() + 20
    while len(delivered) < len(uids) and time.monotonic() < end:
        time.sleep(0.05)
    assert sorted(analysed) == sorted(uids) and sorted(delivered) == sorted(u + ".seg" for u in uids)
    assert receiver.queue.counts()["done"] == len(uids) and receiver.outbox.counts()["done"] == len(uids)


def test_cli_status_and_replay_read_the_shared_state(pg_settings: Settings, tmp_path: Path) -> None:
    from dermnode.cli import main
    from dermnode.workqueue.db import state_db_of

    queue = JobQueue(state_db_of(pg_settings))
    queue.enqueue("1.2.3", "1.2", tmp_path / "a.dcm")
    job = queue.claim("w")
    assert job is not None and queue.fail(job, "DecodeError: bad", permanent=True)
    env = {"DERMNODE_STATE__BACKEND": "postgresql", "DERMNODE_STATE__DSN": pg_settings.state.dsn,
           "DERMNODE_STATE__PASSWORD": pg_settings.state.password, "DERMNODE_STORAGE__ROOT": str(tmp_path / "else")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["status", "--json", "--dead-letters"]) == 0
        assert main(["replay", "--dead-letter"]) == 0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert queue.counts()["pending"] == 1 and not (tmp_path / "else").exists()


def test_one_delivery_thread_per_destination(tmp_path: Path, services: list[Service]) -> None:
    """Every PACS and the FHIR server get their own delivery thread, so a slow one holds back no other."""
    from dataclasses import replace

    from dermnode.service import delivery_destinations
    from dermnode.settings import FhirSettings, PacsDestination

    base = settings_for(tmp_path)
    assert delivery_destinations(base) == 1  # nothing configured: one thread (results stay queued)
    two_pacs = replace(base, pacs=(PacsDestination(name="a", ae_title="A", host="127.0.0.1", port=104),
                                   PacsDestination(name="b", ae_title="B", host="127.0.0.1", port=105)))
    assert delivery_destinations(two_pacs) == 2
    full = replace(two_pacs, fhir=FhirSettings(base_url="http://127.0.0.1:1/fhir"))
    assert delivery_destinations(full) == 3
    service = Service(full, {})
    services.append(service)
    assert service.pool.delivery_threads == 3
