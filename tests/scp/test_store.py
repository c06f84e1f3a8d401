"""The one write path of a C-STORE and of a console upload: ``store_and_queue``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dermnode.errors import InsufficientSpaceError
from dermnode.scp.spool import Spool
from dermnode.scp.store import StoreOutcome, admit, store_and_queue
from dermnode.workqueue import diskspace
from dermnode.workqueue.db import database_path
from dermnode.workqueue.durable import atomic_write
from dermnode.workqueue.jobs import JobQueue


def _store(spool: Spool, queue: JobQueue, uid: str, data: object) -> tuple[StoreOutcome, Path | None]:
    return store_and_queue(spool, queue, sop_instance_uid=uid, sop_class_uid="1.2", study_instance_uid="1.9",
                           data=data, calling_aet="MOD", peer="127.0.0.1:1")  # type: ignore[arg-type]


def test_parts_are_written_in_order_without_joining(tmp_path: Path) -> None:
    spool, queue = Spool(tmp_path, 1), JobQueue(database_path(tmp_path))
    head, body = b"\0" * 128 + b"DICM" + b"meta", bytearray(b"x" * 300_000)
    outcome, path = _store(spool, queue, "1.2.3", [head, memoryview(body)])
    assert outcome is StoreOutcome.STORED and outcome.queued
    assert path is not None and path.read_bytes() == head + bytes(body)
    row = queue.get("1.2.3")
    assert row is not None and row["path"] == str(path) and row["calling_aet"] == "MOD"


def test_duplicate_is_not_written_again_and_a_dead_job_is_requeued(tmp_path: Path) -> None:
    spool, queue = Spool(tmp_path, 1), JobQueue(database_path(tmp_path), max_attempts=1)
    assert _store(spool, queue, "1.2.3", b"first")[0] is StoreOutcome.STORED
    assert _store(spool, queue, "1.2.3", b"second") == (StoreOutcome.DUPLICATE, None)
    assert spool.path_for("1.2.3").read_bytes() == b"first"
    job = queue.claim("w")
    assert job is not None and queue.fail(job, "bad", permanent=True)
    outcome, path = _store(spool, queue, "1.2.3", b"third")
    assert outcome is StoreOutcome.REQUEUED and path is not None and path.read_bytes() == b"third"
    assert queue.state("1.2.3") == "pending"


def test_one_free_space_reading_refuses_below_the_minimum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = shutil.disk_usage

    def disk_usage(path: Path) -> object:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(diskspace.shutil, "disk_usage", disk_usage)
    spool, queue = Spool(tmp_path, 1), JobQueue(database_path(tmp_path))
    assert _store(spool, queue, "1.2.3", b"data")[0] is StoreOutcome.STORED
    assert len(calls) == 1  # the refusal, the low-disk warning and the spool write read it once
    huge = Spool(tmp_path, 1 << 40)
    with pytest.raises(InsufficientSpaceError):
        admit(huge, queue, "1.2.4")
    with pytest.raises(InsufficientSpaceError):
        _store(huge, queue, "1.2.4", b"data")
    assert not huge.path_for("1.2.4").exists() and queue.state("1.2.4") is None


def test_atomic_write_takes_one_buffer_or_several(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a" / "one.bin", b"abc")
    atomic_write(tmp_path / "a" / "parts.bin", [b"ab", b"", memoryview(b"cd"), bytearray(b"e")])
    assert (tmp_path / "a" / "one.bin").read_bytes() == b"abc"
    assert (tmp_path / "a" / "parts.bin").read_bytes() == b"abcde"
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")] == []
