"""pg_partition_archive and pg_partition_restore run end to end with dag.test() (real PostgreSQL, moto S3 over HTTP,
real Airflow task runner and metadata DB)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import Asset

from pg_partition.assets import ARCHIVE_PENDING
from pg_partition.core import archive
from pg_partition.core.db.catalog import QualifiedName, exists
from pg_partition.dag_factory.archive import conn_ids_from_events
from tests.support.archive import DETACHED, PARENT, partitioned_activities, row_hash


@dataclass
class Event:
    extra: dict[str, Any] = field(default_factory=dict)


def test_conn_ids_come_from_archive_events_and_params() -> None:
    events = {
        ARCHIVE_PENDING: [Event({"conn_ids": ["pg_b", "pg_a"]}), Event({"conn_ids": ["pg_a"]}), Event({})],
        Asset(name="something_else", uri="x://y"): [Event({"conn_ids": ["pg_other"]})],
    }
    assert conn_ids_from_events(events, ["pg_c"]) == ["pg_a", "pg_b", "pg_c"]
    assert conn_ids_from_events(None, []) == []


def test_archive_dag_then_restore_dag(db, conn, bucket, run_dag) -> None:
    # the policy as rotation writes it from pg_partition.yaml (every field present)
    s = partitioned_activities(conn, policy={"bucket": bucket.name, "aws_conn_id": bucket.conn_id,
                                             "format": "pg_dump", "prefix": "pg-partition", "drop": True})
    # a conversion's leftover: public.orders was swapped out as public.orders_retired
    conn.execute("CREATE TABLE public.orders_retired (id bigint PRIMARY KEY, note text)")
    conn.execute("INSERT INTO public.orders_retired SELECT g, 'n' || g FROM generate_series(1, 500) g")

    result = run_dag("pg_partition_archive", {
        "conn_ids": [db.conn_id], "archive_retired": ["public.orders"], "bucket": bucket.name,
        "aws_conn_id": bucket.conn_id, "max_lag_bytes": "1GB", "format": "parquet"})
    assert result.state == "success", result.task_states
    assert result.task_states["wait_for_replication_lag[0]"] == "success"
    archived = sorted((result.xcom("archive", i) for i in (0, 1)), key=lambda r: r["table"])
    assert [(r["table"], r["status"], r["format"]) for r in archived] == [
        ("pgpartition_archive.activities_202401", "dropped", "pg_dump"),  # the row's policy (pg_dump default) wins
        ("public.orders_retired", "dropped", "parquet"),  # no policy on the row: the DAG params apply
    ]
    assert not exists(conn, DETACHED) and not exists(conn, QualifiedName("public", "orders_retired"))
    keys = bucket.keys()
    assert f"pg-partition/{db.name}/public/activities/period=2024-01/activities_202401.dump" in keys
    assert any(k.startswith(f"pg-partition/{db.name}/public/orders/period=retired-") and
               k.endswith("/orders_retired.parquet") for k in keys)

    # nothing left to do: the archive task is mapped over zero rows
    again = run_dag("pg_partition_archive", {"conn_ids": [db.conn_id], "bucket": bucket.name,
                                             "aws_conn_id": bucket.conn_id})
    assert again.state == "success" and "archive" not in {k.split("[")[0] for k in again.returns}

    restored = run_dag("pg_partition_restore", {
        "conn_id": db.conn_id, "table": "public.activities", "period": "2024-01", "target": "attach",
        "bucket": bucket.name, "aws_conn_id": bucket.conn_id})
    assert restored.state == "success", restored.task_states
    assert restored.xcom("restore")["status"] == "restored"
    assert row_hash(conn, PARENT.sibling("activities_202401")) == s.hash
    assert row_hash(conn, PARENT) == s.parent_hash

    # the retired table, by its S3 URL, into a schema for ad-hoc queries
    key = next(k for k in keys if k.endswith("/orders_retired.parquet"))
    adhoc = run_dag("pg_partition_restore", {
        "conn_id": db.conn_id, "s3_key": f"s3://{bucket.name}/{key}", "target": "schema", "schema": "adhoc",
        "aws_conn_id": bucket.conn_id, "table": ""})
    assert adhoc.state == "success", adhoc.task_states
    assert conn.execute("SELECT count(*), sum(id) FROM adhoc.orders_retired").fetchone() == (500, 125250)


def test_restore_dag_fails_clearly_and_changes_nothing_on_a_corrupt_object(db, conn, bucket, run_dag) -> None:
    s = partitioned_activities(conn, policy={"bucket": bucket.name, "aws_conn_id": bucket.conn_id})
    from pg_partition.core.db.execute import Executor

    out = archive.archive_queued(Executor(conn), bucket.client(), s.queue_id)
    client = bucket.client()
    data = bytearray(client.get_object(Bucket=bucket.name, Key=out["key"])["Body"].read())
    data[100] ^= 0x01
    client.put_object(Bucket=bucket.name, Key=out["key"], Body=bytes(data))

    result = run_dag("pg_partition_restore", {"conn_id": db.conn_id, "s3_key": out["key"], "bucket": bucket.name,
                                              "aws_conn_id": bucket.conn_id})
    assert result.state == "failed" and result.task_states["restore"] == "failed"
    assert not exists(conn, PARENT.sibling("activities_202401"))
