"""Change capture: what the triggers record, install/uninstall (idempotent, dry run, refusals), replay semantics."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg import sql

from pg_partition.core.convert import capture, replay
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import (
    InvalidInputError,
    LockTimeoutExhausted,
    PartitionError,
    PreflightError,
    StateError,
)
from pg_partition.core.db.execute import Executor
from tests.support.capture import changelog_keys, fill, make_intermediate, row_hash
from tools.seed import seed_activities

SRC = QualifiedName("public", "activities")


def _objects(conn: psycopg.Connection) -> dict[str, object]:
    """Everything capture could have created, to assert 'nothing changed'."""
    return {
        "tables": sorted(r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relkind IN ('r', 'p') AND relnamespace = 'public'::regnamespace")),
        "triggers": sorted(r[0] for r in conn.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")),
        "functions": sorted(r[0] for r in conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")),
    }


@pytest.fixture
def prepared(conn):
    seed_activities(conn, SRC, rows=3000, months=6, indexes=False)
    dest = make_intermediate(conn, SRC)
    return dest


def test_install_records_every_kind_of_change(conn, prepared) -> None:
    dest = prepared
    assert not capture.is_installed(conn, SRC)
    assert capture.install(Executor(conn), SRC, dest) is True
    assert capture.is_installed(conn, SRC)
    trig = sorted(r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.activities'::regclass AND NOT tgisinternal"))
    assert trig == sorted(capture.TRIGGERS.values())
    assert all(t.startswith("pg_partition_capture") for t in trig)
    # ENABLE ALWAYS: they fire even for replication apply / session_replication_role = replica
    assert {r[0] for r in conn.execute(
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'public.activities'::regclass AND NOT tgisinternal")} == {"A"}
    assert capture.install(Executor(conn), SRC, dest) is False  # idempotent

    conn.execute("INSERT INTO activities (key, created_at, updated_at) VALUES ('x', now(), now())")
    new_id = conn.execute("SELECT max(id) FROM activities").fetchone()[0]
    conn.execute("UPDATE activities SET key = 'u' WHERE id = 10")
    conn.execute("UPDATE activities SET created_at = created_at - interval '40 days' WHERE id = 20")
    conn.execute("DELETE FROM activities WHERE id = 30")
    conn.execute("UPDATE activities SET id = 900000 WHERE id = 40")  # key change: old and new key
    conn.execute("UPDATE activities SET owner_id = 0 WHERE id BETWEEN 100 AND 104")  # one statement, 5 rows
    conn.execute("UPDATE activities SET key = 'none' WHERE id = -1")  # touches nothing: records nothing
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("UPDATE activities SET key = 'r' WHERE id = 50")
    with conn.transaction():
        conn.execute("UPDATE activities SET key = 'rolled back' WHERE id = 60")
        raise psycopg.Rollback()  # an aborted writer leaves no entry
    assert changelog_keys(conn, SRC) == sorted([new_id, 10, 20, 30, 40, 900000, 100, 101, 102, 103, 104, 50])
    assert capture.backlog(conn, SRC) == 12

    with pytest.raises(psycopg.errors.RaiseException, match=r"TRUNCATE of public\.activities is refused"):
        conn.execute("TRUNCATE activities")
    assert conn.execute("SELECT count(*) FROM activities").fetchone()[0] > 0

    # application roles need no privilege on the changelog (SECURITY DEFINER function)
    conn.execute("CREATE ROLE app_writer LOGIN")
    conn.execute("GRANT INSERT, UPDATE, DELETE, SELECT ON activities TO app_writer")
    conn.execute("GRANT USAGE ON SEQUENCE activities_id_seq TO app_writer")
    with conn.transaction():
        conn.execute("SET LOCAL ROLE app_writer")
        conn.execute("UPDATE activities SET key = 'app' WHERE id = 70")
    assert 70 in changelog_keys(conn, SRC)
    # nothing in the SECURITY DEFINER function depends on the caller's search_path
    conn.execute("CREATE SCHEMA evil")
    conn.execute("CREATE TABLE evil.activities_changelog (id bigint)")
    with conn.transaction():
        conn.execute("SET LOCAL search_path = evil, pg_temp")
        conn.execute("UPDATE public.activities SET key = 'path' WHERE id = 80")
    assert 80 in changelog_keys(conn, SRC)
    assert conn.execute("SELECT count(*) FROM evil.activities_changelog").fetchone() == (0,)
    conn.execute("DROP SCHEMA evil CASCADE")

    assert capture.uninstall(Executor(conn), SRC) is True
    assert not capture.is_installed(conn, SRC)
    assert capture.status(conn, SRC) == {"table": "public.activities", "triggers": [], "changelog": None,
                                         "function": None, "installed": False, "backlog": 0,
                                         "publications_including_changelog": []}
    assert capture.uninstall(Executor(conn), SRC) is False
    conn.execute("DROP OWNED BY app_writer")
    conn.execute("DROP ROLE app_writer")


def test_dry_run_changes_nothing(conn, prepared) -> None:
    before = _objects(conn)
    ex = Executor(conn, dry_run=True)
    assert capture.install(ex, SRC, prepared) is True
    assert _objects(conn) == before
    text = "\n".join(ex.statements)
    assert "CREATE TRIGGER \"pg_partition_capture_update\" AFTER UPDATE ON \"public\".\"activities\" REFERENCING OLD " \
           "TABLE AS \"pg_partition_old\" NEW TABLE AS \"pg_partition_new\" FOR EACH STATEMENT" in text
    assert "LOCK TABLE \"public\".\"activities\" IN SHARE ROW EXCLUSIVE MODE" in text
    capture.install(Executor(conn), SRC, prepared)
    conn.execute("UPDATE activities SET key = 'u' WHERE id = 10")
    installed = _objects(conn)
    dry = Executor(conn, dry_run=True)
    stats = replay.replay(dry, SRC, prepared)
    assert stats.stopped_because == "dry run" and stats.backlog == 1
    assert replay.finish_in_swap(dry, SRC, prepared) == 1
    assert capture.uninstall(dry, SRC) is True
    assert _objects(conn) == installed and capture.backlog(conn, SRC) == 1
    assert any(s.startswith("DROP TABLE") for s in dry.statements)


def test_install_refusals_change_nothing(conn, prepared) -> None:
    conn.execute("CREATE TABLE nokey (id bigint, created_at timestamp)")
    conn.execute("INSERT INTO nokey VALUES (1, now())")
    before = _objects(conn)
    with pytest.raises(PreflightError, match="no primary key"):
        capture.install(Executor(conn), QualifiedName("public", "nokey"), prepared)
    with pytest.raises(InvalidInputError, match="does not exist"):
        capture.install(Executor(conn), SRC, QualifiedName("public", "nope_intermediate"))
    with pytest.raises(InvalidInputError, match="does not exist"):
        capture.install(Executor(conn), QualifiedName("public", "nope"), prepared)
    conn.execute("CREATE TABLE activities_changelog (note text)")
    before = _objects(conn)
    with pytest.raises(StateError, match="was not created by pg_partition"):
        capture.install(Executor(conn), SRC, prepared)
    assert _objects(conn) == before
    with pytest.raises(StateError):
        replay.replay(conn, SRC, prepared)  # not installed


def test_install_waits_for_writes_in_flight(db, conn, prepared) -> None:
    """An open writing transaction blocks the install (bounded by lock_timeout, retried); once it commits the
    install goes through, and the fill that follows sees that write."""
    before = _objects(conn)
    with db.connect(autocommit=False) as writer:
        writer.execute("UPDATE activities SET key = 'in flight' WHERE id = 5")
        with pytest.raises(LockTimeoutExhausted, match="install change capture"):
            capture.install(Executor(conn), SRC, prepared, lock_timeout="100ms", retries=2)
        assert _objects(conn) == before

        done: list[bool] = []
        t = threading.Thread(target=lambda: done.append(
            capture.install(Executor(psycopg.connect(db.dsn, autocommit=True)), SRC, prepared,
                            lock_timeout="60s", retries=1)))
        t.start()
        # the install is waiting for our lock: visible in pg_locks as an ungranted request
        while not conn.execute("SELECT count(*) FROM pg_locks WHERE relation = 'public.activities'::regclass "
                               "AND NOT granted").fetchone()[0]:
            time.sleep(0.05)
        assert not done
        writer.commit()
        t.join()
    assert done == [True]
    assert capture.backlog(conn, SRC) == 0  # committed before capture: the fill will copy it
    conn.execute("UPDATE activities SET key = 'after' WHERE id = 5")
    assert changelog_keys(conn, SRC) == [5]


def test_replay_applies_keys_and_is_idempotent(conn, prepared) -> None:
    dest = prepared
    capture.install(Executor(conn), SRC, dest)
    fill(conn, SRC, dest, batch=700)
    conn.execute("UPDATE activities SET key = 'u' WHERE id IN (1, 2, 3)")
    conn.execute("UPDATE activities SET created_at = created_at + interval '45 days' WHERE id = 4")  # moves
    conn.execute("DELETE FROM activities WHERE id IN (5, 6)")
    conn.execute("UPDATE activities SET id = 700000 WHERE id = 7")
    conn.execute("INSERT INTO activities (id, key, created_at, updated_at) VALUES (8000, 'new', now(), now())")
    for _ in range(5):
        conn.execute("UPDATE activities SET owner_id = owner_id + 1 WHERE id = 9")  # hot key: 5 entries
    assert row_hash(conn, SRC) != row_hash(conn, dest)

    stats = replay.replay(conn, SRC, dest, batch_size=4, until_backlog_below=1)
    assert capture.backlog(conn, SRC) == 0
    # entries in commit order: [1 2 3 4] [5 6 7 700000] [8000 9 9 9] [9 9]: duplicates collapse within a batch
    assert (stats.entries, stats.batches, stats.keys) == (14, 4, 11)
    assert (stats.deleted, stats.inserted) == (9, 8)  # 700000/8000 were not in dest; 5, 6, 7 not in source
    assert row_hash(conn, SRC) == row_hash(conn, dest)
    part_of_4 = conn.execute("SELECT tableoid::regclass::text FROM activities_intermediate WHERE id = 4").fetchone()
    src_month = conn.execute("SELECT to_char(created_at, 'YYYYMM') FROM activities WHERE id = 4").fetchone()
    assert part_of_4[0] == f"activities_intermediate_{src_month[0]}"

    snapshot = row_hash(conn, dest)
    again = replay.replay(conn, SRC, dest)
    assert again.entries == 0 and row_hash(conn, dest) == snapshot
    # every key replayed once more (as if a killed batch had applied them before dying): same result
    conn.execute("INSERT INTO activities_changelog SELECT id FROM activities WHERE id < 50 "
                 "UNION ALL SELECT x FROM generate_series(1, 10) x")
    replay.replay(conn, SRC, dest, batch_size=7)
    assert row_hash(conn, dest) == snapshot == row_hash(conn, SRC)


def test_replay_refuses_rows_outside_partitions_and_keeps_them(conn, prepared) -> None:
    dest = prepared
    capture.install(Executor(conn), SRC, dest)
    fill(conn, SRC, dest)
    conn.execute("UPDATE activities SET created_at = '2999-01-01' WHERE id = 11")
    conn.execute("UPDATE activities SET key = 'fine' WHERE id = 12")
    with pytest.raises(PartitionError, match="fits no partition") as err:
        replay.replay(conn, SRC, dest, batch_size=100)
    assert "add the partitions" in str(err.value)
    assert sorted(changelog_keys(conn, SRC)) == [11, 12]  # the failed batch rolled back: nothing lost


def test_composite_key_and_identity_always(conn) -> None:
    """A primary key of two columns and an identity ALWAYS column (INSERT needs OVERRIDING SYSTEM VALUE)."""
    src = QualifiedName("Sales", "Order Lines")
    conn.execute('CREATE SCHEMA "Sales"')
    conn.execute('CREATE TABLE "Sales"."Order Lines" (tenant int, n bigint GENERATED ALWAYS AS IDENTITY, '
                 'at date NOT NULL, qty int, total numeric GENERATED ALWAYS AS (qty * 2) STORED, '
                 'PRIMARY KEY (tenant, n))')
    conn.execute('INSERT INTO "Sales"."Order Lines" (tenant, at, qty) '
                 "SELECT g % 3, date '2024-01-01' + (g % 90), g FROM generate_series(1, 500) g")
    dest = src.sibling("Order Lines_intermediate")
    conn.execute('CREATE TABLE "Sales"."Order Lines_intermediate" (tenant int, n bigint GENERATED ALWAYS AS '
                 'IDENTITY, at date NOT NULL, qty int, total numeric GENERATED ALWAYS AS (qty * 2) STORED) '
                 'PARTITION BY RANGE (at)')
    for lo, hi in (("2024-01-01", "2024-02-01"), ("2024-02-01", "2024-03-01"), ("2024-03-01", "2024-05-01")):
        conn.execute(sql.SQL('CREATE TABLE {} PARTITION OF "Sales"."Order Lines_intermediate" '
                             "FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier("Sales", f"ol_{lo}"), sql.Literal(lo), sql.Literal(hi)))
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (tenant, n)").format(sql.Identifier("Sales", f"ol_{lo}")))
    capture.install(Executor(conn), src, dest)
    conn.execute('INSERT INTO "Sales"."Order Lines_intermediate" OVERRIDING SYSTEM VALUE '
                 'SELECT tenant, n, at, qty FROM "Sales"."Order Lines"')
    conn.execute('UPDATE "Sales"."Order Lines" SET qty = qty + 1 WHERE n % 7 = 0')
    conn.execute('UPDATE "Sales"."Order Lines" SET tenant = 9 WHERE n = 10')  # key change (first column)
    conn.execute('UPDATE "Sales"."Order Lines" SET at = at + 40 WHERE n = 11')  # partition change
    conn.execute('DELETE FROM "Sales"."Order Lines" WHERE n % 11 = 0')
    conn.execute('INSERT INTO "Sales"."Order Lines" (tenant, at, qty) VALUES (1, \'2024-03-03\', 5)')
    stats = replay.replay(conn, src, dest, batch_size=10)
    assert stats.keys > 50 and capture.backlog(conn, src) == 0
    a, b = same_columns_hash_any(conn, src, dest)
    assert a == b
    assert catalog.exists(conn, capture.changelog_name(src))
    assert capture.uninstall(Executor(conn), src)
    assert not catalog.exists(conn, capture.changelog_name(src))


def same_columns_hash_any(conn, a: QualifiedName, b: QualifiedName) -> tuple[object, object]:
    out = []
    for t in (a, b):
        out.append(conn.execute(sql.SQL(
            "SELECT count(*), md5(string_agg(md5(ROW(tenant, n, at, qty, total)::text), '' ORDER BY tenant, n)) "
            "FROM {}").format(t.ident)).fetchone())
    return out[0], out[1]



def test_warns_when_a_publication_would_publish_the_changelog(conn, prepared, caplog) -> None:
    conn.execute("CREATE PUBLICATION feed_all FOR ALL TABLES")
    conn.execute("CREATE PUBLICATION feed_one FOR TABLE activities")
    try:
        capture.install(Executor(conn), SRC, prepared)
        assert capture.publishing_changelog(conn, SRC) == ["feed_all"]
        assert capture.status(conn, SRC)["publications_including_changelog"] == ["feed_all"]
        assert "publication feed_all publishes every table" in caplog.text
    finally:
        conn.execute("DROP PUBLICATION feed_all")
        conn.execute("DROP PUBLICATION feed_one")
