"""Archive and restore operators: thin wrappers over :mod:`pg_partition.core.archive`.

The S3 client comes from the Airflow AWS connection (``S3Hook(aws_conn_id=...).get_conn()``), so credentials and
a custom endpoint (``extra.endpoint_url``: MinIO, moto, a VPC endpoint) are configured once, in Airflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.sdk import Context

from pg_partition.core import archive
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.params import is_none, parse_bool
from pg_partition.operators.base import PartitionBaseOperator

DEFAULT_AWS_CONN_ID = "aws_default"




def s3_client(aws_conn_id: str) -> Any:
    """A boto3 S3 client built from an Airflow AWS connection (endpoint, region, credentials)."""
    return S3Hook(aws_conn_id=aws_conn_id).get_conn()


class ArchivePartitionOperator(PartitionBaseOperator):
    """Archive one ``archive_queue`` row: stream to S3, verify, then drop (or keep) the table.

    Arguments other than ``conn_id``/``queue_id`` are defaults: the queue row's own ``policy`` (written by
    rotation from the fleet config) takes precedence, including its ``aws_conn_id``. Failures leave the table in
    place and the row ``failed`` (the next run retries it) and fail the task.

    :param queue_id: id in the state schema's ``archive_queue``.
    :param table: informational (the DAG passes the queued table, so logs and the grid name it).
    """

    template_fields: Sequence[str] = (*PartitionBaseOperator.template_fields, "queue_id", "aws_conn_id", "bucket",
                                      "prefix", "format", "drop", "sse", "kms_key_id", "pg_dump", "pg_restore")
    map_index_template = "{{ task.table }}"
    ui_color = "#e2d9f3"

    def __init__(self, *, conn_id: str, queue_id: int | str, table: str = "",
                 aws_conn_id: str = DEFAULT_AWS_CONN_ID, bucket: str | None = None, prefix: str | None = None,
                 format: str | None = None, drop: bool | str | None = None, sse: str | None = None,
                 kms_key_id: str | None = None, pg_dump: str | None = None, pg_restore: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(conn_id=conn_id, table=table, **kwargs)
        self.queue_id = queue_id
        self.aws_conn_id = aws_conn_id
        self.bucket = bucket
        self.prefix = prefix
        self.format = format
        self.drop = drop
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.pg_dump = pg_dump
        self.pg_restore = pg_restore

    def defaults(self) -> dict[str, Any]:
        values = {"bucket": self.bucket, "prefix": self.prefix, "format": self.format,
                  "drop": None if is_none(self.drop) else parse_bool(self.drop, what="drop"), "sse": self.sse,
                  "kms_key_id": self.kms_key_id, "aws_conn_id": self.aws_conn_id}
        return {k: v for k, v in values.items() if not is_none(v)}

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            queue_id = int(self.queue_id)
        except (TypeError, ValueError):
            raise InvalidInputError(f"queue_id={self.queue_id!r} is not an archive queue id",
                                    fix="pass the integer id of a pgpartition.archive_queue row") from None
        with self.connection() as conn:
            row = archive.queue_row(conn, queue_id)
            self.table = str(row.table)
            policy = row.archive.get("policy") or {}
            aws_conn_id = policy.get("aws_conn_id") or self.aws_conn_id or DEFAULT_AWS_CONN_ID
            self.log.info("archive queue row %s: %s (status %s, attempt %s) via AWS connection %s", queue_id,
                          row.table, row.status, row.attempts + 1, aws_conn_id)
            result = archive.archive_queued(
                self.sql_executor(conn), s3_client(aws_conn_id), queue_id, defaults=self.defaults(),
                pg_dump=None if is_none(self.pg_dump) else self.pg_dump,
                pg_restore=None if is_none(self.pg_restore) else self.pg_restore,
                lock_timeout=str(self.lock_timeout), retries=int(self.lock_retries))
        return result | {"conn_id": self.conn_id}


class RestorePartitionOperator(PartitionBaseOperator):
    """Restore an archived partition: ``attach`` it back to its parent, or load it into ``schema``.

    Find the archive by ``s3_key`` (an object or manifest key, or ``s3://bucket/key``), or by ``table`` (the
    partitioned parent, ``schema.table``) and ``period`` (its Hive label, e.g. ``2024-01``). The checksum is
    verified before anything is created; overlapping bounds are refused with nothing changed.
    """

    template_fields: Sequence[str] = (*PartitionBaseOperator.template_fields, "period", "s3_key", "target",
                                      "schema", "bucket", "prefix", "format", "aws_conn_id", "pg_restore")
    ui_color = "#d9f3e2"

    def __init__(self, *, conn_id: str, table: str = "", period: str | None = None, s3_key: str | None = None,
                 target: str = "attach", schema: str | None = None, bucket: str | None = None,
                 prefix: str | None = None, format: str | None = None, aws_conn_id: str = DEFAULT_AWS_CONN_ID,
                 pg_restore: str | None = None, **kwargs: Any) -> None:
        super().__init__(conn_id=conn_id, table=table, **kwargs)
        self.period = period
        self.s3_key = s3_key
        self.target = target
        self.schema = schema
        self.bucket = bucket
        self.prefix = prefix
        self.format = format
        self.aws_conn_id = aws_conn_id
        self.pg_restore = pg_restore

    def location(self) -> tuple[str, str | None]:
        """(bucket, key) from ``s3_key`` (``s3://bucket/key`` or a key in ``bucket``)."""
        bucket = None if is_none(self.bucket) else str(self.bucket)
        key = None if is_none(self.s3_key) else str(self.s3_key).strip()
        if key and key.startswith("s3://"):
            bucket, _, key = key[len("s3://"):].partition("/")
        if not bucket:
            raise InvalidInputError("no S3 bucket to restore from", where=f"task {self.task_id}",
                                    fix="pass bucket, or s3_key as s3://bucket/key")
        return bucket, key

    def execute(self, context: Context) -> dict[str, Any]:
        bucket, key = self.location()
        target = str(self.target or "attach").strip().lower()
        table = None if is_none(self.table) else QualifiedName.parse(str(self.table))
        s3 = s3_client(str(self.aws_conn_id or DEFAULT_AWS_CONN_ID))
        with self.connection() as conn:
            manifest = archive.locate_manifest(
                s3, bucket, key=key, prefix=str(self.prefix) if not is_none(self.prefix) else archive.DEFAULT_PREFIX,
                database=str(conn.info.dbname), table=table, period=None if is_none(self.period) else str(self.period),
                format=None if is_none(self.format) else str(self.format))
            self.log.info("restoring s3://%s/%s (%s, %s rows, sha256 %s) -> %s", bucket, manifest["key"],
                          manifest["format"], manifest["rows"], manifest["sha256"], target)
            result = archive.restore(
                self.sql_executor(conn), s3, manifest, target=target,
                parent=table if target == "attach" else None,
                schema=None if is_none(self.schema) else str(self.schema),
                pg_restore=None if is_none(self.pg_restore) else str(self.pg_restore),
                lock_timeout=str(self.lock_timeout), retries=int(self.lock_retries))
        return result | {"conn_id": self.conn_id, "bucket": bucket}
