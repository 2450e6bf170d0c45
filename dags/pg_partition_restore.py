"""Airflow DAG pg_partition_restore: bring an archived partition back from S3 (checksum verified first).

Params: conn_id, table + period (or s3_key), target attach|schema.
"""

from pg_partition import settings
from pg_partition.dag_factory.archive import build_restore_dag

dag = build_restore_dag(bucket=settings.default_bucket(), aws_conn_id=settings.default_aws_conn_id())
