"""Preflight refusals (each leaves the database exactly as it was), its report, the row-filter gate, and hostile
identifiers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError, PreflightError
from pg_partition.core.db.execute import Executor
from tests.support.convert import convert_all, row_hash, snapshot
from tools.seed import seed_activities


def _base(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, at timestamptz NOT NULL, v text)")
    conn.execute("INSERT INTO ev (at, v) SELECT timestamptz '2024-01-01 00:00+00' + g * interval '1 hour', g::text "
                 "FROM generate_series(1, 500) g")


def _nulls(conn: psycopg.Connection[Any]) -> None:
    _base(conn)
    conn.execute("ALTER TABLE ev ALTER COLUMN at DROP NOT NULL")
    conn.execute("UPDATE ev SET at = NULL WHERE id % 50 = 0")


def _no_pk(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE ev (id bigint, at timestamptz NOT NULL)")


def _text_pk(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE ev (id text PRIMARY KEY, at timestamptz NOT NULL)")


def _incoming_fk(conn: psycopg.Connection[Any]) -> None:
    _base(conn)
    conn.execute("CREATE TABLE ev_notes (id bigint PRIMARY KEY, ev_id bigint REFERENCES ev)")


def _unique_without_column(conn: psycopg.Connection[Any]) -> None:
    _base(conn)
    conn.execute("CREATE UNIQUE INDEX ev_v_key ON ev (v)")


def _partitioned(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE ev (id bigint, at timestamptz NOT NULL) PARTITION BY RANGE (at)")


def _retired_exists(conn: psycopg.Connection[Any]) -> None:
    _base(conn)
    conn.execute("CREATE TABLE ev_retired (id bigint)")


def _foreign_intermediate(conn: psycopg.Connection[Any]) -> None:
    _base(conn)
    conn.execute("CREATE TABLE ev_intermediate (id bigint, at timestamptz) PARTITION BY RANGE (at)")


REFUSALS: list[tuple[str, Callable[[psycopg.Connection[Any]], None], dict[str, Any], str, str]] = [
    ("missing table", lambda c: None, {}, "does not exist", "check the schema"),
    ("missing column", _base, {"column": "created"}, "column 'created' does not exist", "at"),
    ("wrong type", _base, {"column": "v"}, "has type text", "timestamp"),
    ("nulls", _nulls, {}, "have NULL in 'at'", "default_partition=true"),
    ("no primary key", _no_pk, {}, "has no primary key", "smallint, integer, bigint"),
    ("text primary key", _text_pk, {}, "of type text", "smallint, integer, bigint"),
    ("incoming foreign key", _incoming_fk, {}, "public.ev_notes.ev_notes_ev_id_fkey", "drop those foreign keys"),
    ("unique without column", _unique_without_column, {}, "unique index ev_v_key", "add at to the index"),
    ("already partitioned", _partitioned, {}, "already partitioned", "rotation"),
    ("retired exists", _retired_exists, {}, "ev_retired already exists", "archive and drop it"),
    ("foreign intermediate", _foreign_intermediate, {}, "no conversion of public.ev is recorded",
     "DROP TABLE"),
]


@pytest.mark.parametrize(("case", "setup", "kwargs", "what", "fix"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_preflight_refuses_and_changes_nothing(conn, case, setup, kwargs, what, fix) -> None:
    setup(conn)
    before = snapshot(conn)
    spec = ConvertSpec.create("ev", kwargs.get("column", "at"))
    with pytest.raises(PreflightError) as err:
        convert.preflight(conn, spec)
    assert what in str(err.value) and fix in str(err.value), str(err.value)
    assert err.value.fix  # every refusal says how to fix it
    # prep runs the same checks before touching anything
    with pytest.raises(PreflightError):
        convert.prep(Executor(conn), spec)
    assert snapshot(conn) == before


def test_several_problems_are_reported_together(conn) -> None:
    _nulls(conn)
    conn.execute("CREATE UNIQUE INDEX ev_v_key ON ev (v)")
    with pytest.raises(PreflightError) as err:
        convert.preflight(conn, ConvertSpec.create("ev", "at"))
    text = str(err.value)
    assert "have NULL" in text and "ev_v_key" in text and text.count("  - ") >= 4


def test_intermediate_of_a_different_conversion_is_refused(conn) -> None:
    _base(conn)
    month = ConvertSpec.create("ev", "at", period="month")
    convert.prep(Executor(conn), month)
    assert convert.preflight(conn, month)["resuming"] is True  # the same conversion may resume
    before = snapshot(conn)
    day = ConvertSpec.create("ev", "at", period="day")
    with pytest.raises(PreflightError, match="left by a different conversion") as err:
        convert.prep(Executor(conn), day)
    assert "unprep" in str(err.value)
    assert snapshot(conn) == before


def test_nulls_are_fine_with_a_default_partition(conn) -> None:
    _nulls(conn)
    report = convert.preflight(conn, ConvertSpec.create("ev", "at", default_partition=True))
    assert report["null_rows"] == 10


def test_preflight_report(conn) -> None:
    seed_activities(conn, "public.activities", rows=20_000, timestamptz=True)
    conn.execute("CREATE PUBLICATION acts FOR TABLE activities")
    conn.execute("SELECT pg_create_logical_replication_slot('acts_slot', 'pgoutput')")
    before = snapshot(conn)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    rep = convert.preflight(conn, spec)
    assert snapshot(conn) == before
    assert rep["rows"] == 20_000 and rep["rows_exact"] is True
    assert sum(p["rows"] for p in rep["rows_per_period"]) == 20_000
    assert len(rep["rows_per_period"]) in (26, 27)
    assert rep["size"]["total"] > rep["size"]["table"] > 0
    assert rep["append_only"] is True
    assert rep["publications"] == [{"name": "acts", "all_tables": False, "publish_via_partition_root": False}]
    assert "acts_slot" in [s["slot_name"] for s in rep["replication_slots"]]
    assert any("publish_via_partition_root" in w for w in rep["warnings"])
    # a sampled estimate for big tables: forced here with a tiny threshold
    sampled = convert.preflight(conn, spec, exact_below=1_000, sample_rows=5_000)
    assert sampled["rows_exact"] is False and 10_000 < sampled["rows"] < 40_000


def test_updates_make_the_table_not_append_only(conn) -> None:
    _base(conn)
    conn.execute("UPDATE ev SET v = 'x' WHERE id < 10")
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")
    rep = convert.preflight(conn, ConvertSpec.create("ev", "at"))
    assert rep["append_only"] is False
    assert any("not append-only" in w for w in rep["warnings"])


BAD_FILTERS = [
    ("1", "must be type boolean"),
    ("true; DROP TABLE ev", "contains ';'"),
    ("true) UNION SELECT 1 FROM pg_class WHERE (true", "closes a parenthesis"),
    ("(true", "unbalanced"),
    ("true -- and more", "comment"),
    ("true /* x */", "comment"),
    ("nosuchcolumn = 1", "nosuchcolumn"),
    ("v = $$x$$", "dollar"),
    ("v = 'unterminated", "unterminated"),
    ("v = '\\' OR true; DROP TABLE ev; --'", "';'"),  # backslash is no escape in a standard string
]


@pytest.mark.parametrize(("where", "message"), BAD_FILTERS)
def test_where_must_be_one_boolean_expression(conn, where: str, message: str) -> None:
    _base(conn)
    before, rows = snapshot(conn), row_hash(conn, "ev")
    with pytest.raises(InvalidInputError, match="where filter") as err:
        convert.preflight(conn, ConvertSpec.create("ev", "at"), where=where)
    assert message in str(err.value), str(err.value)
    assert snapshot(conn) == before and row_hash(conn, "ev") == rows


def test_good_where_with_quoted_semicolons(conn) -> None:
    _base(conn)
    where = "v <> 'a;b' AND v <> 'it''s' AND v <> E'\\' OR 1; --' AND \"id\" > 250"
    rep = convert.preflight(conn, ConvertSpec.create("ev", "at"), where=where)
    assert rep["rows_matching_where"] == 250


def test_hostile_identifiers_are_only_ever_identifiers(conn) -> None:
    conn.execute("CREATE TABLE victim (x int)")
    schema, table, column = 'Weird "Schema"; DROP TABLE victim; --', "Robert'); DROP TABLE victim;--", 'at"; --'
    conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(schema)))
    name = QualifiedName(schema, table)
    conn.execute(psycopg.sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, {} timestamptz NOT NULL)").format(
        name.ident, psycopg.sql.Identifier(column)))
    conn.execute(psycopg.sql.SQL("INSERT INTO {} ({}) SELECT timestamptz '2024-01-01 00:00+00' + g * interval "
                                 "'5 hours' FROM generate_series(1, 800) g").format(
        name.ident, psycopg.sql.Identifier(column)))
    before = row_hash(conn, name)
    spec = ConvertSpec.create(name, column)
    convert_all(conn, spec)
    assert row_hash(conn, name) == before
    assert conn.execute("SELECT to_regclass('public.victim') IS NOT NULL").fetchone()[0]
    assert convert.report(conn, spec)["swapped"] is True
