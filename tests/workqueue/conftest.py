"""The state database of the queue and outbox tests, on both backends: SQLite (a file under ``tmp_path``) and
PostgreSQL (one throwaway cluster per test session, :mod:`pg`; its tables are emptied before each test).

On PostgreSQL every lease is 0 s, so a second queue object on the same database behaves as the SQLite tests'
"restarted process" (what was in flight counts as orphaned); the lease tests make their own, longer leases.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dermnode.workqueue.db import PostgresState, StateDB, database_path
from pg import Cluster, find_pg_bin, fresh_pg, shared_cluster

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    bin_dir, why = find_pg_bin()
    if bin_dir is None:
        pytest.skip(why)
    yield shared_cluster()


@pytest.fixture
def pg_state(pg_cluster: Cluster) -> Iterator[PostgresState]:
    db = fresh_pg(pg_cluster)
    yield db
    db.close_all()


@pytest.fixture(params=BACKENDS)
def state_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateDB | Path]:
    """The state database of one test: an SQLite file path, or a PostgreSQL state with empty tables."""
    if request.param == "sqlite":
        yield database_path(tmp_path)
        return
    cluster = request.getfixturevalue("pg_cluster")
    db = fresh_pg(cluster)
    yield db
    db.close_all()
