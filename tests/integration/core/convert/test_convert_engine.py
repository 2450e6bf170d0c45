"""The conversion engine end to end on real PostgreSQL: every row arrives once, everything is mirrored, names,
sequences, identity, publications and grants end up where the application expects them."""

from __future__ import annotations

import logging

import psycopg
import pytest

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from tests.support.convert import convert_all, row_hash, snapshot
from tools.seed import INDEXES, seed_activities

ROWS = 30_000


def _index_names(conn: psycopg.Connection, table: str) -> set[str]:
    info = catalog.describe(conn, QualifiedName.parse(table))
    return {i.name for i in info.indexes}


def test_full_conversion_timestamptz_with_public_activity_indexes(db, conn) -> None:
    seed_activities(conn, "public.activities", rows=ROWS, timestamptz=True)
    source_indexes = _index_names(conn, "activities")
    assert len(source_indexes) == 1 + len(INDEXES)
    before = row_hash(conn, "activities")
    spec = ConvertSpec.create("public.activities", "created_at", period="month")

    with db.connect() as listener:
        listener.execute("LISTEN pg_partition")
        result = convert_all(conn, spec)
        notes = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert notes == ["public.activities"]

    info = catalog.describe(conn, QualifiedName("public", "activities"))
    assert info.is_partitioned and info.partition_key == "RANGE (created_at)"
    assert row_hash(conn, "activities") == before == row_hash(conn, "activities_retired")
    # every non-key index is back under its original name on the partitioned parent; the source's carry _retired
    assert _index_names(conn, "activities") == source_indexes - {"activities_pkey"}
    mapping = result["prep"]["indexes"]
    assert _index_names(conn, "activities_retired") == {"activities_pkey"} | {
        m["retired"] for m in mapping if m["on_parent"]}
    assert "index_activities_on_created_at_retired" in _index_names(conn, "activities_retired")
    assert all(i.is_valid for i in info.indexes)
    # per_partition keys: every partition has its own primary key on id
    first = next(p for p in info.partitions if not p.is_default)
    assert catalog.describe(conn, first.name).primary_key.columns == ("id",)
    # the serial sequence now belongs to the new table and keeps counting
    assert info.sequences == {"id": QualifiedName("public", "activities_id_seq")}
    new_id = conn.execute("INSERT INTO activities (created_at, updated_at) VALUES (now(), now()) RETURNING id"
                          ).fetchone()[0]
    assert new_id > before[0]
    assert result["plan"]["strategy"] == "partition"
    assert result["plan"]["outside_rows"] == 0
    assert result["swap"]["lock_ms"] > 0
    rep = result["report"]
    assert rep["swapped"] and rep["before"]["rows"] == ROWS and rep["after"]["rows"] == ROWS
    assert sum(p["rows"] for p in rep["after"]["partitions"]) == ROWS
    assert "swap" in rep["timings"] and "prep" in rep["timings"]
    assert "partitions" in convert.format_report(rep)
    assert rep["after"]["rows_exact"] and "~" not in convert.format_report(rep)
    # above exact_below the counts come from the statistics (fresh after the conversion's ANALYZE), marked so
    est = convert.report(conn, spec, exact_below=1)
    assert est["before"]["rows_exact"] is False and est["after"]["rows_exact"] is False
    assert abs(est["after"]["rows"] - ROWS) <= ROWS // 10
    assert f"~{est['after']['rows']:,} rows (estimated)" in convert.format_report(est)


def test_composite_key_timestamp_column_deferred_indexes(conn) -> None:
    seed_activities(conn, "public.activities", rows=ROWS, timestamptz=False)
    before = row_hash(conn, "activities")
    spec = ConvertSpec.create("activities", "created_at", period="quarter", primary_key="composite",
                              defer_indexes=True)
    result = convert_all(conn, spec)
    assert {t["index"] for t in result["indexes"]["indexes"]} == {
        m["temp"] for m in result["prep"]["indexes"] if m["deferred"]}
    info = catalog.describe(conn, QualifiedName("public", "activities"))
    assert info.primary_key is not None and info.primary_key.name == "activities_pkey"
    assert info.primary_key.columns == ("id", "created_at")
    assert all(i.is_valid for i in info.indexes)
    assert {i.name for i in info.indexes} == {m["source"] for m in result["prep"]["indexes"]}
    assert row_hash(conn, "activities") == before
    # quarter partitions, bounds at midnight
    assert all(p.range_from.endswith("00:00:00") for p in info.partitions)
    assert {p.start_day.month for p in info.partitions} <= {1, 4, 7, 10}


def test_identity_table_in_mixed_case_schema_with_chicago_session(db) -> None:
    with db.connect() as conn:
        conn.execute("SET TimeZone = 'America/Chicago'")
        name = QualifiedName("Sales Data", "Activity Log")
        seed_activities(conn, name, rows=ROWS, timestamptz=True, identity=True)
        conn.execute('ALTER TABLE "Sales Data"."Activity Log" ALTER COLUMN id SET GENERATED ALWAYS')
        before = row_hash(conn, name)
        old_max = before[0]
        spec = ConvertSpec.create('"Sales Data"."Activity Log"', "created_at", period="month")
        convert_all(conn, spec)
        assert row_hash(conn, name) == before
        info = catalog.describe(conn, name)
        # its own identity, restarted past the old maximum, under the original sequence name
        assert info.column("id").identity == "a"
        assert info.sequences["id"] == QualifiedName("Sales Data", "Activity Log_id_seq")
        new_id = conn.execute('INSERT INTO "Sales Data"."Activity Log" (created_at, updated_at) '
                              "VALUES (now(), now()) RETURNING id").fetchone()[0]
        assert new_id == old_max + 1
        retired = catalog.describe(conn, spec.retired)
        assert retired.sequences["id"] != info.sequences["id"]
        # partition bounds are UTC midnights whatever the session's time zone
        with db.connect() as utc:
            utc.execute("SET TimeZone = 'UTC'")
            parts = catalog.describe(utc, name).partitions
            assert all(p.range_from.endswith("00:00:00+00") for p in parts)
        # every row sits in the partition of its UTC month
        assert conn.execute(
            """SELECT count(*) FROM "Sales Data"."Activity Log" a JOIN pg_class c ON c.oid = a.tableoid
               WHERE to_char(a.created_at AT TIME ZONE 'UTC', 'YYYYMM') <> right(c.relname, 6)""").fetchone()[0] == 0


def test_prep_mirrors_columns_constraints_fk_owner_grants_publication(conn) -> None:
    conn.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'conv_owner') THEN "
                 "CREATE ROLE conv_owner NOLOGIN; END IF; IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE "
                 "rolname = 'conv_reader') THEN CREATE ROLE conv_reader NOLOGIN; END IF; END $$")
    conn.execute("CREATE TABLE accounts (id bigint PRIMARY KEY)")
    conn.execute("INSERT INTO accounts SELECT g FROM generate_series(1, 10) g")
    conn.execute(
        """CREATE TABLE events (
             id bigserial PRIMARY KEY,
             account_id bigint NOT NULL DEFAULT 1 REFERENCES accounts ON DELETE CASCADE,
             at timestamptz NOT NULL DEFAULT now(),
             body text COMPRESSION pglz,
             score int CHECK (score >= 0),
             body_len int GENERATED ALWAYS AS (length(body)) STORED,
             CONSTRAINT events_account_at UNIQUE (account_id, at))""")
    conn.execute("ALTER TABLE events ALTER COLUMN body SET STORAGE MAIN")
    conn.execute("ALTER TABLE events ALTER COLUMN score SET STATISTICS 555")
    conn.execute("COMMENT ON TABLE events IS 'the event log'")
    conn.execute("COMMENT ON COLUMN events.body IS 'payload'")
    conn.execute("CREATE INDEX events_lower_body ON events (lower(body)) WHERE score > 10")
    conn.execute("GRANT SELECT, INSERT ON events TO conv_reader")
    conn.execute("ALTER TABLE events OWNER TO conv_owner")
    conn.execute("CREATE PUBLICATION events_pub FOR TABLE events WHERE (id > 1)")
    conn.execute("""INSERT INTO events (account_id, at, body, score)
                    SELECT 1 + g % 10, '2024-01-01'::timestamptz + g * interval '37 minutes', md5(g::text), g % 50
                    FROM generate_series(1, 5000) g""")
    before = row_hash(conn, "events")
    spec = ConvertSpec.create("events", "at", period="month", primary_key="composite")
    convert_all(conn, spec)
    assert row_hash(conn, "events") == before

    info = catalog.describe(conn, QualifiedName("public", "events"))
    cols = {c.name: c for c in info.columns}
    assert cols["account_id"].default == "1" and cols["account_id"].not_null
    assert cols["body"].storage == "m" and cols["body"].compression == "p" and cols["body"].comment == "payload"
    assert cols["score"].stats_target == 555
    assert cols["body_len"].generated == "s"
    assert info.comment == "the event log"
    assert info.owner == "conv_owner"
    assert any(g.startswith("conv_reader=ar/") for g in info.grants)
    assert [c for c in info.checks if "score >= 0" in c[1]]
    assert [fk.references for fk in info.foreign_keys_out] == [QualifiedName("public", "accounts")]
    assert {i.name for i in info.indexes} == {"events_pkey", "events_account_at", "events_lower_body"}
    assert "WHERE (score > 10)" in next(i.definition for i in info.indexes if i.name == "events_lower_body")
    part = next(p for p in info.partitions if not p.is_default)
    pinfo = catalog.describe(conn, part.name)
    assert pinfo.column("score").stats_target == 555
    assert any(g.startswith("conv_reader=ar/") for g in pinfo.grants)
    # the publication now carries the partitioned table, published through its root, with its row filter
    assert info.publications == ["events_pub"]
    assert conn.execute("SELECT pubviaroot FROM pg_publication WHERE pubname = 'events_pub'").fetchone()[0]
    assert conn.execute("SELECT rowfilter FROM pg_publication_tables WHERE pubname = 'events_pub'"
                        ).fetchone()[0] == "(id > 1)"
    # the generated column is computed, the FK cascades into the new table
    conn.execute("INSERT INTO events (account_id, at, body, score) VALUES (2, '2024-02-02', 'abc', 3)")
    assert conn.execute("SELECT body_len FROM events WHERE body = 'abc'").fetchone()[0] == 3
    conn.execute("DELETE FROM accounts WHERE id = 2")
    assert conn.execute("SELECT count(*) FROM events WHERE account_id = 2").fetchone()[0] == 0


def test_dry_run_changes_nothing_and_logs_every_step(conn, caplog) -> None:
    seed_activities(conn, "public.activities", rows=5_000, timestamptz=True)
    before, hashed = snapshot(conn), row_hash(conn, "activities")
    spec = ConvertSpec.create("activities", "created_at", defer_indexes=True, default_partition=True)
    ex = Executor(conn, dry_run=True)
    caplog.set_level(logging.INFO, logger="pg_partition")
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, past=2, future=2, cover_data=True)
    plan = convert.plan_fill(ex, spec, batch_size=500)
    for item in plan["items"]:
        convert.fill(ex, spec, item, plan=plan)
    convert.build_indexes(ex, spec)
    convert.analyze(ex, spec)
    convert.catch_up(ex, spec)
    convert.swap(ex, spec)
    assert snapshot(conn) == before and row_hash(conn, "activities") == hashed
    text = "\n".join(ex.statements)
    for expected in ("CREATE TABLE", "PARTITION BY RANGE", "ATTACH PARTITION", "DEFAULT", "DELETE FROM",
                     "INSERT INTO", "ANALYZE", "LOCK TABLE", "RENAME TO", "pg_notify"):
        assert expected in text, expected
    assert "[dry run]" in caplog.text


def test_default_partition_takes_nulls_and_rows_outside_ranges(conn) -> None:
    conn.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, at date, v text)")
    conn.execute("""INSERT INTO ev (at, v) SELECT CASE WHEN g % 10 = 0 THEN NULL
                    ELSE date '2023-01-01' + (g % 700) END, g::text FROM generate_series(1, 7000) g""")
    before = row_hash(conn, "ev")
    spec = ConvertSpec.create("ev", "at", period="year", default_partition=True)
    result = convert_all(conn, spec, cover_data=False, past=0, future=0)  # only the current year's partition
    assert row_hash(conn, "ev") == before
    default = conn.execute("SELECT count(*) FROM ev_default").fetchone()[0]
    assert default == 7000 and result["plan"]["rows_in_default"] == 7000
    assert result["plan"]["outside_rows"] == 0


def test_rows_outside_every_partition_are_counted_not_copied(conn, caplog) -> None:
    conn.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, at timestamp NOT NULL)")
    conn.execute("INSERT INTO ev (at) SELECT timestamp '2024-01-01' + g * interval '1 hour' "
                 "FROM generate_series(0, 24 * 60 - 1) g")  # Jan and Feb 2024
    spec = ConvertSpec.create("ev", "at", period="month")
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, past=0, future=0, today=__import__("datetime").date(2024, 1, 15))
    caplog.set_level(logging.INFO, logger="pg_partition")
    plan = convert.plan_fill(ex, spec, batch_size=100)
    feb = 29 * 24
    assert plan["outside_rows"] == feb and plan["rows"] == 31 * 24
    assert "will NOT be copied" in caplog.text
    convert.fill(ex, spec)
    assert conn.execute("SELECT count(*) FROM ev_intermediate").fetchone()[0] == 31 * 24
    rep = convert.report(conn, spec)
    assert rep["fill"]["outside_rows"] == feb
    assert "outside every partition" in convert.format_report(rep)


def test_where_filter_limits_the_copy(conn) -> None:
    seed_activities(conn, "public.activities", rows=10_000, timestamptz=True)
    spec = ConvertSpec.create("activities", "created_at")
    where = "trackable_type IN ('Job', 'Offer') AND key <> 'x;y'"
    convert_all(conn, spec, where=where, swap=False)
    want = conn.execute(f"SELECT count(*) FROM activities WHERE {where}").fetchone()[0]
    assert 0 < want < 10_000
    assert conn.execute("SELECT count(*) FROM activities_intermediate").fetchone()[0] == want


def test_uncorrelated_ids_fall_back_to_id_chunks(conn) -> None:
    conn.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, at timestamptz NOT NULL)")
    conn.execute("INSERT INTO ev (at) SELECT timestamptz '2024-01-01 00:00+00' + (g * 7919 % 365) * interval '1 day' "
                 "FROM generate_series(1, 20000) g")
    before = row_hash(conn, "ev")
    spec = ConvertSpec.create("ev", "at", period="month")
    result = convert_all(conn, spec)
    assert result["plan"]["strategy"] == "id_chunks"
    assert row_hash(conn, "ev") == before


@pytest.mark.parametrize("period", ["day", "week", "year"])
def test_other_periods(conn, period: str) -> None:
    conn.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, at timestamptz NOT NULL)")
    conn.execute("INSERT INTO ev (at) SELECT timestamptz '2024-02-20 00:00+00' + g * interval '7 minutes' "
                 "FROM generate_series(1, 3000) g")  # crosses a leap day and a month end
    before = row_hash(conn, "ev")
    convert_all(conn, ConvertSpec.create("ev", "at", period=period))
    assert row_hash(conn, "ev") == before
