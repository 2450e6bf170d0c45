"""The pg_partition_rollback DAG after a real conversion through pg_partition_convert: a dry run changes nothing,
then unswap + unprep bring the original table back with the rows written after the swap."""

from __future__ import annotations

from typing import Any

from pg_partition.core.convert.spec import recorded_job
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from tests.support.convert import row_hash, snapshot
from tools.seed import seed_activities

TABLE = QualifiedName("public", "activities")


def test_rollback_dag_undoes_a_conversion_and_its_dry_run_changes_nothing(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=6_000, timestamptz=True)
    original = snapshot(conn)
    converted = run_dag("pg_partition_convert", {"conn_id": db.conn_id, "batch_size": 2_000})
    assert converted.state == "success", converted.task_states
    assert catalog.describe(conn, TABLE).is_partitioned
    conn.execute("INSERT INTO activities (created_at, updated_at) SELECT now(), now() FROM generate_series(1, 7)")
    after_swap, swapped = row_hash(conn, "activities"), snapshot(conn)
    assert after_swap[0] == 6_007

    rehearsal = run_dag("pg_partition_rollback", {"conn_id": db.conn_id, "dry_run": True})
    assert rehearsal.state == "success", rehearsal.task_states
    assert rehearsal.task_states == {"unswap": "success", "unprep": "skipped"}  # it cannot unprep a swapped table
    assert snapshot(conn) == swapped and row_hash(conn, "activities") == after_swap

    result = run_dag("pg_partition_rollback", {"conn_id": db.conn_id})
    assert result.state == "success", result.task_states
    assert result.task_states == {"unswap": "success", "unprep": "success"}
    assert result.xcom("unswap")["copied_back_rows"] == 7
    assert result.xcom("unprep")["dropped"] is True
    assert not catalog.describe(conn, TABLE).is_partitioned
    assert row_hash(conn, "activities") == after_swap
    assert recorded_job(conn, TABLE) is None
    relations = {r[:2] for r in snapshot(conn)["relations"] if r[0] == "public"}
    assert relations == {r[:2] for r in original["relations"] if r[0] == "public"}

    # again: nothing left to roll back, so unswap refuses with a clear error and unprep never runs
    again = run_dag("pg_partition_rollback", {"conn_id": db.conn_id})
    assert again.state == "failed" and again.task_states["unswap"] == "failed"


def test_rollback_dag_keeps_the_intermediate_when_asked(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=3_000, timestamptz=True)
    converted = run_dag("pg_partition_convert", {"conn_id": db.conn_id})
    assert converted.state == "success", converted.task_states
    result: Any = run_dag("pg_partition_rollback", {"conn_id": db.conn_id, "drop_intermediate": False})
    assert result.state == "success", result.task_states
    assert result.task_states == {"unswap": "success", "unprep": "skipped"}
    assert catalog.describe(conn, QualifiedName("public", "activities_intermediate")).is_partitioned
    assert recorded_job(conn, TABLE) is not None
