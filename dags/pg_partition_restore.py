"""Airflow DAG pg_partition_restore: bring an archived partition back from S3 (checksum verified first).

Params: conn_id, table + period (or s3_key), target attach|schema.
"""

import os

from pg_partition.dag_factory.archive import build_restore_dag

dag = build_restore_dag(
    bucket=os.environ.get("PG_PARTITION_S3_BUCKET", "pg-partition-archive"),
    aws_conn_id=os.environ.get("PG_PARTITION_AWS_CONN_ID", "aws_default"),
)
