"""Archive one table: snapshot, export, upload, manifest (stream mode)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pg_partition.core.archive.export import export_columns, snapshot, write_csv_gzip, write_parquet, write_pg_dump
from pg_partition.core.archive.manifest import put_manifest, table_ddl
from pg_partition.core.archive.policy import CONTENT_TYPES, MANIFEST_VERSION, ArchivePolicy
from pg_partition.core.archive.rds import archive_rds
from pg_partition.core.archive.s3 import ArchiveTarget, MultipartUpload, S3Client, plan_keys
from pg_partition.core.archive.tools import check_pg_dump, dump_pattern, server_version
from pg_partition.core.db import catalog
from pg_partition.core.db.capabilities import capabilities
from pg_partition.core.db.errors import (
    PartitionError,
    PreflightError,
    VerificationError,
)
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.partitions import (
    partition_column,
)

log = logging.getLogger("pg_partition")


# --------------------------------------------------------------------------------------------------- archive




def archive_table(
    ex: Executor,
    s3: S3Client,
    target: ArchiveTarget,
    policy: ArchivePolicy,
    *,
    pg_dump: str | None = None,
    lock_timeout: str = "2s",
    on_upload_started: Callable[[str, str], None] | None = None,
    resume_upload_id: str | None = None,
) -> dict[str, Any]:
    """Stream one table to S3 in ``policy.format`` and write its manifest; returns the manifest.

    Nothing is changed in the database. In dry-run mode only the plan is logged and returned.
    """
    conn = ex.conn
    table = target.table
    capabilities(conn).require_supported("archive")
    info = catalog.describe(conn, table)
    if info.is_partitioned:
        raise PreflightError(f"{table} is a partitioned table; archive its partitions one by one",
                             fix="archive the detached partitions (rotation queues them)")
    key, mkey = plan_keys(conn, target, policy)
    _, server_text = server_version(conn)
    tool = check_pg_dump(conn, pg_dump) if policy.object_format == "pg_dump" else None
    columns = export_columns(conn, table)
    bounds_column = None
    if target.parent is not None and catalog.exists(conn, target.parent):
        with contextlib.suppress(PartitionError):
            bounds_column = partition_column(catalog.describe(conn, target.parent))
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "format": policy.object_format,
        "bucket": policy.bucket,
        "key": key,
        "manifest_key": mkey,
        "database": str(conn.info.dbname),
        "table": {"schema": table.schema, "name": table.name},
        "parent": None if target.parent is None else {"schema": target.parent.schema, "name": target.parent.name},
        "bounds": {"column": bounds_column, "from": target.range_from, "to": target.range_to,
                   "period": target.period, "label": target.period_label()},
        "columns": [{"name": c.name, "type": c.pg_type, "not_null": c.not_null, "as_text": c.as_text}
                    for c in columns],
        "ddl": table_ddl(conn, info),
        "server_version": server_text,
        "server_version_num": catalog.server_version_num(conn),
        "pg_dump_version": tool.version if tool else None,
        "pg_dump_major": tool.major if tool else None,
        "sse": {"algorithm": policy.sse, "kms_key_id": policy.kms_key_id} if policy.sse else None,
        "storage_class": policy.storage_class,
        "table_bytes": info.sizes.total,
    }
    where = f"s3://{policy.bucket}/{key}"
    if ex.dry_run:
        what = {"pg_dump": f"{tool.path if tool else 'pg_dump'} --format=custom --table={dump_pattern(table)}",
                "parquet": "COPY (SELECT ...) TO STDOUT (FORMAT binary) -> ADBC Arrow batches -> Parquet",
                "csv": "COPY (SELECT ...) TO STDOUT (FORMAT csv, HEADER) -> gzip",
                "rds_csv": "aws_s3.query_export_to_s3 (server side)"}[policy.object_format]
        ex.logger.info("[dry run] would stream %s to %s (manifest %s)", what, where, mkey)
        return manifest | {"dry_run": True}
    if policy.mode == "rds":
        return archive_rds(ex, s3, target, policy, manifest)

    def started(upload_id: str) -> None:
        if on_upload_started:
            on_upload_started(key, upload_id)

    ex.logger.info("archiving %s (%s, about %s rows, %s bytes on disk) to %s", table, policy.format,
                   f"{info.row_estimate:,}", f"{info.sizes.total:,}", where)
    # pg_dump output can outrun one upload at a time; Parquet/CSV output is slower than S3, so one part in
    # flight keeps their memory (Arrow buffers already) lower at no cost in speed.
    inflight = policy.max_inflight if policy.format == "pg_dump" else 1
    # the part size is chosen once from the table's size (the 10,000-part limit holds up to S3's 5 TiB) and
    # parts above MEMORY_PART_LIMIT are spooled to disk: memory stays flat whatever the table size
    with MultipartUpload(s3, policy.bucket, key, part_size=policy.part_size, max_inflight=inflight,
                         expected_size=info.sizes.total, resume_upload_id=resume_upload_id,
                         put_args=policy.put_args(),
                         content_type=CONTENT_TYPES[policy.object_format],
                         on_start=started, logger=ex.logger) as sink, snapshot(conn, table) as (snap, rows):
        if policy.format == "pg_dump":
            assert tool is not None
            write_pg_dump(conn, table, sink, tool, snapshot=snap, compress=policy.compress,
                          lock_timeout=lock_timeout)
        elif policy.format == "parquet":
            written = write_parquet(conn, table, sink, columns, compression=policy.parquet_compression,
                                    snapshot=snap)
            if written != rows:
                raise VerificationError(f"Parquet export wrote {written} rows but the snapshot has {rows}",
                                        where=str(table))
        else:
            written = write_csv_gzip(conn, table, sink, columns)
            if written != rows:
                raise VerificationError(f"CSV export wrote {written} rows but the snapshot has {rows}",
                                        where=str(table))
        result = sink.complete()
    manifest.update(rows=rows, bytes=result.bytes, sha256=result.sha256, etag=result.etag, parts=result.parts,
                    created_at=datetime.now(timezone.utc).isoformat())
    put_manifest(s3, manifest, policy)
    ex.logger.info("archived %s: %s rows, %s bytes, sha256 %s -> %s", table, f"{rows:,}", f"{result.bytes:,}",
                   result.sha256, where)
    return manifest
