"""Issue 15 part A: nothing lost under writes that never stop, whatever the key.

Each test reproduces one reported case on the engine (real PostgreSQL, real concurrent writers):
1 convergence under a steady writer, 2 composite keys, 3 rows outside every partition, 4/5 the capture default
and ids taken with nextval before the insert, 7 rollback after a schema change and unprep of an unknown table.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pg_partition.core import convert
from pg_partition.core.convert import capture, replay, verify
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import PartitionError, PreflightError, StateError
from pg_partition.core.db.execute import Executor
from tests.support.convert import convert_all, row_hash
from tests.support.writers import MirroredWriter
from tools.seed import seed_activities

TABLE = QualifiedName("public", "activities")


def _changelog_indexes(conn: psycopg.Connection[Any], table: QualifiedName) -> list[list[str]]:
    cl = capture.changelog_name(table)
    rows = conn.execute(
        """SELECT array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n)::text[]
           FROM pg_index i WHERE i.indrelid = %s::regclass""", (str(cl),)).fetchall()
    return [list(r[0]) for r in rows]


# --- case 1: convergence under sustained writes ----------------------------------------------------------------


def test_changelog_is_indexed_and_verify_reads_each_side_once(conn) -> None:
    seed_activities(conn, TABLE, rows=6_000, months=6)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    ex = Executor(conn)
    convert.preflight(conn, spec)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=2)
    assert capture.install(ex, spec.table, spec.intermediate)
    assert ["id"] in _changelog_indexes(conn, TABLE), "every lookup of the changelog by key needs an index"
    for item in convert.plan_fill(ex, spec, batch_size=2_000)["items"]:
        convert.fill(ex, spec, item)
    conn.execute("UPDATE activities SET parameters = 'x' WHERE id % 10 = 0")

    report = verify.verify(conn, spec.table, spec.intermediate)
    assert report.ok, report.summary()
    parts = len(catalog.describe(conn, spec.intermediate).partitions)
    assert parts >= 7 and len(report.partitions) == parts
    assert report.excluded_keys == 600
    # one read of the source and one of the destination in one snapshot, not one per partition
    assert report.source_scans == 1 and report.dest_scans == 1


def test_conversion_with_capture_finishes_under_a_steady_writer(db, conn) -> None:
    seed_activities(conn, TABLE, rows=20_000, months=6)
    conn.execute("CREATE TABLE truth AS SELECT * FROM activities")
    spec = ConvertSpec.create("activities", "created_at", period="month")
    ex = Executor(conn)
    convert.preflight(conn, spec)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=2)
    writer = MirroredWriter(db.dsn, rate=80, high=20_000)
    writer.start()
    try:
        decided = convert.install_capture(ex, spec)
        assert decided["capture"] and decided["created"]
        for item in convert.plan_fill(ex, spec, batch_size=2_000)["items"]:
            convert.fill(ex, spec, item)
        replay.replay(ex, spec.table, spec.intermediate, until_backlog_below=200)
        convert.build_indexes(ex, spec)
        convert.analyze(ex, spec)
        done_before = writer.done
        # the backlog grew during indexes/analyze; verify_conversion replays first, then compares once
        report = verify.verify_conversion(ex, spec)
        assert report.ok, report.summary()
        assert report.replayed is not None and report.replayed["keys"] > 0
        result = convert.finish_and_swap(ex, spec)
        assert result["replay_before"]["keys"] >= 0 and result["lock_ms"] > 0
        assert writer.done > done_before  # the writer never stopped
    finally:
        writer.stop_event.set()
        writer.join(30)
    assert not writer.errors, writer.errors
    assert catalog.describe(conn, TABLE).is_partitioned
    assert row_hash(conn, "activities") == row_hash(conn, "truth")


# --- case 2: any key ---------------------------------------------------------------------------------------------


def _composite(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE events (account_id bigint NOT NULL, id bigserial, created_at timestamptz NOT NULL, "
                 "v text, PRIMARY KEY (account_id, id))")
    conn.execute("INSERT INTO events (account_id, created_at, v) SELECT g % 10, now() - (g % 60) * interval '1 day', "
                 "g::text FROM generate_series(1, 1000) g")


def _composite_hash(conn: psycopg.Connection[Any], table: str) -> tuple[int, str]:
    row = conn.execute(sql.SQL("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY account_id, id)) FROM {} t"
                               ).format(sql.Identifier(table))).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def test_composite_key_append_only_is_refused_with_why_and_what_to_do(conn) -> None:
    _composite(conn)
    spec = ConvertSpec.create("events", "created_at", period="month")
    with pytest.raises(PreflightError) as err:
        convert.decide_capture(conn, spec, "off")
    assert "(account_id, id)" in str(err.value) and "capture_changes" in (err.value.fix or "")
    ex = Executor(conn)
    convert.preflight(conn, spec)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    for item in convert.plan_fill(ex, spec)["items"]:
        convert.fill(ex, spec, item)
    conn.execute("INSERT INTO events (account_id, created_at, v) VALUES (3, now(), 'late')")
    with pytest.raises(PreflightError):  # the engine refuses too when called without the DAG's decision
        convert.catch_up(ex, spec)


def test_composite_key_with_capture_loses_nothing(conn) -> None:
    _composite(conn)
    spec = ConvertSpec.create("events", "created_at", period="month")
    ex = Executor(conn)
    convert.preflight(conn, spec)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    assert convert.install_capture(ex, spec)["capture"]  # the default
    assert ["account_id", "id"] in _changelog_indexes(conn, QualifiedName("public", "events"))
    for item in convert.plan_fill(ex, spec)["items"]:
        convert.fill(ex, spec, item)
    conn.execute("INSERT INTO events (account_id, created_at, v) VALUES (3, now(), 'late')")
    conn.execute("UPDATE events SET v = 'changed' WHERE account_id = 4 AND id = 4")
    conn.execute("DELETE FROM events WHERE account_id = 5 AND id = 5")
    expected = _composite_hash(conn, "events")
    report = verify.verify_conversion(ex, spec)
    assert report.ok, report.summary()
    convert.finish_and_swap(ex, spec)
    assert _composite_hash(conn, "events") == expected
    assert expected[0] == 1000


def test_full_catch_up_matches_the_whole_composite_key(conn) -> None:
    """The anti-join itself (used by unswap and full catch-up) compares every key column."""
    _composite(conn)
    conn.execute("CREATE TABLE events_copy (LIKE events INCLUDING ALL)")
    conn.execute("INSERT INTO events_copy SELECT * FROM events")
    conn.execute("INSERT INTO events (account_id, created_at, v) VALUES (3, now(), 'late')")
    from pg_partition.core.convert.catchup import copy_missing
    plan = {"key": "account_id", "key_columns": ["account_id", "id"], "kind": "timestamp with time zone", "covered": [],
            "has_default": True, "column": "created_at", "where": None}
    out = copy_missing(Executor(conn), plan, QualifiedName("public", "events"), QualifiedName("public", "events_copy"),
                       low=-1, live=False)
    assert out["rows"] == 1
    assert _composite_hash(conn, "events") == _composite_hash(conn, "events_copy")


# --- case 3: no row left behind -----------------------------------------------------------------------------------


def _filled(conn: psycopg.Connection[Any], spec: ConvertSpec) -> Executor:
    ex = Executor(conn)
    convert.preflight(conn, spec)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    for item in convert.plan_fill(ex, spec)["items"]:
        convert.fill(ex, spec, item)
    return ex


def test_swap_refuses_rows_outside_every_partition_append_only(conn) -> None:
    seed_activities(conn, TABLE, rows=2_000, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    ex = _filled(conn, spec)
    conn.execute("INSERT INTO activities (created_at, updated_at) VALUES (now() + interval '2 years', now())")
    before = row_hash(conn, "activities")
    with pytest.raises(PartitionError) as err:
        convert.finish_and_swap(ex, spec)
    text = str(err.value)
    assert "1 row" in text and "outside every partition" in text
    assert "add_partitions" in (err.value.fix or "")
    assert not catalog.describe(conn, TABLE).is_partitioned  # nothing swapped
    assert row_hash(conn, "activities") == before
    # the fix works: cover the row, then the swap goes through and keeps every row
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    convert.finish_and_swap(ex, spec)
    assert catalog.describe(conn, TABLE).is_partitioned
    assert row_hash(conn, "activities") == before


def test_a_default_partition_takes_rows_outside_the_ranges(conn) -> None:
    seed_activities(conn, TABLE, rows=2_000, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at", period="month", default_partition=True)
    ex = _filled(conn, spec)
    conn.execute("INSERT INTO activities (created_at, updated_at) VALUES (now() + interval '2 years', now())")
    before = row_hash(conn, "activities")
    convert.finish_and_swap(ex, spec)
    assert row_hash(conn, "activities") == before


def test_verify_conversion_runs_append_only_too(conn) -> None:
    seed_activities(conn, TABLE, rows=2_000, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    ex = _filled(conn, spec)
    conn.execute("INSERT INTO activities (created_at, updated_at) VALUES (now(), now())")
    report = verify.verify_conversion(ex, spec)  # catch-up first, then compare
    assert report.ok, report.summary()
    conn.execute("DELETE FROM activities_intermediate WHERE id = 5")  # a lost row is caught in this mode as well
    report = verify.verify_conversion(ex, spec)
    assert not report.ok and report.mismatches


# --- cases 4 and 5: the capture default; ids taken before the insert -------------------------------------------


def test_capture_is_on_by_default_even_after_a_statistics_reset(conn) -> None:
    seed_activities(conn, TABLE, rows=500, timestamptz=True)
    conn.execute("UPDATE activities SET key = 'x' WHERE id = 1")
    conn.execute("SELECT pg_stat_reset()")
    spec = ConvertSpec.create("activities", "created_at", period="month")
    decided = convert.decide_capture(conn, spec, "auto")
    assert decided["capture"] is True, decided["reason"]
    assert "pg_stat" not in decided["reason"]


def test_append_only_is_an_explicit_opt_in_that_states_its_limitation(conn, caplog) -> None:
    seed_activities(conn, TABLE, rows=500, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    decided = convert.decide_capture(conn, spec, "off")
    assert decided["capture"] is False
    assert "pgslice" in decided["reason"] and "UPDATE" in decided["reason"] and "nextval" in decided["reason"]
    with caplog.at_level(logging.WARNING, logger="pg_partition"):
        assert convert.install_capture(Executor(conn), spec, "off")["capture"] is False
    assert any(r.levelno == logging.WARNING and "nextval" in r.getMessage() for r in caplog.records)


def test_id_taken_with_nextval_before_the_insert_is_not_lost_by_default(db, conn) -> None:
    seed_activities(conn, TABLE, rows=2_000, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    ex = Executor(conn)
    convert.preflight(conn, spec)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    orm = psycopg.connect(db.dsn, autocommit=True)
    try:
        early_id = orm.execute("SELECT nextval('activities_id_seq')").fetchone()[0]  # the ORM reserves an id
        assert convert.install_capture(ex, spec)["capture"]
        for item in convert.plan_fill(ex, spec)["items"]:
            convert.fill(ex, spec, item)
        orm.execute("INSERT INTO activities (id, created_at, updated_at) VALUES (%s, now(), now())", (early_id,))
    finally:
        orm.close()
    before = row_hash(conn, "activities")
    convert.finish_and_swap(ex, spec)
    assert row_hash(conn, "activities") == before
    assert conn.execute("SELECT count(*) FROM activities WHERE id = %s", (early_id,)).fetchone()[0] == 1


# --- case 7: rollback after a schema change ---------------------------------------------------------------------


def test_unswap_after_a_column_is_added_and_one_dropped(conn) -> None:
    seed_activities(conn, TABLE, rows=2_000, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    convert_all(conn, spec)
    conn.execute('ALTER TABLE activities ADD COLUMN "updatedAt" text')
    conn.execute("ALTER TABLE activities DROP COLUMN parameters")
    conn.execute("""INSERT INTO activities (key, created_at, updated_at, "updatedAt")
                    SELECT 'after', now(), now(), 'x' FROM generate_series(1, 5)""")
    result = convert.unswap(Executor(conn), spec)
    assert result["copied_back_rows"] == 5
    assert result["columns_not_copied_back"] == ["updatedAt"]
    assert result["columns_left_null"] == ["parameters"]
    assert not catalog.describe(conn, TABLE).is_partitioned
    assert conn.execute("SELECT count(*), count(*) FILTER (WHERE key = 'after' AND parameters IS NULL) "
                        "FROM activities").fetchone() == (2_005, 5)


def test_unprep_of_a_table_not_being_converted_is_a_clear_error(conn) -> None:
    ex = Executor(conn)
    with pytest.raises(StateError) as err:
        convert.unprep(ex, ConvertSpec.create("nosuch", "created_at"))
    assert "not being converted" in str(err.value)
    seed_activities(conn, TABLE, rows=10, timestamptz=True)
    with pytest.raises(StateError):
        convert.unprep(ex, ConvertSpec.create("activities", "created_at"))
    assert catalog.exists(conn, TABLE)


def test_unswap_refuses_when_a_not_null_column_has_no_value_to_copy_back(conn) -> None:
    seed_activities(conn, TABLE, rows=500, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    convert_all(conn, spec)
    conn.execute("ALTER TABLE activities DROP COLUMN updated_at")
    conn.execute("INSERT INTO activities (created_at) VALUES (now())")
    with pytest.raises(StateError) as err:
        convert.unswap(Executor(conn), spec)
    assert "updated_at" in str(err.value)
    assert catalog.describe(conn, TABLE).is_partitioned  # nothing changed


def test_the_retired_table_is_not_queued_for_archiving_while_it_holds_a_row_the_new_table_cannot(conn) -> None:
    from pg_partition.core import archive

    seed_activities(conn, TABLE, rows=1_000, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    convert_all(conn, spec)
    # a row only the retired table holds (what a swap that did not refuse left behind)
    conn.execute("INSERT INTO activities_retired (id, created_at, updated_at) VALUES (-1, now() + interval '2 years', "
                 "now())")
    with pytest.raises(StateError, match="1 row"):
        archive.enqueue_retired(conn, TABLE)
    conn.execute("DELETE FROM activities_retired WHERE id = -1")
    assert archive.enqueue_retired(conn, TABLE) is not None


KEY_SHAPES = {
    "integer": "id serial PRIMARY KEY, created_at timestamptz NOT NULL, v text",
    "bigint": "id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, created_at timestamptz NOT NULL, v text",
    "composite int+bigint": "tenant integer NOT NULL, id bigserial, created_at timestamptz NOT NULL, v text, "
                            "PRIMARY KEY (tenant, id)",
    "composite with text": "id bigserial, code text NOT NULL, created_at timestamptz NOT NULL, v text, "
                           "PRIMARY KEY (id, code)",
}


@pytest.mark.parametrize("shape", sorted(KEY_SHAPES))
def test_every_key_shape_converts_with_capture_and_loses_nothing(conn, shape: str) -> None:
    conn.execute(f"CREATE TABLE shapes ({KEY_SHAPES[shape]})")
    cols = {r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'shapes'::regclass "
                                       "AND attnum > 0").fetchall()}
    extra = ", tenant" if "tenant" in cols else ", code" if "code" in cols else ""
    vals = ", g % 7" if "tenant" in cols else ", 'c' || (g % 3)" if "code" in cols else ""
    conn.execute(f"INSERT INTO shapes (created_at, v{extra}) SELECT now() - (g % 90) * interval '1 day', 's'{vals} "
                 "FROM generate_series(1, 900) g")
    spec = ConvertSpec.create("shapes", "created_at", period="month")
    ex = Executor(conn)
    convert.preflight(conn, spec)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    assert convert.install_capture(ex, spec)["capture"]
    for item in convert.plan_fill(ex, spec, batch_size=200)["items"]:
        convert.fill(ex, spec, item)
    conn.execute(f"INSERT INTO shapes (created_at, v{extra}) SELECT now(), 'late'{vals} FROM generate_series(1, 5) g")
    conn.execute("UPDATE shapes SET v = 'changed' WHERE id % 50 = 0")
    conn.execute("DELETE FROM shapes WHERE id % 77 = 0")
    expected = conn.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM shapes t"
                            ).fetchone()
    assert verify.verify_conversion(ex, spec).ok
    convert.finish_and_swap(ex, spec)
    assert catalog.describe(conn, QualifiedName("public", "shapes")).is_partitioned
    assert conn.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM shapes t"
                        ).fetchone() == expected


@pytest.mark.parametrize("ddl", ["id uuid PRIMARY KEY DEFAULT gen_random_uuid(), created_at timestamptz NOT NULL",
                                 "code text, n bigint, created_at timestamptz NOT NULL, PRIMARY KEY (code, n)"])
def test_a_key_that_cannot_be_copied_in_ranges_is_refused_with_why_and_what_to_do(conn, ddl: str) -> None:
    conn.execute(f"CREATE TABLE shapes ({ddl})")
    with pytest.raises(PreflightError) as err:
        convert.preflight(conn, ConvertSpec.create("shapes", "created_at"))
    assert "only integer keys can be copied in ranges" in str(err.value)
    assert "integer surrogate key" in str(err.value) or "integer surrogate key" in (err.value.fix or "")
