"""The spool's file naming: only syntactically valid UIDs, and never a path outside the spool."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermnode.dicom_io.uids import is_valid_uid
from dermnode.errors import StorageError
from dermnode.scp.spool import Spool


@pytest.mark.parametrize(
    "uid",
    ["1", "1.2.840.10008.5.1.4.1.1.77.1.7", "2.25.329800735698586629295641978511506172918", "1.2.05", "9" * 64],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "../../../X",
        "/tmp/X",
        "1.2/../../x",
        "1..2",
        ".1.2",
        "1.2.",
        "1.2.3 ",
        "1.2\x00",
        "1.2\n3",
        "a.b",
        "١.٢",
        "9" * 65,
    ],
)
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["../../../ESCAPED", "/tmp/ESCAPED_ABS", "1.2/../../../x", "1.2\x00", ".."])
def test_path_for_refuses_a_path_outside_the_spool(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path / "var", 0, fsync=False)
    with pytest.raises(StorageError):
        spool.path_for(uid)
    with pytest.raises(StorageError):
        spool.store(uid, b"DICM")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["var", "var/spool"]


def test_path_for_keeps_a_valid_uid_in_its_fan_out_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0, fsync=False)
    path = spool.store("1.2.3", b"DICM")
    assert path == spool.path_for("1.2.3")
    assert path.parent.parent == spool.directory and path.name == "1.2.3.dcm"
    assert list(spool.files()) == [path]
