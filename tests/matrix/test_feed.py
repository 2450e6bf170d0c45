"""Issue 15 case 10, the whole lifecycle: the warehouse feed survives conversion, rotation, archive and restore,
under writes that never stop, on every server version, as the non-superuser owner ``app_owner``.

A REAL subscriber: a second PostgreSQL cluster of the same major version, subscribed with CREATE SUBSCRIPTION
to a publication ``FOR TABLE events`` that ``app_owner`` created, its table keyed by ``PRIMARY KEY (id)`` as a
warehouse's would be. An application (INSERT, UPDATE, DELETE at about 25 tx/s) writes through every step; it
only pauses while the two sides are compared, so that the comparison is of a settled state.

What "equal" means at each stage (the warehouse keeps history, the source keeps a window):

* after the conversion: the subscriber's table is the source table, row for row;
* after rotation (new partitions premade, rows moved into them out of the DEFAULT partition, old ones
  detached) and after the archive (upload, verify, DROP of a
  detached partition): the subscriber's table is the source table plus the rows the detached partitions held
  when they were detached. A DETACH or a DROP is not replicated (neither is a DELETE), so the warehouse keeps
  the archived rows; the application's UPDATEs and DELETEs no longer reach them at the source either;
* after the restore (the archive loaded into a standalone table, then ATTACHed): the source again holds the
  archived rows, so the subscriber's table is the source table, row for row. The rows loaded by the restore
  must not be published as INSERTs (the subscriber already has them: a duplicate-key error would stop its apply
  worker for good); the application's UPDATEs and DELETEs of restored rows after the attach must apply.

The apply worker must never fail: ``pg_stat_subscription_stats`` (15+) counts apply and sync errors, and the
subscriber's server log must hold no ERROR from a logical replication worker (every version).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

from pg_partition.core import archive, rotate
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from tests.support.convert import convert_all
from tests.support.feed import App, subscribe, wait_for

TABLE = QualifiedName("public", "events")
SEED_ROWS = 3000
COLUMNS = "id, created_at, v, n"


def _rows(conn: psycopg.Connection[Any], query: str) -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT {COLUMNS} FROM ({query}) t ORDER BY id").fetchall()


def _stats_errors(sub: psycopg.Connection[Any]) -> int:
    if sub.info.server_version < 150000:
        return 0  # no pg_stat_subscription_stats before 15: the server log is checked instead
    row = sub.execute("SELECT coalesce(sum(apply_error_count + sync_error_count), 0) "
                      "FROM pg_stat_subscription_stats").fetchone()
    return int(row[0]) if row else 0


def _log_errors(log: Path, offset: int) -> list[str]:
    text = log.read_text(errors="replace")[offset:]
    return [line for line in text.splitlines() if "ERROR:" in line]


def test_the_feed_survives_convert_rotate_archive_restore_under_writes(
        owner_db, owner_conn, subscriber, bucket, cluster) -> None:
    conn = owner_conn
    conn.execute("CREATE TABLE events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, v text, "
                 "n integer NOT NULL DEFAULT 0)")
    # five months of history up to now: rotation below keeps two months and a bit
    conn.execute("INSERT INTO events (created_at, v) SELECT now() - (g %% 150) * interval '1 day', 's' "
                 "FROM generate_series(1, %s) g", (SEED_ROWS,))
    conn.execute("CREATE PUBLICATION feed FOR TABLE events")
    sub_db = f"sub_{owner_db.name}"
    log = subscriber.primary.datadir / "server.log"
    log_offset = len(log.read_text(errors="replace"))
    with subscriber.primary.connect(autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{sub_db}"')
    sub = subscriber.primary.connect(sub_db, autocommit=True)
    app = App(owner_db.dsn, rate=25, high=SEED_ROWS)
    s3 = bucket.client()

    def settled(stage: str, expected_query: str) -> None:
        """Pause the application, wait until the subscriber has applied everything, compare, resume."""
        app.pause()
        try:
            assert not app.errors, app.errors
            want = _rows(conn, expected_query)
            try:
                wait_for(lambda: _rows(sub, "SELECT * FROM events") == want or _stats_errors(sub) > 0
                      or bool(_log_errors(log, log_offset)), what=f"the subscriber to catch up after {stage}")
            except AssertionError as exc:
                have = set(_rows(sub, "SELECT * FROM events"))
                raise AssertionError(f"{exc}: {len(have - set(want))} rows only on the subscriber, "
                                     f"{len(set(want) - have)} only on the source, e.g. "
                                     f"{sorted(have ^ set(want))[:4]}") from None
            assert _stats_errors(sub) == 0, stage
            assert _log_errors(log, log_offset) == [], stage
            assert _rows(sub, "SELECT * FROM events") == want, stage
        finally:
            app.resume()

    try:
        subscribe(sub, source=owner_db, publication="feed", name="feed_sub",
                  create_table="CREATE TABLE events (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, "
                               "v text, n integer NOT NULL DEFAULT 0)")
        app.start()
        wait_for(lambda: app.done >= 10 or bool(app.errors), what="the application to write")

        # 1. conversion (capture on) with a DEFAULT partition, swap
        spec = ConvertSpec.create("events", "created_at", period="month", default_partition=True)
        convert_all(conn, spec, capture=True, future=1, batch_size=1000)  # as the DAG: replay, verify gate, swap
        ex = Executor(conn)
        assert catalog.describe(conn, TABLE).is_partitioned
        app.ahead_days = 62  # from now on some rows land in the DEFAULT partition (the conversion covered the rest)
        wait_for(lambda: conn.execute("SELECT count(*) >= 3 FROM events_default").fetchone() == (True,)
              or bool(app.errors), what="rows in the DEFAULT partition")
        settled("the conversion", "SELECT * FROM events")

        # 2. rotation: premake the coming months, moving the rows waiting in the DEFAULT partition into them (one
        #    transaction: DELETE from the DEFAULT partition, ATTACH, INSERT through the parent, which subscribers
        #    see as DELETE + INSERT of the root, applied together), detach those older than two months (plain
        #    DETACH: a DEFAULT partition rules out CONCURRENTLY), queued for archive
        today = datetime.now(timezone.utc).date()
        cfg = rotate.RotationSpec(conn_id=owner_db.conn_id, table=TABLE, premake=3, retention=2,
                                  lock_timeout="2s", lock_retries=10, detach_timeout="60s",
                                  archive_policy={"bucket": bucket.name, "prefix": "feed", "format": "parquet",
                                                  "drop": True})
        made = rotate.premake(ex, cfg, today)
        assert made.created and made.moved_rows > 0, made
        detached = rotate.detach_expired(ex, cfg, today).detached
        assert len(detached) >= 2, detached
        gone = [QualifiedName(*d.split(".", 1)) for d in detached]
        history = " UNION ALL ".join(f"SELECT * FROM {t.ident.as_string(conn)}" for t in gone)
        archived_rows = _rows(conn, history)
        assert len(archived_rows) > 500
        settled("the rotation", f"SELECT * FROM events UNION ALL {history}")

        # 3. archive: upload, verify, DROP each detached partition
        results = [archive.archive_queued(ex, s3, row.id) for row in archive.pending_queue(conn)]
        assert sorted(r["status"] for r in results) == ["dropped"] * len(gone), results
        assert not any(catalog.exists(conn, t) for t in gone)
        conn.execute("CREATE TEMPORARY TABLE warehouse_only AS SELECT * FROM events WHERE false")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO warehouse_only ({COLUMNS}) VALUES (%s, %s, %s, %s)", archived_rows)
        settled("the archive", "SELECT * FROM events UNION ALL SELECT * FROM warehouse_only")

        # 4. restore every archive as a partition again: the source holds the history again
        for r in results:
            manifest = archive.locate_manifest(s3, bucket.name, key=archive.manifest_key_for(r["key"]))
            assert archive.restore(ex, s3, manifest, target="attach")["status"] == "restored"
        assert all(catalog.exists(conn, TABLE.sibling(t.name)) for t in gone)
        assert sum(int(r["rows"]) for r in results) == len(archived_rows)
        settled("the restore", "SELECT * FROM events")
        # the application changes restored rows: an UPDATE, a move to a current partition, a DELETE (besides its
        # random writes, whose ids span the whole table)
        a, b, c = (row[0] for row in archived_rows[:3])
        conn.execute("UPDATE events SET v = 'after restore', n = n + 1 WHERE id = %s", (a,))
        conn.execute("UPDATE events SET created_at = now(), v = 'moved' WHERE id = %s", (b,))
        conn.execute("DELETE FROM events WHERE id = %s", (c,))
        after = app.done
        wait_for(lambda: app.done >= after + 75 or bool(app.errors), what="writes after the restore")
        settled("writes after the restore", "SELECT * FROM events")
    finally:
        app.stop_event.set()
        app.join(30)
        try:
            sub.execute("DROP SUBSCRIPTION IF EXISTS feed_sub")
        finally:
            sub.close()
            with subscriber.primary.connect(autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{sub_db}" WITH (FORCE)')
    assert not app.errors, app.errors


def _identities(conn: psycopg.Connection[Any], table: str) -> set[tuple[str, str, str | None]]:
    """(relation, relreplident, identity index) of the table and every partition of it."""
    return {(r[0], r[1], r[2]) for r in conn.execute(
        """SELECT c.relname, c.relreplident::text,
                  (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                   WHERE i.indrelid = c.oid AND i.indisreplident)
           FROM pg_partition_tree(%s::regclass) t JOIN pg_class c ON c.oid = t.relid""", (table,))}


def test_replica_identity_using_index_is_carried_to_the_parent_and_every_partition(
        owner_db, owner_conn, subscriber) -> None:
    """A table published with ``REPLICA IDENTITY USING INDEX`` on a unique (code, created_at) index, to a
    subscriber keyed by those columns. Before the fix the partitions kept their default identity (their primary
    key, id): UPDATEs and DELETEs reached the subscriber without code, which found no row and silently skipped
    them. After the conversion and a rotation, the parent and every partition (premade ones too) use their index
    on (code, created_at), and the subscriber's table equals the source."""
    conn = owner_conn
    conn.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, "
                 "code text NOT NULL DEFAULT md5(random()::text), v text, n integer NOT NULL DEFAULT 0)")
    conn.execute("CREATE UNIQUE INDEX orders_code_at ON orders (code, created_at)")
    conn.execute("ALTER TABLE orders REPLICA IDENTITY USING INDEX orders_code_at")
    conn.execute("INSERT INTO orders (created_at, code, v) SELECT now() - (g %% 90) * interval '1 day', "
                 "'c' || g, 's' FROM generate_series(1, %s) g", (2000,))
    conn.execute("CREATE PUBLICATION orders_feed FOR TABLE orders")
    sub_db = f"subi_{owner_db.name}"
    with subscriber.primary.connect(autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{sub_db}"')
    sub = subscriber.primary.connect(sub_db, autocommit=True)
    app = App(owner_db.dsn, rate=25, high=2000, table="orders")
    cols = "id, created_at, code, v, n"

    def same() -> None:
        app.pause()
        try:
            want = conn.execute(f"SELECT {cols} FROM orders ORDER BY code, created_at").fetchall()
            try:
                wait_for(lambda: sub.execute(f"SELECT {cols} FROM orders ORDER BY code, created_at").fetchall()
                      == want, what="the subscriber to equal the source")
            except AssertionError as exc:
                have = set(sub.execute(f"SELECT {cols} FROM orders").fetchall())
                raise AssertionError(f"{exc}: {len(have - set(want))} rows only on the subscriber, "
                                     f"{len(set(want) - have)} only on the source") from None
            assert _stats_errors(sub) == 0
        finally:
            app.resume()

    try:
        subscribe(sub, source=owner_db, publication="orders_feed", name="orders_sub",
                  create_table="CREATE TABLE orders (id bigint NOT NULL, created_at timestamptz NOT NULL, "
                               "code text NOT NULL, v text, n integer NOT NULL DEFAULT 0, "
                               "PRIMARY KEY (code, created_at))")
        app.start()
        spec = ConvertSpec.create("orders", "created_at", period="month")
        convert_all(conn, spec, capture=True, future=1, batch_size=1000)  # as the DAG: replay, verify gate, swap
        ex = Executor(conn)
        after = app.done
        wait_for(lambda: app.done >= after + 50 or bool(app.errors), what="writes after the swap")
        same()
        cfg = rotate.RotationSpec(conn_id=owner_db.conn_id, table=QualifiedName("public", "orders"), premake=3,
                                  lock_timeout="2s", lock_retries=10)
        assert rotate.premake(ex, cfg, datetime.now(timezone.utc).date()).created
        after = app.done
        wait_for(lambda: app.done >= after + 25 or bool(app.errors), what="writes after the rotation")
        same()
        identities = _identities(conn, "orders")
        parts = [name for name, _, _ in identities if name != "orders"]
        assert len(parts) >= 5, identities
        assert ("orders", "i", "orders_code_at") in identities, identities
        assert all(ident == "i" and index is not None for _, ident, index in identities), identities
    finally:
        app.stop_event.set()
        app.join(30)
        try:
            sub.execute("DROP SUBSCRIPTION IF EXISTS orders_sub")
        finally:
            sub.close()
            with subscriber.primary.connect(autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{sub_db}" WITH (FORCE)')
    assert not app.errors, app.errors
