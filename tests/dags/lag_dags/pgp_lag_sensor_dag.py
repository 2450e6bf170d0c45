"""Test DAG for tests/dags/test_lag_scheduler.py: one deferrable ReplicationLagSensor, run by a real scheduler.

The connection id and thresholds come from the environment the test gives the scheduler's processes, so the DAG
file stays static; ``schedule="@once"`` makes the scheduler start a run as soon as the DAG is parsed.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG

from pg_partition.sensors.lag import ReplicationLagSensor

with DAG(
    dag_id="pgp_lag_sensor_test",
    schedule="@once",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    is_paused_upon_creation=False,
    tags=["pg-partition-test"],
):
    ReplicationLagSensor(
        task_id="wait_for_replicas",
        conn_id=os.environ.get("PGP_LAG_TEST_CONN_ID", "postgres_default"),
        max_lag_bytes=os.environ.get("PGP_LAG_TEST_MAX_LAG_BYTES", "1MB"),
        standbys=["standby1"],
        watch_slots=[],
        poke_interval=1,
        timeout=600,
    )
