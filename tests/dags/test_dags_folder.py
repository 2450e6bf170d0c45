"""The deployable dags/ folder: imports cleanly, and the advisor DAG runs end to end against real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tools.seed import seed_activities


def test_dags_folder_has_no_import_errors(airflow_db: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert "pg_partition_advisor" in bag.dags and "pg_partition_cost_report" in bag.dags
    for dag in bag.dags.values():
        assert "pg-partition" in dag.tags


def test_provider_is_registered() -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "airflow"), "providers", "list", "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    assert "airflow-provider-pg-partition" in out


def test_advisor_dag_reports_size_and_candidacy(db, conn, run_dag) -> None:
    seed_activities(conn, "public.activities", rows=30_000)
    conn.execute("SELECT pg_stat_force_next_flush()")  # counters reach pg_stat_user_tables asynchronously
    result = run_dag("pg_partition_advisor", {"conn_id": db.conn_id, "table": "public.activities",
                                              "memory_gb": 0.001, "min_gb": 100})
    assert result.state == "success", result.task_states
    report = result.xcom("assess")
    assert report["rows_estimate"] == 30_000
    assert report["integer_key"] == "id" and "created_at" in report["time_columns"]
    assert report["candidate"] is True and report["append_only"] is True
    assert 1000 <= report["rows_per_month"] <= 1250  # 30k rows over 26 months
    assert report["scope"] == "table" and report["write_pattern"] == "append-only"
    assert len(report["create_indexes"]) == 5
    assert report["convert_params"]["table"] == "public.activities"
    assert report["config_entry"]["column"] == "created_at"


def test_advisor_dag_surveys_the_database_without_a_table(db, conn, run_dag) -> None:
    seed_activities(conn, "public.activities", rows=5_000)
    seed_activities(conn, "app.small", rows=10)
    result = run_dag("pg_partition_advisor", {"conn_id": db.conn_id, "memory_gb": 0.001})
    assert result.state == "success", result.task_states
    report = result.xcom("assess")
    assert report["scope"] == "database" and report["tables_total"] == 2
    assert [t["table"] for t in report["tables"]] == ["public.activities", "app.small"]
    assert report["candidates"] == ["public.activities"]
    assert list(report["convert_params"]) == ["public.activities"]
    assert "table: public.activities" in report["config_yaml"]


def test_advisor_dag_refuses_table_scope_without_table(db, run_dag) -> None:
    result = run_dag("pg_partition_advisor", {"conn_id": db.conn_id, "scope": "table"})
    assert result.state == "failed" and result.task_states["assess"] == "failed"


def test_advisor_dag_fails_clearly_on_missing_table(db, run_dag) -> None:
    result = run_dag("pg_partition_advisor", {"conn_id": db.conn_id, "table": "public.nope"})
    assert result.state == "failed"
    assert result.task_states["assess"] == "failed"
