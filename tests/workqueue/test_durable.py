"""The one durable file write (spool files, results, the FHIR bundle)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dermnode.errors import StorageError
from dermnode.workqueue.durable import atomic_write


def test_atomic_write_is_owner_only_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "d" / "x.dcm"
    atomic_write(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["x.dcm"]


def test_atomic_write_replaces_a_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "results" / "diagnostic-report.json"
    atomic_write(path, b'{"a": 1, "long": "' + b"x" * 100_000 + b'"}')
    atomic_write(path, b'{"a": 2}')  # overwrite with shorter content: no tail of the old file left
    assert path.read_bytes() == b'{"a": 2}'
    assert [p.name for p in path.parent.iterdir()] == ["diagnostic-report.json"]


def test_atomic_write_failure_is_a_storage_error_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_bytes(b"a file where the folder should be")
    with pytest.raises(StorageError, match="cannot write"):
        atomic_write(blocker / "x.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["results"] and blocker.read_bytes().startswith(b"a file")
