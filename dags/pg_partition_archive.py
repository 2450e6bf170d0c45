"""Airflow DAG pg_partition_archive: archive detached partitions (and retired tables) to S3, verify, then drop.

Scheduled on the ARCHIVE_PENDING Asset that pg_partition_rotate emits; also runnable by hand with params
conn_ids / archive_retired. Queue rows carry their own policy from pg_partition.yaml; the params are defaults
(bucket and AWS connection: [pg_partition] default_bucket / default_aws_conn_id in airflow.cfg).
"""

from pg_partition import settings
from pg_partition.dag_factory.archive import build_archive_dag

dag = build_archive_dag(bucket=settings.default_bucket(), aws_conn_id=settings.default_aws_conn_id())
