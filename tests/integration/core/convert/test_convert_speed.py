"""Speed features of the conversion on real PostgreSQL, checked for what they must not break: deferred index
builds on parallel sessions (every partition index built once, attached, valid; resumable), and latency pacing
(the throttle pauses only while the canary is slower than the target; the canary cannot write). How much faster
they are is measured in bench/, never asserted here."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest

from pg_partition.core import convert
from pg_partition.core.convert.parallel import run_bounded, sibling_connection
from pg_partition.core.convert.prep import BUILD_SETTINGS
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.convert.throttle import Canary, LatencyThrottle, p99
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.names import fit_identifier
from tests.support.convert import row_hash
from tools.seed import INDEXES, seed_activities

ROWS = 20_000


def _filled(conn: psycopg.Connection[Any]) -> tuple[Executor, ConvertSpec]:
    seed_activities(conn, "public.activities", rows=ROWS, timestamptz=True)
    spec = ConvertSpec.create("public.activities", "created_at", defer_indexes=True)
    ex = Executor(conn, logger=logging.getLogger("test"))
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    convert.plan_fill(ex, spec, batch_size=5_000)
    convert.fill(ex, spec)
    return ex, spec


def _partition_indexes(conn: psycopg.Connection[Any], parent: QualifiedName) -> dict[str, set[str]]:
    info = catalog.describe(conn, parent)
    return {p.name.name: {i.name for i in catalog.describe(conn, p.name).indexes} for p in info.partitions}


def test_deferred_indexes_built_on_two_sessions_are_complete_attached_and_valid(db, conn) -> None:
    ex, spec = _filled(conn)
    opened: list[int] = []

    def connect() -> psycopg.Connection[Any]:
        c = db.connect(autocommit=True)
        opened.append(c.info.backend_pid)
        return c

    info = convert.build_indexes(ex, spec, workers=2, connect=connect)
    assert len(opened) == 2 and len(set(opened)) == 2 and conn.info.backend_pid not in opened
    parent = catalog.describe(conn, spec.intermediate)
    assert all(i.is_valid for i in parent.indexes)
    assert len([i for i in parent.indexes if not i.is_primary]) == len(INDEXES)
    per_part = _partition_indexes(conn, spec.intermediate)
    assert len(per_part) >= 26
    assert all(len(names) == 1 + len(INDEXES) for names in per_part.values()), per_part
    assert sum(t["partitions"] for t in info["indexes"]) == len(per_part) * len(INDEXES)
    # idempotent: a second run builds nothing
    again = convert.build_indexes(ex, spec, workers=2, connect=connect)
    assert all(t.get("already") for t in again["indexes"]) and len(opened) == 2


def test_an_interrupted_parallel_build_resumes_by_attaching_what_was_built(db, conn) -> None:
    ex, spec = _filled(conn)
    parts = catalog.describe(conn, spec.intermediate).partitions
    # a run killed after building one partition's index (CREATE INDEX commits whole) and before attaching it
    first = parts[0].name
    src = next(i for i in catalog.describe(conn, spec.table).indexes if i.name.endswith("created_at"))
    child = fit_identifier(f"{first.name}_{src.name}", "")
    conn.execute(psycopg.sql.SQL("CREATE INDEX {} ON {} (created_at)").format(
        psycopg.sql.Identifier(child), first.ident))
    convert.build_indexes(ex, spec, workers=2)
    assert all(i.is_valid for i in catalog.describe(conn, spec.intermediate).indexes)
    names = _partition_indexes(conn, spec.intermediate)[first.name]
    assert child in names and len(names) == 1 + len(INDEXES)  # attached, not built a second time
    convert.analyze(ex, spec)
    convert.swap(ex, spec)
    assert row_hash(conn, "activities") == row_hash(conn, "activities_retired")


def test_run_bounded_raises_the_first_failure_and_logs_every_statement(db, conn, caplog) -> None:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    conn.execute("INSERT INTO t SELECT g, g % 3 FROM generate_series(1, 100) g")
    ex = Executor(conn, logger=logging.getLogger("test.bounded"))
    stmts = [psycopg.sql.SQL("CREATE INDEX t_v ON t (v)"), psycopg.sql.SQL("CREATE UNIQUE INDEX t_u ON t (v)")]
    with caplog.at_level(logging.INFO, logger="test.bounded"), pytest.raises(psycopg.errors.UniqueViolation):
        run_bounded(ex, stmts, workers=2)
    assert {"SQL: CREATE INDEX t_v ON t (v)", "SQL: CREATE UNIQUE INDEX t_u ON t (v)"} <= {
        r.getMessage() for r in caplog.records}
    assert catalog.describe(conn, QualifiedName("public", "t")).indexes  # the good one was built


def test_run_bounded_local_settings_hold_for_each_statement_only(conn) -> None:
    """Index builds run with their own settings (no parallel maintenance workers, no commit flush wait); they
    apply inside each statement and no session keeps them, the caller's included (one worker: its own session)."""
    conn.execute("CREATE TABLE seen (worker int, synchronous_commit text)")
    conn.execute("CREATE FUNCTION note_settings() RETURNS int LANGUAGE sql AS $$ INSERT INTO seen VALUES "
                 "(current_setting('max_parallel_maintenance_workers')::int, "
                 "current_setting('synchronous_commit')) RETURNING 1 $$")
    conn.execute("SET synchronous_commit = on")  # the session's own setting (the test cluster's default is off)
    before = conn.execute("SHOW max_parallel_maintenance_workers").fetchone()[0]
    stmts = [psycopg.sql.SQL("SELECT note_settings()")] * 3
    for workers in (1, 2):
        run_bounded(Executor(conn), stmts, workers=workers, local_settings=BUILD_SETTINGS)
    assert conn.execute("SELECT DISTINCT worker, synchronous_commit FROM seen").fetchall() == [(0, "off")]
    assert conn.execute("SELECT count(*) FROM seen").fetchone()[0] == 6
    assert conn.execute("SHOW max_parallel_maintenance_workers").fetchone()[0] == before != "0"
    assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"


def test_sibling_connection_reaches_the_same_database_as_another_session(conn) -> None:
    with sibling_connection(conn) as other:
        assert other.info.dbname == conn.info.dbname and other.info.backend_pid != conn.info.backend_pid
        assert other.autocommit


def test_throttle_pauses_while_the_canary_is_slower_than_the_target(db) -> None:
    pauses: list[float] = []
    with Canary(lambda: db.connect(autocommit=True), query="SELECT pg_sleep(0.03)", interval=0.005,
                window=20) as canary:
        thr = LatencyThrottle(canary, target_ms=5.0, sleep=pauses.append)
        for _ in range(4):
            thr()
        assert canary.p99() >= 30.0
    assert thr.ratio > 0 and len(pauses) == 3 and all(p > 0 for p in pauses)  # no pause before the first batch


def test_throttle_does_not_pause_a_fast_canary(db) -> None:
    pauses: list[float] = []
    with Canary(lambda: db.connect(autocommit=True), interval=0.005, window=20) as canary:
        thr = LatencyThrottle(canary, target_ms=2000.0, sleep=pauses.append)
        for _ in range(5):
            thr()
    assert pauses == [] and thr.ratio == 0.0


def test_canary_cannot_write(db, conn) -> None:
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        Canary(lambda: db.connect(autocommit=True), query="CREATE TABLE canary_wrote ()").start()
    assert not catalog.exists(conn, QualifiedName("public", "canary_wrote"))


def test_fill_with_a_throttle_copies_every_row_and_pauses(db, conn) -> None:
    seed_activities(conn, "public.activities", rows=ROWS, timestamptz=True)
    spec = ConvertSpec.create("public.activities", "created_at")
    ex = Executor(conn, logger=logging.getLogger("test"))
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    convert.plan_fill(ex, spec, batch_size=2_000)
    pauses: list[float] = []
    with Canary(lambda: db.connect(autocommit=True), query="SELECT pg_sleep(0.02)", interval=0.005,
                window=20) as canary:
        thr = LatencyThrottle(canary, target_ms=1.0, sleep=pauses.append)
        out = convert.fill(ex, spec, throttle=thr)
    assert out["rows"] == ROWS and sum(pauses) > 0 and thr.paused == pytest.approx(sum(pauses))
    assert conn.execute("SELECT count(*) FROM activities_intermediate").fetchone()[0] == ROWS


def test_p99_nearest_rank() -> None:
    assert p99([]) == 0.0 and p99([5.0]) == 5.0
    assert p99([float(i) for i in range(1, 101)]) == 100.0
    assert p99([float(i) for i in range(1, 1001)]) == 991.0
