"""pg_partition_convert in gentle mode through dag.test(): ``throttle_ratio`` set, capture on, an application
writing (mirrored into a truth table) during the whole run.

The run succeeds; plan_fill recorded the canary's baseline once in the conversion's state (so the mapped fills,
replay, index builds and verify, each a separate task process, compare against the same number); the swap
replayed the backlog right before its lock; nothing is lost (row for row against the truth table).
"""

from __future__ import annotations

from typing import Any

from pg_partition.core.convert import throttle
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from tests.support.convert import row_hash
from tests.support.writers import MirroredWriter
from tools.seed import seed_activities

DAG_ID = "pg_partition_convert"
TABLE = QualifiedName("public", "activities")
ROWS = 12_000


def _conf(db: Any, **extra: Any) -> dict[str, Any]:
    return {"conn_id": db.conn_id, "table": str(TABLE), "column": "created_at", "period": "month", "future": 2,
            "cover_data": True, "batch_size": 3_000, "lock_timeout": "2s", "lock_retries": 10, **extra}


def test_gentle_mode_records_one_baseline_paces_every_step_and_loses_nothing(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=ROWS, months=4, timestamptz=True)
    conn.execute("CREATE TABLE truth AS SELECT * FROM activities")
    writer = MirroredWriter(db.dsn, rate=30, high=ROWS)
    writer.start()
    try:
        result = run_dag(DAG_ID, _conf(db, capture_changes="on", throttle_ratio=1.5))
    finally:
        writer.stop_event.set()
        writer.join(30)
    assert not writer.errors, writer.errors
    assert result.state == "success", result.task_states
    assert catalog.describe(conn, TABLE).is_partitioned
    assert row_hash(conn, "activities") == row_hash(conn, "truth")
    baseline = throttle.recorded_baseline(conn, ConvertSpec.create(str(TABLE), "created_at"))
    assert baseline is not None and baseline["p99_ms"] > 0 and baseline["samples"] >= 10
    assert "activities" in baseline["query"]
    swap = result.xcom("swap")
    assert swap["drain_before_lock"] is not None and swap["lock_ms"] > 0
    assert result.xcom("verify")["ok"] is True
