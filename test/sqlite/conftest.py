"""Fixtures of the sqlitesync suite: the extension under test and replicas on
real SQLite file databases (WAL) in pytest's tmp_path.

    SQLITESYNC_EXT   extension to load (default build/sqlitesync.so, relative
                     paths from the repository root)
    PGS_SEED, PGS_SCHEDULES   see test_convergence.py

See README.md in this directory for the commands.
"""
import sqlite3
import sys

import pytest

import synclib
from synclib import Replica


def pytest_configure(config):
    ext = synclib.ext_path()
    if not hasattr(sqlite3.Connection, "enable_load_extension"):
        raise pytest.UsageError(
            f"{sys.executable}: this Python's sqlite3 module cannot load extensions; "
            "run the suite with Debian's /usr/bin/python3")
    if not ext.exists():
        raise pytest.UsageError(
            f"extension {ext} not found: run `make all` (or `make build/asan/sqlitesync.so`) "
            "or point SQLITESYNC_EXT at it")


def pytest_report_header(config):
    return [f"sqlitesync extension: {synclib.ext_path()}", f"sqlite {sqlite3.sqlite_version}"]


@pytest.fixture
def ext():
    return str(synclib.ext_path())


@pytest.fixture
def replica(tmp_path):
    """replica(name, load=True) opens tmp_path/<name>.db as a Replica; every
    replica made through the fixture is closed (plain sqlite3_close) at teardown."""
    made = []

    def make(name, load=True):
        r = Replica(tmp_path / f"{name}.db", name, load=load)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def conn(replica):
    """conn: one connection with the extension, nothing initialized."""
    return replica("db").conn


@pytest.fixture
def sync():
    return synclib.sync


@pytest.fixture
def table_rows():
    return synclib.table_rows
