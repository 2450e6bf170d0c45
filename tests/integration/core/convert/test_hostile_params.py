"""Issue 16: bad or unbounded params are refused before the first change, with the field, the value, the rule
and the fix; a snapshot of the database (schema dump, sequences, row hashes, the state schema) is unchanged."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog, state
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError, PartitionError, PreflightError, StateError
from pg_partition.core.db.execute import Executor
from tests.support.convert import convert_all, row_hash, snapshot


def _base(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, at timestamptz NOT NULL, v text)")
    conn.execute("INSERT INTO ev (at, v) SELECT timestamptz '2024-01-01 00:00+00' + g * interval '1 hour', g::text "
                 "FROM generate_series(1, 500) g")


def _role(conn: psycopg.Connection[Any], prefix: str) -> str:
    """A new role (roles are cluster-wide, so each test gets its own name)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {name}")
    return name


def _state(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return snapshot(conn), row_hash(conn, "ev")


@pytest.mark.parametrize("value", ["forever", "-1s", "0", "11min", "1 hour"])
def test_lock_timeout_is_refused_before_the_state_schema_exists(conn, value: str) -> None:
    _base(conn)
    before = _state(conn)
    with pytest.raises(InvalidInputError, match=r"lock_timeout=.* must be a PostgreSQL duration from 1ms to 10min"):
        convert.prep(Executor(conn), ConvertSpec.create("ev", "at"), lock_timeout=value)
    assert _state(conn) == before
    assert not state.ready(conn)


def test_a_missing_tablespace_is_refused_by_preflight_and_prep(conn) -> None:
    _base(conn)
    spec = ConvertSpec.create("ev", "at", tablespace="nosuchspace")
    before = _state(conn)
    for call in (lambda: convert.preflight(conn, spec), lambda: convert.prep(Executor(conn), spec)):
        with pytest.raises(PreflightError, match=r"tablespace='nosuchspace' does not exist") as err:
            call()
        assert "pg_default" in str(err.value)  # the fix lists the existing ones
    assert _state(conn) == before


def test_pg_default_tablespace_is_applied_to_partitions_not_the_parent(conn) -> None:
    _base(conn)
    spec = ConvertSpec.create("ev", "at", tablespace="pg_default")
    before = row_hash(conn, "ev")
    convert_all(conn, spec)
    assert row_hash(conn, "ev") == before
    info = catalog.describe(conn, QualifiedName.parse("ev"))
    assert info.is_partitioned and info.partitions
    spaces = conn.execute("SELECT DISTINCT reltablespace FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid "
                          "WHERE i.inhparent = 'ev'::regclass").fetchall()
    assert spaces == [(0,)]  # the database default, which is pg_default here


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"future": 10_000}, r"future=10000 is out of range: it must be a whole number from 0 to 120"),
    ({"past": -1}, r"past=-1 is out of range"),
])
def test_partition_counts_are_bounded(conn, kwargs: dict[str, int], message: str) -> None:
    _base(conn)
    spec = ConvertSpec.create("ev", "at", period="week")
    ex = Executor(conn)
    convert.prep(ex, spec)
    before = _state(conn)
    with pytest.raises(InvalidInputError, match=message):
        convert.add_partitions(ex, spec, **kwargs)
    assert _state(conn) == before


def test_cover_data_over_centuries_is_refused(conn) -> None:
    _base(conn)
    conn.execute("INSERT INTO ev (at, v) VALUES ('1900-01-01', 'outlier'), ('2190-01-01', 'outlier')")
    spec = ConvertSpec.create("ev", "at", period="day")
    ex = Executor(conn)
    convert.prep(ex, spec)
    before = _state(conn)
    with pytest.raises(InvalidInputError, match="cover_data would create more than 2,000 day partitions"):
        convert.add_partitions(ex, spec, cover_data=True)
    assert _state(conn) == before


@pytest.mark.parametrize("batch_size", [10**12, 0, -5])
def test_batch_size_is_bounded(conn, batch_size: int) -> None:
    _base(conn)
    spec = ConvertSpec.create("ev", "at")
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True)
    before = _state(conn)
    with pytest.raises(InvalidInputError, match=r"batch_size=.* is out of range: it must be a whole number from 1 "
                       r"to 1,000,000"):
        convert.plan_fill(ex, spec, batch_size=batch_size)
    with pytest.raises(InvalidInputError, match="batch_size"):
        convert.catch_up(ex, spec, batch_size=batch_size)
    assert _state(conn) == before


def test_unlogged_table_is_refused_with_a_choice(conn) -> None:
    _base(conn)
    conn.execute("ALTER TABLE ev SET UNLOGGED")
    before = _state(conn)
    with pytest.raises(PreflightError, match="is UNLOGGED") as err:
        convert.prep(Executor(conn), ConvertSpec.create("ev", "at"))
    assert "SET LOGGED" in str(err.value) and "leave this table unconverted" in str(err.value)
    assert _state(conn) == before


@pytest.mark.parametrize(("ddl", "what"), [
    ("CREATE VIEW evv AS SELECT * FROM ev", "is a view"),
    ("CREATE MATERIALIZED VIEW evv AS SELECT * FROM ev", "is a materialized view"),
])
def test_views_are_reported_as_views(conn, ddl: str, what: str) -> None:
    _base(conn)
    conn.execute(ddl)
    before = _state(conn)
    with pytest.raises(PreflightError, match=what):
        convert.preflight(conn, ConvertSpec.create("evv", "at"))
    assert _state(conn) == before


def test_a_non_owner_is_refused_up_front_naming_the_owner(conn) -> None:
    _base(conn)
    bob = _role(conn, "pgp_bob")
    conn.execute(f"GRANT SELECT ON ev TO {bob}")
    conn.execute(f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {bob}")
    before = _state(conn)
    try:
        conn.execute(f"SET ROLE {bob}")
        with pytest.raises(PreflightError, match=rf"public\.ev is owned by postgres; pg-partition connects as {bob}"):
            convert.prep(Executor(conn), ConvertSpec.create("ev", "at"))
    finally:
        conn.execute("RESET ROLE")
    assert _state(conn) == before


def test_a_state_schema_owned_by_another_role_is_refused(conn) -> None:
    """The attack of the issue: a role with CREATE on the database creates the state schema first."""
    _base(conn)
    mallory = _role(conn, "pgp_mallory")
    conn.execute(f"CREATE SCHEMA pgpartition AUTHORIZATION {mallory}")
    before = _state(conn)
    with pytest.raises(PreflightError, match=f"the state schema pgpartition is owned by {mallory}"):
        convert.prep(Executor(conn), ConvertSpec.create("ev", "at"))
    with pytest.raises(StateError, match=f"owned by {mallory}") as err:
        state.ensure_schema(conn)
    assert "DROP SCHEMA pgpartition CASCADE" in str(err.value)
    assert _state(conn) == before


def test_a_state_schema_others_can_write_is_refused(conn) -> None:
    _base(conn)
    state.ensure_schema(conn)
    mallory = _role(conn, "pgp_mallory")
    conn.execute(f"GRANT INSERT ON pgpartition.archive_queue TO {mallory}")
    before = _state(conn)
    with pytest.raises(PartitionError, match=rf"role\(s\) {mallory} may write to pgpartition.archive_queue"):
        convert.prep(Executor(conn), ConvertSpec.create("ev", "at"))
    assert _state(conn) == before


def test_a_refused_conversion_leaves_no_state_schema(conn) -> None:
    """The issue saw a refused convert create pgpartition with a 'running' job row."""
    _base(conn)
    conn.execute("CREATE TABLE child (ev_id bigint REFERENCES ev)")  # refused: a foreign key references ev
    before = _state(conn)
    with pytest.raises(PreflightError):
        convert.prep(Executor(conn), ConvertSpec.create("ev", "at"))
    assert _state(conn) == before and not state.ready(conn)
