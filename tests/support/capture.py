"""Shared pieces for the change-capture tests: a partitioned intermediate, a minimal batched fill, a rename swap,
row-level hashes, and a concurrent writer with its own connection.

The fill and swap here are deliberately minimal stand-ins for core/convert's (same contract: the fill replaces a
key range of the destination per READ COMMITTED transaction; the swap takes ACCESS EXCLUSIVE under lock_timeout,
calls ``replay.finish_in_swap`` and renames), so capture can be tested on its own.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert import capture, replay
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.names import Period, covering, derived_name
from pg_partition.core.db.partitions import create_partition


def intermediate(source: QualifiedName) -> QualifiedName:
    return source.sibling(derived_name(source.name, "intermediate"))


def retired(source: QualifiedName) -> QualifiedName:
    return source.sibling(derived_name(source.name, "retired"))


def make_intermediate(conn: psycopg.Connection[Any], source: QualifiedName, column: str = "created_at",
                      period: Period = Period.MONTH, future_days: int = 70) -> QualifiedName:
    """A RANGE-partitioned copy of ``source``'s shape with a partition per period over the data (+ future)."""
    dest = intermediate(source)
    conn.execute(sql.SQL(
        "CREATE TABLE {d} (LIKE {s} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
        "INCLUDING GENERATED INCLUDING STATISTICS) PARTITION BY RANGE ({c})"
    ).format(d=dest.ident, s=source.ident, c=sql.Identifier(column)))
    row = conn.execute(sql.SQL("SELECT min({c})::timestamp, max({c})::timestamp FROM {s}").format(
        c=sql.Identifier(column), s=source.ident)).fetchone()
    assert row is not None and row[0] is not None
    low: datetime = row[0]
    high: datetime = max(row[1], datetime.now()) + timedelta(days=future_days)
    info = catalog.describe(conn, dest)
    ex = Executor(conn)
    pk = catalog.describe(conn, source).primary_key
    assert pk is not None
    for rng in covering(low, high, period):
        create_partition(ex, info, column, rng, period, primary_key=pk.columns)
    return dest


def fill(conn: psycopg.Connection[Any], source: QualifiedName, dest: QualifiedName, *, batch: int = 2000,
         between: Callable[[int], None] | None = None, key: str = "id") -> int:
    """pgslice-style fill: key ranges up to max(key) at start, each range replaced in one short transaction."""
    top = conn.execute(sql.SQL("SELECT coalesce(max({k}), 0) FROM {s}").format(
        k=sql.Identifier(key), s=source.ident)).fetchone()
    assert top is not None
    lo, n = 1, 0
    while lo <= top[0]:
        hi = lo + batch
        with conn.transaction():
            conn.execute(sql.SQL("DELETE FROM {d} WHERE {k} >= %s AND {k} < %s").format(
                d=dest.ident, k=sql.Identifier(key)), (lo, hi))
            conn.execute(sql.SQL("INSERT INTO {d} SELECT * FROM {s} WHERE {k} >= %s AND {k} < %s").format(
                d=dest.ident, s=source.ident, k=sql.Identifier(key)), (lo, hi))
        n += 1
        lo = hi
        if between is not None:
            between(n)
    return n


def swap(conn: psycopg.Connection[Any], source: QualifiedName, dest: QualifiedName, *,
         lock_timeout: str = "2s", retries: int = 5) -> int:
    """The rename swap with capture: ACCESS EXCLUSIVE under lock_timeout, last backlog, renames, one txn."""
    ex = Executor(conn)
    applied: list[int] = []

    def body() -> None:
        ex.run(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(source.ident))
        applied.append(replay.finish_in_swap(ex, source, dest))
        ex.run(sql.SQL("ALTER TABLE {} RENAME TO {}").format(source.ident, sql.Identifier(retired(source).name)))
        ex.run(sql.SQL("ALTER TABLE {} RENAME TO {}").format(dest.ident, sql.Identifier(source.name)))

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what="swap")
    return applied[-1]


def row_hash(conn: psycopg.Connection[Any], table: QualifiedName, *, exclude: set[int] | None = None,
             key: str = "id") -> tuple[int, str]:
    """(rows, md5 over every row's text in key order), columns by name in ``table``'s order."""
    oid = catalog.table_oid(conn, table)
    assert oid is not None
    cols = sql.SQL(", ").join(sql.Identifier("t", c.name) for c in catalog.columns(conn, oid))
    row = conn.execute(sql.SQL(
        "SELECT count(*), coalesce(md5(string_agg(md5(ROW({cols})::text), '' ORDER BY t.{k})), '') "
        "FROM {t} AS t WHERE NOT (t.{k} = ANY(%s))"
    ).format(cols=cols, t=table.ident, k=sql.Identifier(key)), (sorted(exclude or []),)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def same_columns_hash(conn: psycopg.Connection[Any], a: QualifiedName, b: QualifiedName, *,
                      exclude: set[int] | None = None) -> tuple[tuple[int, str], tuple[int, str]]:
    """Hashes of two tables with the columns of ``a`` (by name) on both sides."""
    oid = catalog.table_oid(conn, a)
    assert oid is not None
    names = [c.name for c in catalog.columns(conn, oid)]
    out = []
    for t in (a, b):
        cols = sql.SQL(", ").join(sql.Identifier("t", c) for c in names)
        row = conn.execute(sql.SQL(
            "SELECT count(*), coalesce(md5(string_agg(md5(ROW({cols})::text), '' ORDER BY t.id)), '') "
            "FROM {t} AS t WHERE NOT (t.id = ANY(%s))"
        ).format(cols=cols, t=t.ident), (sorted(exclude or []),)).fetchone()
        assert row is not None
        out.append((int(row[0]), str(row[1])))
    return out[0], out[1]


def changelog_keys(conn: psycopg.Connection[Any], source: QualifiedName) -> list[int]:
    return [r[0] for r in conn.execute(sql.SQL("SELECT id FROM {} ORDER BY id").format(
        capture.changelog_name(source).ident)).fetchall()]


class Writer(threading.Thread):
    """The application: its own connection, a random mix of writes until stopped.

    Every committed statement's RETURNING ``tableoid`` tells which table it hit: the original (before the swap)
    or a partition of the new table (after). Keys written after the swap are collected in ``post_swap_keys``.
    Rows in ``avoid`` (held by the test's long transaction) are never touched.
    """

    KINDS = ("insert", "update", "move", "delete", "key_change", "bulk_update", "multi", "upsert")

    def __init__(self, dsn: str, table: QualifiedName, *, seed: int = 7, low: int = 20, high: int = 10_000,
                 avoid: set[int] | None = None, pause: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.table = table
        self.rng = random.Random(seed)
        self.low, self.high = low, high
        self.avoid = avoid or set()
        self.pause = pause
        self.stop_event = threading.Event()
        self.ops: Counter[str] = Counter()
        self.post_swap_ops: Counter[str] = Counter()
        self.post_swap_keys: set[int] = set()
        self.errors: list[BaseException] = []
        self.source_oid: int | None = None
        self.sequence: str | None = None

    def _pick(self) -> int:
        while True:
            k = self.rng.randint(self.low, self.high)
            if k not in self.avoid:
                return k

    def _record(self, kind: str, rows: list[tuple[Any, ...]], extra_keys: tuple[int, ...] = ()) -> None:
        if not rows:
            return
        self.ops[kind] += 1
        if any(r[1] != self.source_oid for r in rows):
            self.post_swap_ops[kind] += 1
            self.post_swap_keys.update(int(r[0]) for r in rows)
            self.post_swap_keys.update(extra_keys)

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self.source_oid = catalog.table_oid(conn, self.table)
                seq = conn.execute("SELECT pg_get_serial_sequence(%s, 'id')", (str(self.table),)).fetchone()
                assert seq is not None and seq[0] is not None
                self.sequence = seq[0]
                t = self.table.ident
                while not self.stop_event.is_set():
                    kind = self.rng.choice(self.KINDS)
                    self.step(conn, t, kind)
                    time.sleep(self.pause)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def step(self, conn: psycopg.Connection[Any], t: sql.Composable, kind: str) -> None:
        token = f"w{self.rng.randint(0, 10**9)}"
        k = self._pick()
        ret = sql.SQL(" RETURNING id, tableoid")
        if kind == "insert":
            rows = conn.execute(sql.SQL(
                "INSERT INTO {} (trackable_type, trackable_id, owner_type, owner_id, key, parameters, "
                "recipient_type, recipient_id, created_at, updated_at) VALUES ('Job', 1, 'User', 2, 'w.insert', "
                "%s, 'Company', 3, now()::timestamp - %s * interval '1 day', now()::timestamp)").format(t) + ret,
                (token, self.rng.randint(0, 100))).fetchall()
            self._record(kind, rows)
        elif kind == "update":
            rows = conn.execute(sql.SQL(
                "UPDATE {} SET parameters = %s, updated_at = now()::timestamp WHERE id = %s").format(t) + ret,
                (token, k)).fetchall()
            self._record(kind, rows)
        elif kind == "move":  # partition column change: the row belongs to another month afterwards
            rows = conn.execute(sql.SQL(
                "UPDATE {} SET created_at = CASE WHEN created_at < now()::timestamp - interval '90 days' "
                "THEN created_at + interval '35 days' ELSE created_at - interval '35 days' END, key = %s "
                "WHERE id = %s").format(t) + ret, (token, k)).fetchall()
            self._record(kind, rows)
        elif kind == "delete":
            rows = conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(t) + ret, (k,)).fetchall()
            self._record(kind, rows)
        elif kind == "key_change":
            rows = conn.execute(sql.SQL(
                "UPDATE {t} SET id = nextval({seq}::regclass), parameters = %s "
                "WHERE id = %s").format(t=t, seq=sql.Literal(self.sequence)) + ret, (token, k)).fetchall()
            self._record(kind, rows, extra_keys=(k,))
        elif kind == "bulk_update":
            rows = conn.execute(sql.SQL(
                "UPDATE {} SET owner_id = owner_id + 1, updated_at = now()::timestamp "
                "WHERE id BETWEEN %s AND %s AND NOT (id = ANY(%s))").format(t) + ret,
                (k, k + 40, sorted(self.avoid))).fetchall()
            self._record(kind, rows)
        elif kind == "multi":  # several statements, one transaction
            k2 = self._pick()
            with conn.transaction():
                rows = conn.execute(sql.SQL("UPDATE {} SET recipient_id = %s WHERE id = %s").format(t) + ret,
                                    (self.rng.randint(0, 999), k)).fetchall()
                rows += conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(t) + ret, (k2,)).fetchall()
            self._record(kind, rows)
        elif kind == "upsert":  # INSERT ... ON CONFLICT DO UPDATE fires both INSERT and UPDATE capture
            try:
                rows = conn.execute(sql.SQL(
                    "INSERT INTO {t} SELECT * FROM {t} WHERE id = %s "
                    "ON CONFLICT (id) DO UPDATE SET parameters = %s").format(t=t) + ret, (k, token)).fetchall()
            except psycopg.errors.InvalidColumnReference:
                return  # after the swap: a per-partition primary key cannot arbitrate ON CONFLICT (id)
            self._record(kind, rows)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        if self.errors:
            raise self.errors[0]
