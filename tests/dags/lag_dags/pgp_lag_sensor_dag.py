"""Test DAG for tests/dags/test_lag_scheduler.py: one deferrable ReplicationLagSensor, run by a real scheduler.

Its arguments are templated from DAG params exactly as pg_partition_convert wires them (``{{ params.x }}`` renders
None as "None" and lists as "['a']", which the sensor parses). The connection id default comes from the
environment the test gives the scheduler's processes; ``schedule="@once"`` makes the scheduler start a run as
soon as the DAG is parsed.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, Param

from pg_partition.sensors.lag import ReplicationLagSensor

with DAG(
    dag_id="pgp_lag_sensor_test",
    schedule="@once",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    is_paused_upon_creation=False,
    tags=["pg-partition-test"],
    params={
        "conn_id": Param(os.environ.get("PGP_LAG_TEST_CONN_ID", "postgres_default"), type="string"),
        "max_lag_bytes": Param(1024 * 1024, type=["null", "integer"], minimum=0),
        "max_lag_seconds": Param(None, type=["null", "number"], minimum=0),
        "watch_slots": Param([], type=["null", "array"], items={"type": "string"}),
    },
):
    ReplicationLagSensor(
        task_id="wait_for_replicas",
        conn_id="{{ params.conn_id }}",
        max_lag_bytes="{{ params.max_lag_bytes }}",
        max_lag_seconds="{{ params.max_lag_seconds }}",
        watch_slots="{{ params.watch_slots }}",
        standbys=["standby1"],
        deferrable=True,  # explicit: the sensor otherwise follows [operators] default_deferrable
        poke_interval=1,
        timeout=600,
    )
