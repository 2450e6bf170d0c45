"""Issue 15 case 10: the warehouse feed survives the conversion.

A REAL subscriber: a second PostgreSQL cluster started by tools/stack.py (no standby), subscribed with
CREATE SUBSCRIPTION to a publication ``FOR TABLE events`` on the test database, its table keyed by
``PRIMARY KEY (id)`` as a warehouse's would be. The publisher's table takes UPDATE + DELETE + INSERT from a steady
writer during the whole conversion (capture on, the default) and after the swap; afterwards the subscriber's
table equals the publisher's row for row, and its apply worker never failed.

This runs on the default version as ``postgres``; the whole lifecycle (conversion, rotation, archive, restore)
through a real subscriber, on every version as the non-superuser owner, is tests/matrix/test_feed.py.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pg_partition.core import convert
from pg_partition.core.convert import replay, verify
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from tests.support.feed import App, subscribe, wait_for

TABLE = QualifiedName("public", "events")
CREATE = ("CREATE TABLE events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, v text, "
          "n integer NOT NULL DEFAULT 0)")


def _rows(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT id, created_at, v, n FROM events ORDER BY id").fetchall()


def _apply_errors(sub: psycopg.Connection[Any]) -> int:
    row = sub.execute("SELECT coalesce(sum(apply_error_count + sync_error_count), 0) "
                      "FROM pg_stat_subscription_stats").fetchone()
    return int(row[0]) if row else 0


def test_subscriber_keeps_applying_through_a_conversion_under_writes(db, conn, subscriber) -> None:
    conn.execute(CREATE)
    conn.execute("INSERT INTO events (created_at, v) SELECT now() - (g % 80) * interval '1 day', 's' "
                 "FROM generate_series(1, 3000) g")
    conn.execute("CREATE PUBLICATION feed FOR TABLE events")
    sub_db = f"sub_{db.name}"
    with subscriber.primary.connect(autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{sub_db}"')
    sub = subscriber.primary.connect(sub_db, autocommit=True)
    writer = App(db.dsn, rate=20, high=3000)
    try:
        subscribe(sub, source=db, publication="feed", name="feed_sub",
                  create_table="CREATE TABLE events (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, "
                               "v text, n integer NOT NULL DEFAULT 0)")
        writer.start()

        spec = ConvertSpec.create("events", "created_at", period="month")
        ex = Executor(conn)
        report = convert.preflight(conn, spec)
        notes = [w for w in report["warnings"] if "replica identity" in w.lower()]
        assert notes and "REPLICA IDENTITY FULL" in notes[0] and "feed" in notes[0], report["warnings"]
        convert.prep(ex, spec)
        convert.add_partitions(ex, spec, cover_data=True, future=2)
        assert convert.install_capture(ex, spec)["capture"]
        for item in convert.plan_fill(ex, spec, batch_size=1000)["items"]:
            convert.fill(ex, spec, item)
        replay.replay(ex, spec.table, spec.intermediate, until_backlog_below=50)
        convert.build_indexes(ex, spec)
        convert.analyze(ex, spec)
        assert verify.verify_conversion(ex, spec).ok
        convert.finish_and_swap(ex, spec)
        assert catalog.describe(conn, TABLE).is_partitioned
        after_swap = writer.done
        wait_for(lambda: writer.done >= after_swap + 40, what="writes after the swap")
    finally:
        writer.stop_event.set()
        writer.join(30)
    try:
        assert not writer.errors, writer.errors
        # every change, before and after the swap, reaches the subscriber and applies there
        wait_for(lambda: _rows(sub) == _rows(conn) or _apply_errors(sub) > 0, what="the subscriber to catch up",
              timeout=90)
        assert _apply_errors(sub) == 0
        assert _rows(sub) == _rows(conn)
        assert len(_rows(conn)) > 2000
    finally:
        sub.execute("DROP SUBSCRIPTION IF EXISTS feed_sub")
        sub.close()
        with subscriber.primary.connect(autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{sub_db}" WITH (FORCE)')
