"""The pg_partition_convert DAG end to end with dag.test(): mapped fill per partition, swap, report; a dry run
that changes nothing; a preflight refusal that stops the run before anything changes. Change capture and lag
gating through the same DAG: tests/dags/test_convert_capture_dag.py."""

from __future__ import annotations

from typing import Any

from pg_partition.core.db.catalog import QualifiedName
from tests.support.convert import row_hash, snapshot
from tools.seed import seed_activities

DAG_ID = "pg_partition_convert"


def _conf(db: Any, **extra: Any) -> dict[str, Any]:
    return {"conn_id": db.conn_id, "table": "public.activities", "column": "created_at", "period": "month",
            "future": 2, "cover_data": True, "batch_size": 2_000, **extra}


def test_convert_dag_end_to_end(db, conn, run_dag) -> None:
    seed_activities(conn, QualifiedName("public", "activities"), rows=20_000, timestamptz=True)
    before = row_hash(conn, "activities")
    result = run_dag(DAG_ID, _conf(db, defer_indexes=True, where="created_at > '2000-01-01'",
                                   capture_changes="off"))
    assert result.state == "success", result.task_states
    # append-only mode (the explicit opt-in a where filter needs): replay skips, verify (after a catch-up) still
    # gates the swap, and after_swap catches up
    capture_tasks = {"replay"}  # the only node skipped in append-only mode
    assert {result.task_states[t] for t in capture_tasks} == {"skipped"}, result.task_states
    assert {v for k, v in result.task_states.items() if k not in capture_tasks} == {"success"}, result.task_states
    # 20k rows in 26+ partitions: one fill task covers them all (labelled with the partitions it covers), filling
    # them one by one with their own checkpoints
    groups = result.xcom("plan_fill")
    fills = [k for k in result.task_states if k.startswith("fill[")]
    assert len(groups) == 1 and len(fills) == 1, fills
    assert len(groups[0]["items"]) >= 26 and groups[0]["key"].endswith(f"({len(groups[0]['items'])} partitions)")
    filled = result.xcom("fill", 0)
    assert filled["rows"] == 20_000 and len(filled["items"]) == len(groups[0]["items"])
    assert {it["key"] for it in filled["items"]} == {it["key"] for it in groups[0]["items"]}
    assert filled["lag_gate"] == {"ok": True, "gated": False}  # no lag limit given: nothing measured
    assert row_hash(conn, "activities") == before == row_hash(conn, "activities_retired")
    report = result.xcom("report")
    assert report["swapped"] is True and report["after"]["rows"] == 20_000
    assert report["swap"]["lock_ms"] > 0
    assert {"prep", "swap", "indexes", "analyze"} <= set(report["timings"])
    # the report ends with totals and next steps; each fill logged the overall progress of the conversion
    assert report["summary"][0].startswith("totals: 20,000 rows copied by the fill (20,000 rows in "), report
    assert "fill time" in report["summary"][0] and "total time" in report["summary"][0]
    assert "next steps:" in report["summary"] and any("archive_retired" in line for line in report["summary"])
    overall = filled["overall"]
    assert overall["total"] == overall["done"] == len(groups[0]["items"]) and overall["rows"] == 20_000
    assert "analyze" not in result.xcom("indexes")  # ANALYZE runs alongside verify, not after the index builds
    assert result.xcom("verify")["analyzed"]["partitions"] >= 26
    assert result.xcom("preflight")["rows"] == 20_000
    assert result.xcom("after_swap")["mode"] == "catch_up"
    assert len({k.split("[")[0] for k in result.task_states}) == 11
    # triggering it again after a finished conversion is refused by preflight, nothing else runs
    again = run_dag(DAG_ID, _conf(db))
    assert again.state == "failed" and again.task_states["preflight"] == "failed"
    assert again.task_states.get("prep") in ("upstream_failed", None)
    assert row_hash(conn, "activities") == before


def test_convert_dag_dry_run_changes_nothing(db, conn, run_dag) -> None:
    seed_activities(conn, QualifiedName("public", "activities"), rows=3_000, timestamptz=True)
    before, hashed = snapshot(conn), row_hash(conn, "activities")
    result = run_dag(DAG_ID, _conf(db, dry_run=True, default_partition=True))
    assert result.state == "success", result.task_states
    assert snapshot(conn) == before and row_hash(conn, "activities") == hashed


def test_convert_dag_preflight_refusal_stops_the_run(db, conn, run_dag) -> None:
    conn.execute("CREATE TABLE activities (id bigint, created_at timestamptz NOT NULL)")  # no primary key
    before = snapshot(conn)
    result = run_dag(DAG_ID, _conf(db))
    assert result.state == "failed" and result.task_states["preflight"] == "failed"
    assert snapshot(conn) == before
