"""Issue 16: the lock retry loop of ``Executor.with_lock_timeout`` retries what waiting can cure (a lock timeout, a
deadlock, a serialization failure) and nothing else: a schema error fails on its first attempt."""

from __future__ import annotations

import time
import warnings

import psycopg
import pytest

from pg_partition.core.db.errors import LockTimeoutExhausted
from pg_partition.core.db.execute import Executor


def test_schema_error_fails_at_once(conn) -> None:
    ex = Executor(conn)
    calls: list[int] = []

    def body() -> None:
        calls.append(1)
        ex.run("ALTER TABLE no_such_table ADD COLUMN x int")

    started = time.monotonic()
    with pytest.raises(psycopg.errors.UndefinedTable):
        ex.with_lock_timeout(body, lock_timeout="50ms", retries=5, what="schema error")
    assert calls == [1]
    assert time.monotonic() - started < 5  # no backoff sleep happened (a retry would sleep at least 0.2 s first)


def test_no_tenacity_deprecation_warning(conn) -> None:
    conn.execute("CREATE TABLE t (id int)")
    ex = Executor(conn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        ex.with_lock_timeout(lambda: ex.run("ALTER TABLE t ADD COLUMN y int"), lock_timeout="1s", retries=2)


def test_lock_timeout_is_retried_then_exhausted(conn, db) -> None:
    conn.execute("CREATE TABLE t (id int)")
    ex = Executor(conn)
    calls: list[int] = []

    def body() -> None:
        calls.append(1)
        ex.run("ALTER TABLE t ADD COLUMN y int")

    with db.connect(autocommit=False) as holder:
        holder.execute("LOCK TABLE t IN ACCESS SHARE MODE")
        with pytest.raises(LockTimeoutExhausted):
            ex.with_lock_timeout(body, lock_timeout="20ms", retries=3, what="locked")
    assert len(calls) == 3


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])  # deadlock_detected, serialization_failure
def test_deadlock_and_serialization_failure_are_retried(conn, sqlstate: str) -> None:
    """The server raises the error (a real ERROR with that SQLSTATE) on the first attempt; the second succeeds."""
    conn.execute("CREATE TABLE t (id int)")
    ex = Executor(conn)
    calls: list[int] = []

    def body() -> None:
        calls.append(1)
        if len(calls) == 1:
            ex.run(f"DO $$ BEGIN RAISE EXCEPTION 'simulated' USING ERRCODE = '{sqlstate}'; END $$")
        ex.run("ALTER TABLE t ADD COLUMN y int")

    ex.with_lock_timeout(body, lock_timeout="1s", retries=3, what="retryable")
    assert len(calls) == 2
    assert conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'y'"
                        ).fetchone() == (1,)
