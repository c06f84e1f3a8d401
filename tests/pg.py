"""A throwaway PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` in a temp folder, on a free loopback port.

Run as an unprivileged user (``postgres`` through ``runuser`` when the tests run as root, since PostgreSQL refuses
to run as root), with password authentication over TCP so the password path of dermnode is the real one. Stopped
by PID (``pg_ctl stop -m fast``, then SIGKILL after a bounded wait). :func:`find_pg_bin` returns ``None`` (the
caller skips with the reason) when PostgreSQL is not installed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dermnode.workqueue.db import PostgresState

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")
USER = "dermnode"
PASSWORD = "s3cret-test-password"  # a throwaway cluster on loopback
DATABASE = "dermnode"


def find_pg_bin() -> tuple[Path | None, str]:
    """The folder with ``initdb`` and ``pg_ctl``, or ``None`` and why not."""
    for folder in PG_BIN_CANDIDATES:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            if os.geteuid() == 0:
                try:
                    pwd.getpwnam("postgres")
                except KeyError:
                    return None, "running as root and there is no 'postgres' user to run PostgreSQL as"
                if shutil.which("runuser") is None:
                    return None, "running as root without runuser"
            return Path(folder), ""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent, ""
    return None, "PostgreSQL (initdb, pg_ctl) is not installed (Debian: apt-get install postgresql)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A running throwaway cluster."""

    bin: Path
    folder: Path
    port: int
    as_user: list[str]

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def dsn(self) -> str:
        """Connection string without the password (dermnode takes it from the environment)."""
        return f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={USER}"

    def pg_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        done = self.pg_ctl("-o", opts, "-l", str(self.folder / "log"), "-w", "-t", "60", "start", timeout=90)
        if done.returncode != 0:
            log = (self.folder / "log").read_text(errors="replace") if (self.folder / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{log[-2000:]}")

    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        try:
            return int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown by PID; SIGKILL when it does not stop within ``timeout``."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # = pg_ctl stop -m fast
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    """Start a fresh cluster with user :data:`USER` (password :data:`PASSWORD`) owning database :data:`DATABASE`.

    Raises
    ------
    RuntimeError
        When PostgreSQL is missing or cannot start (callers skip on :func:`find_pg_bin` first).
    """
    bin_dir, why = find_pg_bin()
    if bin_dir is None:
        raise RuntimeError(why)
    folder = Path(tempfile.mkdtemp(prefix="dermnode-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chown(folder, pg.pw_uid, pg.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    folder.chmod(0o700)
    pwfile = folder / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    cluster = Cluster(bin=bin_dir, folder=folder, port=_free_port(), as_user=as_user)
    try:
        init = subprocess.run(
            [*as_user, str(bin_dir / "initdb"), "-D", str(cluster.data), "-U", USER, f"--pwfile={pwfile}",
             "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stdout}{init.stderr}")
        cluster.start()
        created = subprocess.run(
            [*as_user, str(bin_dir / "createdb"), "-h", str(folder), "-p", str(cluster.port), "-U", USER, DATABASE],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"createdb failed: {created.stdout}{created.stderr}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def fresh_pg(cluster: Cluster, *, lease_s: float = 0.0) -> PostgresState:
    """A :class:`PostgresState` on the session cluster with empty tables (ids from 1)."""
    db = PostgresState(cluster.dsn, password=PASSWORD, lease_s=lease_s)
    conn = db.connect()  # creates the schema on first use
    conn.execute("TRUNCATE dead_letters, deliveries, pruned, jobs RESTART IDENTITY CASCADE")
    return db


_shared: list[Cluster] = []
_shared_stack = contextlib.ExitStack()


def shared_cluster() -> Cluster:
    """The one cluster of this test session (started on first use, stopped when the session's process exits), so
    every test module that needs PostgreSQL shares it. Call :func:`find_pg_bin` first to skip without one."""
    if not _shared:
        _shared.append(_shared_stack.enter_context(running_cluster()))
        atexit.register(_shared_stack.close)
    return _shared[0]
