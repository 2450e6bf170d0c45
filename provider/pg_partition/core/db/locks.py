"""Per-table mutual exclusion that holds on any executor: a session-level advisory lock keyed on the table.

Why in PostgreSQL: two runs of the same step on one table (an API-triggered run and a CLI ``dags test``, a
retried task whose first attempt is still alive on another worker) share nothing but the database, so the lock
must live there. A session-level advisory lock is released by PostgreSQL when the session ends, so a killed
worker never leaves a stale lock behind; different tables never block each other, so several conversions may run
at once (``max_active_runs`` > 1) bounded by a pool per database.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

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
        _unlock(conn, f"pg_advisory_unlock{suffix}", key)


def _unlock(conn: psycopg.Connection[Any], function: str, key: str) -> None:
    """Release a session advisory lock taken on ``hashtextextended(key, 0)``; a failed transaction is rolled back
    first (the unlock cannot run inside it), and a closed connection has released it already."""
    if conn.closed:
        return
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        conn.rollback()
    conn.execute(f"SELECT {function}(hashtextextended(%s, 0))", (key,))


def holds(conn: psycopg.Connection[Any], table: QualifiedName) -> bool:
    """Whether this session already holds the table's lock, shared or exclusive (an operator's, or an outer engine
    step's)."""
    row = conn.execute(
        """SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
                 AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(%s, 0) AND objsubid = 1)""",
        (lock_key(table),)).fetchone()
    return bool(row and row[0])


@contextmanager
def hold_table(conn: psycopg.Connection[Any], table: QualifiedName, *, what: str,
               item: str | None = None) -> Iterator[None]:
    """The lock an engine step takes itself, so a direct caller of the engine is excluded like an operator is.

    Re-entrant: when this session already holds the table's lock (the operator took it, shared for the mapped fill
    tasks, or an outer step did) the step runs under it; otherwise it takes the exclusive lock for its duration and
    fails at once, naming the holder, when another session has it. With ``item`` (a fill range, the replay) the
    step takes the table's lock shared plus the item's own exclusive lock: fill items and the replay of one
    conversion run side by side, while prep, swap or another run's same item are excluded."""
    if holds(conn, table):
        yield
        return
    with table_lock(conn, table, what=what, shared=item is not None, item=item):
        yield


P = ParamSpec("P")
R = TypeVar("R")


def _subject_table(subject: Any) -> QualifiedName | None:
    if isinstance(subject, QualifiedName):
        return subject
    table = getattr(subject, "table", None)
    return table if isinstance(table, QualifiedName) else None


def locks_table(table_of: Callable[..., QualifiedName | None] | None = None, *,
                item_of: Callable[..., str | None] | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate an engine entry point ``f(ex, subject, ...)`` that changes a table so it holds the table's lock
    (:func:`hold_table`) while it runs. The table is ``subject.table`` (a ConvertSpec, a RotationSpec) or
    ``subject`` itself, or what ``table_of(*args, **kwargs)`` returns; ``item_of`` names the step's item for the
    shared mode of :func:`hold_table`. A dry run changes nothing and takes no lock."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            ex = args[0]
            conn = ex if isinstance(ex, psycopg.Connection) else getattr(ex, "conn", None)
            if table_of is not None:
                table = table_of(*args, **kwargs)
            else:
                table = _subject_table(args[1] if len(args) > 1 else kwargs.get("spec", kwargs.get("cfg")))
            if conn is None or table is None or getattr(ex, "dry_run", False):
                return func(*args, **kwargs)
            item = item_of(*args, **kwargs) if item_of is not None else None
            with hold_table(conn, table, what=func.__name__, item=item):
                return func(*args, **kwargs)

        return wrapper

    return decorate


# --- a per-database bound on heavy steps ------------------------------------------------------------------------

SLOTS_SETTING = "pg_partition.heavy_slots"
DEFAULT_SLOTS = 4
MAX_SLOTS = 64
SLOT_NAMESPACE = "pg_partition:heavy-slot#"
WAIT_SECONDS = 3600.0  # how long a heavy step waits for a slot before it fails (its task retries later)


class DatabaseBusyError(PartitionError):
    """Every heavy-step slot of the database stayed taken for the whole wait; nothing was changed."""


def heavy_slots(conn: psycopg.Connection[Any]) -> int:
    """How many heavy steps may run at once in this database: the ``pg_partition.heavy_slots`` setting (a DBA
    sets it where the load is felt, ``ALTER DATABASE d SET pg_partition.heavy_slots = 2``), else 4."""
    row = conn.execute("SELECT current_setting(%s, true)", (SLOTS_SETTING,)).fetchone()
    raw = (row[0] if row else None) or ""
    try:
        value = int(raw) if raw.strip() else DEFAULT_SLOTS
    except ValueError:
        raise DatabaseBusyError(f"{SLOTS_SETTING}={raw!r} is not a whole number",
                                fix=f"ALTER DATABASE <db> SET {SLOTS_SETTING} = {DEFAULT_SLOTS} (1 to {MAX_SLOTS})"
                                ) from None
    return min(max(value, 1), MAX_SLOTS)


def _slot_holders(conn: psycopg.Connection[Any], slots: int) -> list[str]:
    rows = conn.execute(
        """SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND ((l.classid::bigint << 32) | l.objid::bigint) IN (
                 SELECT hashtextextended(%s || i, 0) FROM generate_series(0, %s - 1) i)
           ORDER BY 1""", (SLOT_NAMESPACE, slots)).fetchall()
    return [f"pid {r[0]} ({r[1] or 'no application_name'})" for r in rows]


@contextmanager
def heavy_slot(conn: psycopg.Connection[Any], *, what: str, wait_seconds: float | None = None, poll: float = 1.0,
               logger: Any = None) -> Iterator[None]:
    """Hold one of the database's heavy-step slots (session advisory locks ``slot#0..N-1``) for the block.

    Why in the database: the conn_id of a convert, rollback or restore run is a runtime param, so a static Airflow
    pool cannot be per database (and ``pool`` is not a templated field), while the database itself is what every
    run on any executor shares. Runs on different tables may then run side by side (``max_active_runs`` > 1), but
    at most N of their heavy steps (fill, index builds, ANALYZE, verify, archive, restore) at once per database.
    Re-entrant: a session that holds a slot keeps using it. Waits up to ``wait_seconds`` (logging who holds the
    slots once a minute), then raises :class:`DatabaseBusyError` naming them."""
    slots = heavy_slots(conn)
    mine = conn.execute(
        """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
             AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) IN (
                 SELECT hashtextextended(%s || i, 0) FROM generate_series(0, %s - 1) i)""",
        (SLOT_NAMESPACE, slots)).fetchone()
    if mine and mine[0]:
        yield
        return
    deadline = time.monotonic() + max(WAIT_SECONDS if wait_seconds is None else wait_seconds, 0.0)
    next_log = time.monotonic()
    taken: str | None = None
    while taken is None:
        for i in range(slots):
            key = f"{SLOT_NAMESPACE}{i}"
            row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()
            if row and row[0]:
                taken = key
                break
        if taken is not None:
            break
        now = time.monotonic()
        if now >= deadline:
            raise DatabaseBusyError(
                f"{what}: all {slots} heavy-step slots of this database are taken "
                f"({', '.join(_slot_holders(conn, slots)) or 'by sessions that just ended'})",
                fix=f"wait for those runs, or allow more at once: ALTER DATABASE <db> SET {SLOTS_SETTING} = "
                f"{slots + 1}")
        if logger is not None and now >= next_log:
            logger.info("%s: waiting for one of the %d heavy-step slots of this database, held by %s", what, slots,
                        ", ".join(_slot_holders(conn, slots)) or "sessions that just ended")
            next_log = now + 60
        time.sleep(poll)
    try:
        yield
    finally:
        _unlock(conn, "pg_advisory_unlock", taken)


def heavy_step(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate an engine step ``f(ex, ...)`` whose load counts against the database's heavy-step slots
    (:func:`heavy_slot`); a dry run takes none."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ex = args[0]
        conn = ex if isinstance(ex, psycopg.Connection) else getattr(ex, "conn", None)
        if conn is None or getattr(ex, "dry_run", False):
            return func(*args, **kwargs)
        with heavy_slot(conn, what=func.__name__, logger=getattr(ex, "logger", None)):
            return func(*args, **kwargs)

    return wrapper
