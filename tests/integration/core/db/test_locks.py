"""Issue 16: every engine entry point that changes a table takes the per-table lock itself, so two direct callers
of the engine (no operator in between) exclude each other; within one session the lock is re-entrant, so an
operator's lock (exclusive, or shared by the mapped fill tasks) never deadlocks the step it calls."""

from __future__ import annotations

from typing import Any

import pytest

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import TableBusyError, holds, table_lock
from tests.support.convert import snapshot


def _table(conn: Any) -> None:
    conn.execute("CREATE TABLE ev (id bigserial PRIMARY KEY, at timestamptz NOT NULL, v text)")
    conn.execute("INSERT INTO ev (at, v) SELECT timestamptz '2024-01-01 00:00+00' + g * interval '1 day', g::text "
                 "FROM generate_series(1, 90) g")


STEPS = [
    ("prep", lambda ex, spec: convert.prep(ex, spec)),
    ("add_partitions", lambda ex, spec: convert.add_partitions(ex, spec, cover_data=True)),
    ("swap", lambda ex, spec: convert.swap(ex, spec)),
    ("unprep", lambda ex, spec: convert.unprep(ex, spec)),
]


@pytest.mark.parametrize(("name", "step"), STEPS, ids=[s[0] for s in STEPS])
def test_a_direct_engine_call_is_refused_while_another_session_works_on_the_table(conn, db, name, step) -> None:
    _table(conn)
    spec = ConvertSpec.create("ev", "at")
    with db.connect() as other:
        other.execute("SET application_name = 'the_other_run'")
        with table_lock(other, spec.table, what="the other run"):
            before = snapshot(conn)
            with pytest.raises(TableBusyError, match=r"another pg-partition step is working on public\.ev .*"
                               r"application_name 'the_other_run'"):
                step(Executor(conn), spec)
            assert snapshot(conn) == before
    assert not holds(conn, spec.table)


def test_the_engine_lock_is_re_entrant_and_released(conn, db) -> None:
    _table(conn)
    spec = ConvertSpec.create("ev", "at")
    ex = Executor(conn)
    with table_lock(conn, spec.table, what="operator"):  # as an operator holds it around the step
        convert.prep(ex, spec)
        assert holds(conn, spec.table)
    assert not holds(conn, spec.table)
    convert.add_partitions(ex, spec, cover_data=True)  # no outer lock: the step takes and releases its own
    assert not holds(conn, spec.table)
    # and the table is free for another session afterwards
    with db.connect() as other, table_lock(other, spec.table, what="next"):
        assert holds(other, spec.table)


def test_a_fill_task_under_a_shared_lock_runs_beside_another_fill_task(conn, db) -> None:
    """The mapped fill tasks share the table's lock; the engine's fill must run under it, not ask for the
    exclusive one (which the sibling task's shared lock would refuse)."""
    _table(conn)
    spec = ConvertSpec.create("ev", "at")
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True)
    items = convert.plan_fill(ex, spec)["items"]
    assert len(items) >= 2
    with db.connect() as sibling, \
            table_lock(sibling, spec.table, what="fill[1]", shared=True, item=items[1]["key"]), \
            table_lock(conn, spec.table, what="fill[0]", shared=True, item=items[0]["key"]):
        assert convert.fill(ex, spec, items[0])["rows"] > 0
    plain = QualifiedName("public", "ev")
    assert not holds(conn, plain)


def test_heavy_steps_are_bounded_per_database(conn, db, monkeypatch) -> None:
    """With pg_partition.heavy_slots = 1 a second heavy step waits for the first, then fails naming it; once the
    slot is free it runs. Re-entrant in one session (build_indexes inside an operator that holds a slot)."""
    from pg_partition.core.db import locks
    from pg_partition.core.db.locks import DatabaseBusyError, heavy_slot, heavy_slots

    conn.execute(f'ALTER DATABASE "{db.name}" SET pg_partition.heavy_slots = 1')  # for new sessions
    conn.execute("SET pg_partition.heavy_slots = 1")  # and this one, opened before
    with db.connect() as first, db.connect() as second:
        first.execute("SET application_name = 'first_heavy'")
        assert heavy_slots(second) == 1
        busy = pytest.raises(DatabaseBusyError, match=r"all 1 heavy-step slots .*\(pid \d+ \(first_heavy\)\)")
        with heavy_slot(first, what="fill a"), heavy_slot(first, what="nested"), busy, \
                heavy_slot(second, what="fill b", wait_seconds=0.3, poll=0.1):  # re-entrant in `first`, not shared
            pass
        with heavy_slot(second, what="fill b", wait_seconds=0.3, poll=0.1):
            pass  # free again
    _table(conn)
    spec = ConvertSpec.create("ev", "at")
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True)
    monkeypatch.setattr(locks, "WAIT_SECONDS", 0.3)  # the engine's steps wait an hour by default
    with db.connect() as other, heavy_slot(other, what="someone else's fill"):
        before = snapshot(conn)
        with pytest.raises(DatabaseBusyError, match="analyze: all 1 heavy-step slots"):
            convert.analyze(ex, spec)  # the engine's heavy steps take a slot themselves
        assert snapshot(conn) == before
    convert.analyze(ex, spec)  # the slot is free again
