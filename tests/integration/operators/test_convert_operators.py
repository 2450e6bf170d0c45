"""The conversion operators one by one, through a real Airflow connection to a real database."""

from __future__ import annotations

from typing import Any

import pytest

from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import PreflightError, StateError
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
    items = ConvertPlanFillOperator(task_id="plan", where="", batch_size="1000", start="None", stop="",
                                    **c).execute({})
    assert items and all({"key", "lo", "hi", "target"} <= set(i) for i in items)
    for item in items:
        done = ConvertFillOperator(task_id="fill", item=item, batch_size="None", sleep_seconds="0",
                                   max_lag_bytes="None", max_lag_seconds="", **c).execute({})
        assert done["key"] == item["key"]
    again = ConvertFillOperator(task_id="fill", item=items[0], **c).execute({})
    assert again["resumed"] is True and again["batches"] == 0
    built = ConvertIndexesOperator(task_id="indexes", **c).execute({})
    assert len(built["indexes"]) == 4
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
