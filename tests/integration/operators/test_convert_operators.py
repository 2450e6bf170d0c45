"""The conversion operators one by one, through a real Airflow connection to a real database."""

from __future__ import annotations

from typing import Any

import pytest

from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import LockTimeoutExhausted, PreflightError, StateError
from pg_partition.operators.convert import (
    ConvertAddPartitionsOperator,
    ConvertAnalyzeOperator,
    ConvertCatchUpOperator,
    ConvertFillOperator,
    ConvertIndexesOperator,
    ConvertPlanFillOperator,
    ConvertPreflightOperator,
    ConvertPrepOperator,
    ConvertReportOperator,
    ConvertSwapOperator,
    ConvertUnprepOperator,
    ConvertUnswapOperator,
)
from tests.support.convert import row_hash, snapshot
from tools.seed import seed_activities


def _common(db: Any, **extra: Any) -> dict[str, Any]:
    # values as a rendered template would give them: strings
    return {"conn_id": db.conn_id, "table": "public.activities", "column": "created_at", "period": "month",
            "primary_key": "per_partition", "default_partition": "False", "defer_indexes": "True",
            "tablespace": "", "lock_timeout": "2s", "lock_retries": "3", "dry_run": "False", **extra}


def test_operators_one_by_one(db, conn) -> None:
    seed_activities(conn, QualifiedName("public", "activities"), rows=8_000, timestamptz=True)
    before = row_hash(conn, "activities")
    c = _common(db)
    report = ConvertPreflightOperator(task_id="preflight", where="", **c).execute({})
    assert report["rows"] == 8_000 and report["resuming"] is False
    prep = ConvertPrepOperator(task_id="prep", **c).execute({})
    assert prep["created"] is True
    assert ConvertPrepOperator(task_id="prep", **c).execute({})["created"] is False  # retry-safe
    added = ConvertAddPartitionsOperator(task_id="add", past="0", future="2", cover_data="True", where="",
                                         **c).execute({})
    assert len(added["created"]) >= 26
    groups = ConvertPlanFillOperator(task_id="plan", where="", batch_size="1000", start="None", stop="",
                                     fill_tasks="3", rows_per_fill_task="2000", **c).execute({})
    # 8,000 rows at 2,000 per task, at most 3 tasks: 3 groups of neighbouring partitions, every partition once
    assert len(groups) == 3
    items = [it for g in groups for it in g["items"]]
    assert len(items) == len({it["key"] for it in items}) >= 26
    assert all({"key", "lo", "hi", "target"} <= set(i) for i in items)
    assert sum(g["rows"] for g in groups) == 8_000
    first = ConvertFillOperator(task_id="fill", item=items[0], batch_size="None", sleep_seconds="0",
                                **c).execute({})  # one item alone, as before
    assert first["key"] == items[0]["key"] and first["rows"] == items[0]["rows"]
    for group in groups:
        done = ConvertFillOperator(task_id="fill", item=group, batch_size="None", sleep_seconds="0",
                                   max_lag_bytes="None", max_lag_seconds="", **c).execute({})
        assert done["key"] == group["key"] and done["rows"] == group["rows"]
        assert [r["key"] for r in done["items"]] == [it["key"] for it in group["items"]]
    assert done["overall"]["done"] == done["overall"]["total"] == len(items)
    again = ConvertFillOperator(task_id="fill", item=groups[0], **c).execute({})
    assert again["resumed"] is True and again["batches"] == 0 and again["rows"] == groups[0]["rows"]
    built = ConvertIndexesOperator(task_id="indexes", **c).execute({})
    assert len(built["indexes"]) == 4 and built["analyze"]["partitions"] >= 26
    assert built["lag_gate"] == {"ok": True, "gated": False}
    assert ConvertAnalyzeOperator(task_id="analyze", **c).execute({})["partitions"] >= 26
    conn.execute("INSERT INTO activities (created_at, updated_at) SELECT now(), now() FROM generate_series(1, 3)")
    swapped = ConvertSwapOperator(task_id="swap", batch_size="500", **c).execute({})
    assert swapped["catch_up_before"]["rows"] == 3 and swapped["lock_ms"] > 0
    assert ConvertCatchUpOperator(task_id="catch_up", batch_size="500", full="False", **c).execute({})["rows"] == 0
    rep = ConvertReportOperator(task_id="report", **c).execute({})
    assert rep["swapped"] and rep["after"]["rows"] == 8_003
    assert row_hash(conn, "activities")[0] == before[0] + 3

    unswapped = ConvertUnswapOperator(task_id="unswap", **c).execute({})
    assert unswapped["lock_ms"] > 0
    assert ConvertUnprepOperator(task_id="unprep", **c).execute({})["dropped"] is True
    assert conn.execute("SELECT to_regclass('public.activities_intermediate')").fetchone()[0] is None


def test_operators_dry_run_and_refusals(db, conn) -> None:
    seed_activities(conn, QualifiedName("public", "activities"), rows=2_000, timestamptz=True)
    before = snapshot(conn)
    c = _common(db, dry_run="True")
    ConvertPrepOperator(task_id="prep", **c).execute({})
    ConvertAddPartitionsOperator(task_id="add", future="1", cover_data="true", **c).execute({})
    items = ConvertPlanFillOperator(task_id="plan", batch_size="500", **c).execute({})
    ConvertFillOperator(task_id="fill", item=items[0], **c).execute({})
    ConvertSwapOperator(task_id="swap", **c).execute({})
    assert snapshot(conn) == before
    with pytest.raises(PreflightError, match="does not exist"):
        ConvertPreflightOperator(task_id="preflight", **_common(db, column="nope")).execute({})
    with pytest.raises(StateError, match="not a swapped-in conversion"):
        ConvertUnswapOperator(task_id="unswap", **_common(db)).execute({})
    assert snapshot(conn) == before


def test_a_second_run_on_the_same_table_fails_naming_the_holder(db, conn) -> None:
    """Issue 16: two runs (an API-triggered run and a CLI `dags test`) on one table. Every operator step holds
    the table's advisory lock; the second fails with who holds it and changes nothing."""
    from pg_partition.core.db.locks import TableBusyError, table_lock

    seed_activities(conn, "public.activities", rows=2_000, months=2)
    c = _common(db)
    before, rows = snapshot(conn), row_hash(conn, "activities")
    with db.connect() as other:
        other.execute("SET application_name = 'the_api_run'")
        with table_lock(other, QualifiedName("public", "activities"), what="prep"):
            with pytest.raises(TableBusyError, match=rf"pid {other.info.backend_pid}, application_name "
                               r"'the_api_run'"):
                ConvertPrepOperator(task_id="prep", **c).execute({})
            assert snapshot(conn) == before and row_hash(conn, "activities") == rows
    assert ConvertPrepOperator(task_id="prep", **c).execute({})["created"] is True  # free again


@pytest.mark.parametrize(("field", "value", "message"), [
    ("lock_timeout", "forever", "lock_timeout='forever' is not allowed"),
    ("lock_timeout", "-1s", "lock_timeout='-1s' is not allowed"),
    ("lock_retries", "0", "lock_retries='0' is out of range"),
])
def test_lock_params_are_refused_before_connecting(db, conn, field: str, value: str, message: str) -> None:
    from pg_partition.core.db.errors import InvalidInputError

    seed_activities(conn, "public.activities", rows=500, months=1)
    before = snapshot(conn)
    with pytest.raises(InvalidInputError, match=message):
        ConvertPrepOperator(task_id="prep", **(_common(db) | {field: value})).execute({})
    assert snapshot(conn) == before


def test_a_schema_error_fails_the_task_without_retry(db, conn) -> None:
    """Issue 16: a schema error was retried by Airflow for 7 minutes (task retries with backoff). It now raises
    AirflowFailException, which Airflow never retries; a lock timeout still raises its own (retryable) error."""
    from airflow.sdk.exceptions import AirflowFailException

    from pg_partition.operators.base import PartitionBaseOperator

    class _Alter(PartitionBaseOperator):
        def execute(self, context: Any) -> None:
            with self.connection() as c:
                self.sql_executor(c).run("ALTER TABLE public.no_such_table ADD COLUMN x int")

    conn.execute("CREATE TABLE present (id int)")
    base = {"conn_id": db.conn_id, "table": "public.present", "lock_timeout": "2s", "lock_retries": "1"}
    with pytest.raises(AirflowFailException, match=r"UndefinedTable \(SQLSTATE 42P01\).*no_such_table"):
        _Alter(task_id="alter", **base).execute({})

    class _Locked(PartitionBaseOperator):
        def execute(self, context: Any) -> None:
            with self.connection() as c:
                ex = self.sql_executor(c)
                ex.with_lock_timeout(lambda: ex.run("ALTER TABLE present ADD COLUMN y int"), lock_timeout="20ms",
                                     retries=1)

    with db.connect(autocommit=False) as holder:
        holder.execute("LOCK TABLE present IN ACCESS SHARE MODE")
        with pytest.raises(LockTimeoutExhausted):
            _Locked(task_id="locked", **base).execute({})
