"""Issue 16: the hostile `where` filters that got through, against a real server. Each is refused with a message
naming the problem, and a snapshot of the database (schema, sequences, row hashes) is unchanged."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pg_partition.core import convert
from pg_partition.core.convert import where as where_module
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.db.execute import Executor
from tests.support.convert import row_hash, snapshot


def _setup(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, at timestamptz NOT NULL, v text)")
    conn.execute("INSERT INTO ev (at, v) SELECT timestamptz '2024-01-01 00:00+00' + g * interval '1 hour', g::text "
                 "FROM generate_series(1, 500) g")
    conn.execute("CREATE TABLE victim (x int)")
    conn.execute("CREATE TABLE secrets (pw text)")
    conn.execute("INSERT INTO secrets VALUES ('hunter2')")
    conn.execute("CREATE SEQUENCE some_seq")


def _state(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return (snapshot(conn), row_hash(conn, "ev"), conn.execute("SELECT count(*) FROM victim").fetchone(),
            conn.execute("SELECT last_value, is_called FROM some_seq").fetchone())


def test_terminate_backend_is_refused_and_the_other_session_lives(conn, db) -> None:
    _setup(conn)
    with db.connect() as other:
        pid = other.info.backend_pid
        before = _state(conn)
        with pytest.raises(InvalidInputError, match=r"pg_catalog\.pg_terminate_backend\(\) is not on the allowlist"):
            convert.preflight(conn, ConvertSpec.create("ev", "at"),
                              where=f"id > 0 AND pg_catalog.pg_terminate_backend({pid}) IS NOT NULL")
        assert other.execute("SELECT 1").fetchone() == (1,)
        assert _state(conn) == before


HOSTILE = [
    ("nextval('public.some_seq') > 0", "nextval()"),
    ("lo_import('/etc/passwd') > 0", "lo_import()"),
    ("length(pg_read_file('/etc/hostname')) > 0", "pg_read_file()"),
    ("set_config('application_name', 'owned', false) IS NOT NULL", "set_config()"),
    ("pg_sleep(5) IS NOT NULL", "pg_sleep()"),
    ("CASE WHEN id > 0 THEN dblink_exec('dbname=x', 'CREATE TABLE pwn (x int)') = 'OK' ELSE true END",
     "dblink_exec()"),
    ("EXISTS (SELECT 1 FROM secrets WHERE pw LIKE 'h%')", "subqueries and other tables"),
]


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(("where", "why"), HOSTILE)
def test_hostile_filters_change_nothing(conn, where: str, why: str, dry_run: bool) -> None:
    """Every entry point that takes a filter: preflight, capture decision, add_partitions, plan_fill (also in a
    dry run, where nextval() used to advance the sequence)."""
    _setup(conn)
    spec = ConvertSpec.create("ev", "at")
    before = _state(conn)
    app = conn.execute("SHOW application_name").fetchone()
    ex = Executor(conn, dry_run=dry_run)
    calls = [
        lambda: convert.preflight(conn, spec, where=where, dry_run=dry_run),
        lambda: convert.add_partitions(ex, spec, cover_data=True, where=where),
        lambda: convert.plan_fill(ex, spec, where=where),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError) as err:
            call()
        assert why in str(err.value) and "nothing was run" in str(err.value)
    assert _state(conn) == before
    assert conn.execute("SHOW application_name").fetchone() == app


def test_non_conforming_strings_cannot_break_out(conn) -> None:
    """With standard_conforming_strings = off the old lexical gate read the backslash as an escape and the
    server did not: the filter closed the WHERE and the INSERT ran twice."""
    _setup(conn)
    conn.execute("SET standard_conforming_strings = off")
    before = _state(conn)
    payload = ("'a\\' = ' IS NOT NULL ) ; COMMIT ; INSERT INTO victim VALUES (99) ; SELECT ( '\\' = '")
    with pytest.raises(InvalidInputError, match="not valid SQL"):
        convert.preflight(conn, ConvertSpec.create("ev", "at"), where=payload)
    assert _state(conn) == before


def test_a_backslash_filter_means_the_same_on_a_non_conforming_session(conn) -> None:
    """A legitimate filter with a backslash counts the same rows whatever the session's setting was, because
    validation turns standard_conforming_strings on before the deparse is used."""
    _setup(conn)
    conn.execute("UPDATE ev SET v = 'a\\b' WHERE id <= 7")  # conforming session: the text a\b
    conn.execute("SET standard_conforming_strings = off")
    rep = convert.preflight(conn, ConvertSpec.create("ev", "at"), where="v = 'a\\b'")
    assert rep["rows_matching_where"] == 7
    assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)


def test_the_server_refuses_a_volatile_function_the_parser_would_allow(conn, monkeypatch) -> None:
    """The second gate: pg_proc.provolatile. random() is put on the allowlist for this test only."""
    _setup(conn)
    monkeypatch.setattr(where_module, "FUNCTIONS", where_module.FUNCTIONS | {"random"})
    before = _state(conn)
    with pytest.raises(InvalidInputError, match="random is volatile or returns a set on this server"):
        convert.preflight(conn, ConvertSpec.create("ev", "at"), where="random() < 0.5")
    assert _state(conn) == before


def test_a_dry_run_executes_nothing_the_user_wrote(conn) -> None:
    """1/(id - id) divides by zero only when executed; planning (EXPLAIN) accepts it. A dry run reports without
    running it; a real preflight runs it and fails on it."""
    _setup(conn)
    spec = ConvertSpec.create("ev", "at")
    where = "1 / (id - id) = 0"
    rep = convert.preflight(conn, spec, where=where, dry_run=True)
    assert rep["rows_matching_where"] is None
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True)
    plan = convert.plan_fill(Executor(conn, dry_run=True), spec, where=where)
    assert plan["rows"] == 500
    with pytest.raises(psycopg.errors.DivisionByZero):
        convert.preflight(conn, spec, where=where)


def test_a_legitimate_filter_still_converts_only_its_rows(conn) -> None:
    _setup(conn)
    spec = ConvertSpec.create("ev", "at")
    rep = convert.preflight(conn, spec, where="id > 250 AND lower(v) <> 'x' AND at < now()")
    assert rep["rows_matching_where"] == 250


# --- user-defined operators and unbounded matching (issue 16 leftovers) ------------------------------------------

EVIL = """CREATE FUNCTION {name}({args}) RETURNS boolean LANGUAGE sql VOLATILE
          AS $$ INSERT INTO victim VALUES (7); SELECT true $$"""


def _evil_operators(conn: psycopg.Connection[Any]) -> None:
    """Two ways a filter's plain `=` can land on a function of the user's: a column of a user-defined type (a
    domain) with its own `=`, and a `=` in public for built-in types PostgreSQL has no `=` for (bigint, text)."""
    conn.execute("CREATE DOMAIN score AS integer")
    conn.execute("ALTER TABLE ev ADD COLUMN s score DEFAULT 1")
    conn.execute(EVIL.format(name="evil_score_eq", args="score, integer"))
    conn.execute("CREATE OPERATOR public.= (LEFTARG = score, RIGHTARG = integer, FUNCTION = evil_score_eq)")
    conn.execute(EVIL.format(name="evil_int8_text_eq", args="bigint, text"))
    conn.execute("CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = text, FUNCTION = evil_int8_text_eq)")


@pytest.mark.parametrize(("where", "why"), [
    ("s = 1", r"column s has the user-defined type public\.score"),
    ("id = v", r"operator public\.=\(bigint,text\).* not a built-in operator"),
])
def test_a_user_defined_operator_is_refused(conn, where: str, why: str) -> None:
    _setup(conn)
    _evil_operators(conn)
    spec = ConvertSpec.create("ev", "at")
    before = _state(conn)
    ex = Executor(conn)
    for call in (lambda: convert.preflight(conn, spec, where=where),
                 lambda: convert.add_partitions(ex, spec, cover_data=True, where=where),
                 lambda: convert.plan_fill(ex, spec, where=where)):
        with pytest.raises(InvalidInputError, match=why) as err:
            call()
        assert "nothing was run" in str(err.value)
    assert _state(conn) == before
    assert conn.execute("SELECT count(*) FROM victim").fetchone() == (0,)


@pytest.mark.parametrize(("where", "why"), [
    ("v ~ '^(a+)+$'", "regular expressions"),
    ("v ~* 'x'", "regular expressions"),
    ("v !~ 'x'", "regular expressions"),
    ("v SIMILAR TO '(a|aa)*b'", "regular expressions"),
    ("v LIKE v", "LIKE pattern must be a string constant"),
    ("v LIKE '%a%a%a%a%a%a%a%a%a%b'", "more than 4 '%' wildcards"),
])
def test_unbounded_matching_is_refused(conn, where: str, why: str) -> None:
    _setup(conn)
    before = _state(conn)
    with pytest.raises(InvalidInputError, match=why):
        convert.preflight(conn, ConvertSpec.create("ev", "at"), where=where)
    assert _state(conn) == before


def test_built_in_operators_and_a_short_like_still_work(conn) -> None:
    _setup(conn)
    _evil_operators(conn)  # their presence does not disturb filters that resolve to pg_catalog's operators
    rep = convert.preflight(conn, ConvertSpec.create("ev", "at"),
                            where="id > 250 AND v LIKE '2%' AND v NOT ILIKE '%x%' AND id IN (260, 270, 300)")
    assert rep["rows_matching_where"] == 2  # 260 and 270 (300 does not start with 2)
    assert conn.execute("SELECT count(*) FROM victim").fetchone() == (0,)


def test_counting_with_the_filter_runs_read_only(conn, monkeypatch) -> None:
    """Defence in depth: the queries that only read with the user's filter (plan_fill's stats, preflight's count,
    catch-up's rows-outside count) run in READ ONLY transactions, so a filter that slipped past every gate still
    could not write. The gate is bypassed on purpose here (validate_where patched to return nextval())."""
    from psycopg import sql

    from pg_partition.core.convert import catchup
    from pg_partition.core.convert.fill import recorded_plan

    _setup(conn)
    spec = ConvertSpec.create("ev", "at")
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True)
    convert.plan_fill(ex, spec)
    plan = recorded_plan(conn, spec) | {"where": "slipped through"}
    before = _state(conn)
    monkeypatch.setattr(catchup, "validate_where",
                        lambda *a, **k: sql.SQL("(pg_catalog.nextval('public.some_seq') > 0)"))
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        catchup.rows_outside(conn, plan, spec.table, spec.intermediate)
    assert _state(conn) == before
