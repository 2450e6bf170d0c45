"""Airflow DAG pg_partition_archive: archive detached partitions (and retired tables) to S3, verify, then drop.

Scheduled on the ARCHIVE_PENDING Asset that pg_partition_rotate emits; also runnable by hand with params
conn_ids / archive_retired. Queue rows carry their own policy from pg_partition.yaml; the params are defaults.
"""

import os

from pg_partition.dag_factory.archive import build_archive_dag

dag = build_archive_dag(
    bucket=os.environ.get("PG_PARTITION_S3_BUCKET", "pg-partition-archive"),
    aws_conn_id=os.environ.get("PG_PARTITION_AWS_CONN_ID", "aws_default"),
)
