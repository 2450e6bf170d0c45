"""Per-table mutual exclusion that holds on any executor: a session-level advisory lock keyed on the table.

Why in PostgreSQL: two runs of the same step on one table (an API-triggered run and a CLI ``dags test``, a
retried task whose first attempt is still alive on another worker) share nothing but the database, so the lock
must live there. A session-level advisory lock is released by PostgreSQL when the session ends, so a killed
worker never leaves a stale lock behind; different tables never block each other, so several conversions may run
at once (``max_active_runs`` > 1) bounded by a pool per database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import PartitionError

NAMESPACE = "pg_partition:"


class TableBusyError(PartitionError):
    """Another session holds the table's pg-partition lock; nothing was changed."""


def lock_key(table: QualifiedName) -> str:
    """The text hashed into the advisory lock key: the qualified name (stable across the swap's renames, so the
    original table, its intermediate and its retired copy share one lock)."""
    return NAMESPACE + json.dumps([table.schema, table.name])


def holder(conn: psycopg.Connection[Any], table: QualifiedName, key: str | None = None) -> dict[str, Any] | None:
    """Who holds the table's lock: pid, application_name, user, state, since when (None when free)."""
    row = conn.execute(
        """SELECT a.pid, a.application_name, a.usename, a.state, a.backend_start::text, a.client_addr::text
           FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database
                                                                          WHERE datname = current_database())
             AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%s, 0) AND l.objsubid = 1
             AND a.pid <> pg_backend_pid()
           LIMIT 1""", (key or lock_key(table),)).fetchone()
    if row is None:
        return None
    return {"pid": row[0], "application_name": row[1], "user": row[2], "state": row[3], "backend_start": row[4],
            "client_addr": row[5]}


@contextmanager
def table_lock(conn: psycopg.Connection[Any], table: QualifiedName, *, what: str = "pg-partition",
               wait_seconds: float = 0.0, poll: float = 0.5, shared: bool = False,
               item: str | None = None) -> Iterator[None]:
    """Hold the table's lock for the block; waits up to ``wait_seconds``, then raises :class:`TableBusyError`
    naming the holder. Re-entrant on the same session (advisory locks stack).

    ``shared`` is for the mapped fill tasks of one conversion, which run side by side: they share the table's
    lock (so no other step runs meanwhile) and each also takes ``item``'s own exclusive lock (so two runs never
    fill the same partition at once)."""
    if shared and item is not None:
        with table_lock(conn, table, what=what, wait_seconds=wait_seconds, poll=poll, shared=True), \
                _lock(conn, table, lock_key(table) + "#" + item, what, wait_seconds, poll, False):
            yield
        return
    with _lock(conn, table, lock_key(table), what, wait_seconds, poll, shared):
        yield


@contextmanager
def _lock(conn: psycopg.Connection[Any], table: QualifiedName, key: str, what: str, wait_seconds: float,
          poll: float, shared: bool) -> Iterator[None]:
    suffix = "_shared" if shared else ""
    deadline = time.monotonic() + max(wait_seconds, 0.0)
    while True:
        row = conn.execute(f"SELECT pg_try_advisory_lock{suffix}(hashtextextended(%s, 0))", (key,)).fetchone()
        if row and row[0]:
            break
        if time.monotonic() >= deadline:
            who = holder(conn, table, key)
            desc = (f"pid {who['pid']}, application_name {who['application_name']!r}, user {who['user']}, "
                    f"{who['state']}, connected since {who['backend_start']}") if who else "a session that just ended"
            raise TableBusyError(
                f"{what}: another pg-partition step is working on {table} ({desc})", where=str(table),
                fix="wait for that run to finish (or fail) and retry; if it is stuck, cancel it with "
                "SELECT pg_cancel_backend(<pid>). Runs on different tables do not block each other")
        time.sleep(poll)
    try:
        yield
    finally:
        if not conn.closed:
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                conn.rollback()
            conn.execute(f"SELECT pg_advisory_unlock{suffix}(hashtextextended(%s, 0))", (key,))
