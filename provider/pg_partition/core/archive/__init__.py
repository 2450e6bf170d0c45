"""Archive detached partitions to S3, verify them, drop them, and bring them back on demand.

Why it is built this way:

* **Streaming, bounded memory.** A partition can be hundreds of GB, and an Airflow worker has a few hundred MB.
  ``pg_dump --format=custom`` (or binary ``COPY ... TO STDOUT`` decoded into Arrow record batches by ADBC for
  Parquet, :mod:`arrow_copy`; text COPY for CSV) is read from a pipe in small chunks and
  pushed into an S3 multipart upload part by part; at most ``part_size * (max_inflight + 1)`` bytes are held,
  whatever the table size. The sha256 is computed on the same bytes while they stream, so there is never a local
  copy to hash afterwards (and never a local file an executor could lose).
* **One snapshot.** The row count recorded in the manifest is taken in the exported snapshot that ``pg_dump
  --snapshot`` (or our own ``COPY``, or the ADBC session that imports it) reads, so the manifest describes exactly
  the bytes in the object.
* **Verify, then drop.** An archive is only trusted after HEAD (size, ETag), a full streaming re-read (sha256),
  ``pg_restore --list`` (the dump is a readable archive with this table's data) and a row count (decoded from
  the object itself, compared with the manifest and with the live table). The DROP happens in its own short
  transaction, under ``lock_timeout``, after the live row count is checked once more under the lock.
* **Nothing orphaned, nothing lost.** A failed multipart upload is aborted (with retries); its id is also kept
  in the queue row so the next attempt aborts it if the worker was killed first. Any failure leaves the table in
  place and the queue row ``failed`` with ``last_error``: the next run retries it.
* **Restore is the same streams in reverse**: checksum first, then ``COPY`` into a standalone table holding a
  CHECK constraint that matches the partition bounds (so ``ATTACH PARTITION`` skips its validation scan), indexes
  built before the attach, and the attach itself under ``lock_timeout`` with retries.

Key layout (Hive style, queryable in place by Athena/Spark)::

    <prefix>/<database>/<schema>/<table>/period=<label>/<partition>.{dump|parquet|csv.gz}
    <prefix>/<database>/<schema>/<table>/period=<label>/_<partition>.<ext>.manifest.json

The manifest starts with ``_`` because Hive, Athena and Spark skip files whose names start with ``_`` or ``.``:
the manifest sits beside its object without being read as data.

No Airflow imports here: the S3 client is any object with boto3's S3 client methods (:class:`S3Client`).
"""

from __future__ import annotations

from pg_partition.core.archive import export, manifest, policy, queue, rds, readers, s3, tools, verify, write
from pg_partition.core.archive.manifest import get_manifest, put_manifest
from pg_partition.core.archive.policy import DEFAULT_PREFIX, FORMATS, MARKER, RESTORE_SCHEMA, ArchivePolicy
from pg_partition.core.archive.queue import (
    QueueRow,
    archive_queued,
    drop_archived,
    enqueue,
    enqueue_retired,
    pending_queue,
    queue_row,
)
from pg_partition.core.archive.rds import rds_export_sql
from pg_partition.core.archive.readers import parse_ident_list
from pg_partition.core.archive.restore import find_archives, locate_manifest, restore
from pg_partition.core.archive.s3 import (
    ArchiveTarget,
    MultipartUpload,
    S3Client,
    abort_stale_uploads,
    abort_upload,
    manifest_key_for,
    object_key,
    plan_keys,
)
from pg_partition.core.archive.tools import check_pg_dump, dump_pattern, find_pg_tool, pg_restore_for, tool_version
from pg_partition.core.archive.verify import verify_archive
from pg_partition.core.archive.write import archive_table

__all__ = [
    "DEFAULT_PREFIX",
    "FORMATS",
    "MARKER",
    "RESTORE_SCHEMA",
    "ArchivePolicy",
    "ArchiveTarget",
    "MultipartUpload",
    "QueueRow",
    "S3Client",
    "abort_stale_uploads",
    "abort_upload",
    "archive_queued",
    "archive_table",
    "check_pg_dump",
    "drop_archived",
    "dump_pattern",
    "enqueue",
    "enqueue_retired",
    "export",
    "find_archives",
    "find_pg_tool",
    "get_manifest",
    "locate_manifest",
    "manifest",
    "manifest_key_for",
    "object_key",
    "parse_ident_list",
    "pending_queue",
    "pg_restore_for",
    "plan_keys",
    "policy",
    "put_manifest",
    "queue",
    "queue_row",
    "rds",
    "rds_export_sql",
    "readers",
    "restore",
    "s3",
    "tool_version",
    "tools",
    "verify",
    "verify_archive",
    "write",
]
