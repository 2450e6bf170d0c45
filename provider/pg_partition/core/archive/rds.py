"""RDS/Aurora mode: the server exports with aws_s3.query_export_to_s3 (CSV only)."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from typing import Any

from psycopg import sql

from pg_partition.core.archive.export import snapshot
from pg_partition.core.archive.manifest import put_manifest
from pg_partition.core.archive.policy import ArchivePolicy
from pg_partition.core.archive.readers import s3_chunks
from pg_partition.core.archive.s3 import ArchiveTarget, S3Client
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import (
    VerificationError,
)
from pg_partition.core.db.execute import Executor

log = logging.getLogger("pg_partition")


# --------------------------------------------------------------------------------------------------- RDS mode


def rds_export_sql(table: QualifiedName, bucket: str, key: str, region: str, *, columns: list[str] | None = None,
                   kms_key_id: str | None = None) -> sql.Composed:
    """``aws_s3.query_export_to_s3`` for a server-side CSV export on RDS/Aurora PostgreSQL.

    The server itself writes to S3 (the instance role needs s3:PutObject), so no bytes pass through the worker.
    It writes uncompressed CSV; objects above 6 GB are split by RDS into ``<key>_part2``, ``_part3``, ...
    Runs inside the same exported snapshot as our row count (the caller's REPEATABLE READ transaction).
    """
    cols = sql.SQL(", ").join(map(sql.Identifier, columns)) if columns else sql.SQL("*")
    inner = sql.SQL("SELECT {} FROM {}").format(cols, table.ident)
    args = [
        sql.SQL("aws_commons.create_s3_uri({}, {}, {})").format(sql.Literal(bucket), sql.Literal(key),
                                                                sql.Literal(region)),
        sql.SQL("options := {}").format(sql.Literal("format csv, header true")),
    ]
    if kms_key_id:
        args.append(sql.SQL("kms_key := {}").format(sql.Literal(kms_key_id)))
    # The query argument is a text literal; psycopg's Literal escapes it, so names cannot break out.
    return sql.SQL("SELECT rows_uploaded, files_uploaded, bytes_uploaded FROM aws_s3.query_export_to_s3({}, {})"
                   ).format(sql.Literal(inner.as_string()), sql.SQL(", ").join(args))


def archive_rds(ex: Executor, s3: S3Client, target: ArchiveTarget, policy: ArchivePolicy,
                 manifest: dict[str, Any]) -> dict[str, Any]:
    """Server-side export (RDS/Aurora), then read the object back once to record its size and sha256.

    Not runnable outside RDS (the aws_s3 extension only exists there); covered here by tests of the SQL only.
    """
    region = policy.region or "us-east-1"
    cols = [c["name"] for c in manifest["columns"]]
    stmt = rds_export_sql(target.table, policy.bucket, manifest["key"], region, columns=cols,
                          kms_key_id=policy.kms_key_id)
    with snapshot(ex.conn, target.table) as (_, rows):
        cur = ex.run(stmt)
        assert cur is not None
        uploaded, files, nbytes = cur.fetchone() or (0, 0, 0)
    if int(uploaded) != rows or int(files) != 1:
        raise VerificationError(
            f"aws_s3.query_export_to_s3 reported {uploaded} rows in {files} file(s); expected {rows} in 1",
            where=str(target.table), fix="objects above 6 GB are split by RDS; use mode=stream for those")
    sha = hashlib.sha256()
    size = 0
    for chunk in s3_chunks(s3, policy.bucket, manifest["key"]):
        sha.update(chunk)
        size += len(chunk)
    head = s3.head_object(Bucket=policy.bucket, Key=manifest["key"])
    manifest.update(rows=rows, bytes=size, sha256=sha.hexdigest(), etag=str(head.get("ETag", "")).strip('"'),
                    parts=None, created_at=datetime.now(timezone.utc).isoformat(), rds_bytes_uploaded=nbytes)
    put_manifest(s3, manifest, policy)
    return manifest
