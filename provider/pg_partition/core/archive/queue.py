"""The archive queue: detached or retired tables waiting for a verified archive, and the archive run over it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pg_partition.core.archive.policy import DONE, ArchivePolicy
from pg_partition.core.archive.s3 import ArchiveTarget, S3Client, abort_stale_uploads, abort_upload, plan_keys
from pg_partition.core.archive.verify import verify_archive
from pg_partition.core.archive.write import archive_table
from pg_partition.core.db import catalog, state
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import (
    InvalidInputError,
    PreflightError,
    StateError,
    VerificationError,
)
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import heavy_step, locks_table, table_lock
from pg_partition.core.db.names import derived_name
from pg_partition.core.db.partitions import partition_column

log = logging.getLogger("pg_partition")


# --------------------------------------------------------------------------------------------------- queue


@dataclass(frozen=True)
class QueueRow:
    id: int
    schema_name: str
    table_name: str
    parent_schema: str | None
    parent_table: str | None
    range_from: str | None
    range_to: str | None
    period: str | None
    label: str | None
    status: str
    attempts: int
    last_error: str | None
    archive: dict[str, Any]

    @property
    def table(self) -> QualifiedName:
        return QualifiedName(self.schema_name, self.table_name)

    @property
    def target(self) -> ArchiveTarget:
        parent = None
        if self.parent_schema and self.parent_table:
            parent = QualifiedName(self.parent_schema, self.parent_table)
        return ArchiveTarget(self.table, parent, self.range_from, self.range_to, self.period, self.label)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "archive"} | {"table": str(self.table)}


_QUEUE_COLS = sql.SQL(
    "id, schema_name, table_name, parent_schema, parent_table, range_from, range_to, period, label, status, "
    "attempts, last_error, archive")


def _queue_row(r: tuple[Any, ...]) -> QueueRow:
    return QueueRow(id=int(r[0]), schema_name=r[1], table_name=r[2], parent_schema=r[3], parent_table=r[4],
                    range_from=r[5], range_to=r[6], period=r[7], label=r[8], status=r[9], attempts=int(r[10]),
                    last_error=r[11], archive=dict(r[12] or {}))


def queue_row(conn: psycopg.Connection[Any], queue_id: int) -> QueueRow:
    row = conn.execute(sql.SQL("SELECT {} FROM {} WHERE id = %s").format(_QUEUE_COLS, state.QUEUE),
                       (queue_id,)).fetchone()
    if row is None:
        raise InvalidInputError(f"archive queue row {queue_id} does not exist",
                                fix="list pending rows with pending_queue()")
    return _queue_row(row)


def pending_queue(conn: psycopg.Connection[Any]) -> list[QueueRow]:
    """Rows that still need work: pending, failed (retried), or interrupted mid-way (uploading/uploaded/verified)."""
    state.ensure_schema(conn)
    rows = conn.execute(sql.SQL(
        "SELECT {} FROM {} WHERE status NOT IN ('dropped', 'kept', 'restored') ORDER BY id"
    ).format(_QUEUE_COLS, state.QUEUE)).fetchall()
    return [_queue_row(r) for r in rows]


def enqueue(conn: psycopg.Connection[Any], table: QualifiedName, *, parent: QualifiedName | None = None,
            range_from: str | None = None, range_to: str | None = None, period: str | None = None,
            label: str | None = None, policy: Mapping[str, Any] | None = None) -> int:
    """Queue a table for archiving (rotation does this for detached partitions). Idempotent per table.

    A row already ``dropped`` whose table exists again (a new table with the same name) is reset to pending.
    """
    state.ensure_schema(conn)
    archive = {"policy": dict(policy)} if policy else {}
    row = conn.execute(sql.SQL(
        """INSERT INTO {}
               (schema_name, table_name, parent_schema, parent_table, range_from, range_to, period, label, archive)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (schema_name, table_name) DO UPDATE SET updated_at = now()
           RETURNING id, status""").format(state.QUEUE),
        (table.schema, table.name, parent.schema if parent else None, parent.name if parent else None,
         range_from, range_to, period, label, Jsonb(archive)),
    ).fetchone()
    assert row is not None
    queue_id, status = int(row[0]), str(row[1])
    if status == "dropped" and catalog.exists(conn, table):
        conn.execute(sql.SQL("""UPDATE {} SET status = 'pending', attempts = 0, last_error = NULL,
                               label = coalesce(%s, label), archive = %s, updated_at = now() WHERE id = %s"""
                             ).format(state.QUEUE),
                     (label, Jsonb(archive), queue_id))
    return queue_id


def _refuse_rows_left_behind(conn: psycopg.Connection[Any], retired: QualifiedName, table: QualifiedName) -> None:
    """Archiving ``<table>_retired`` ends with dropping it, so it must not hold a row the new table cannot have:
    one above the highest partition, or with a NULL partition column, while the new table has no DEFAULT
    partition (rows below the lowest partition may have been archived by rotation, so they are not counted)."""
    if not catalog.exists(conn, table):
        return
    info = catalog.describe(conn, table)
    if not info.is_partitioned or info.default_partition is not None:
        return
    column = partition_column(info)
    col = catalog.describe(conn, retired).column(column)
    if col is None:
        return
    tops = [p.range_to for p in info.partitions if p.range_to is not None]
    c = sql.Identifier(column)
    above = sql.SQL(" OR {} >= (SELECT max(x) FROM unnest({}::{}[]) x)").format(
        c, sql.Literal(tops), sql.SQL(col.type)) if tops else sql.SQL(" OR true")
    row = conn.execute(sql.SQL(
        "SELECT count(*), min({c})::text, max({c})::text FROM {r} WHERE {c} IS NULL{above}").format(
        c=c, r=retired.ident, above=above)).fetchone()
    if row and row[0]:
        raise StateError(
            f"{retired} holds {row[0]} row(s) that no partition of {table} can hold ({column} from {row[1]} to "
            f"{row[2]}, or NULL): archiving would drop them", where=str(retired),
            fix=f"add partitions to {table} for them (or a DEFAULT partition) and copy them over (catch_up), then "
            "queue the retired table again")


def enqueue_retired(conn: psycopg.Connection[Any], table: QualifiedName | str,
                    policy: Mapping[str, Any] | None = None) -> int | None:
    """Queue ``<table>_retired`` (the original table a conversion swapped out) if it exists; its id or None."""
    name = QualifiedName.parse(table) if isinstance(table, str) else table
    retired = name.sibling(derived_name(name.name, "retired"))
    if not catalog.exists(conn, retired):
        return None
    _refuse_rows_left_behind(conn, retired, name)
    label = "retired-" + datetime.now(timezone.utc).strftime("%Y%m%d")
    return enqueue(conn, retired, parent=name, label=label, policy=policy)


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def update(conn: psycopg.Connection[Any], queue_id: int, *, status: str | None = None,
            patch: Mapping[str, Any] | None = None, remove: Iterable[str] = (), error: str | None = None,
            clear_error: bool = False, attempt: bool = False) -> None:
    conn.execute(sql.SQL(
        """UPDATE {} SET
               status = coalesce(%(status)s, status),
               archive = (archive - %(remove)s::text[]) || %(patch)s,
               last_error = CASE WHEN %(clear)s THEN NULL ELSE coalesce(%(error)s, last_error) END,
               attempts = attempts + %(inc)s,
               updated_at = now()
           WHERE id = %(id)s""").format(state.QUEUE),
        {"status": status, "remove": list(remove), "patch": Jsonb(dict(patch or {})), "error": error,
         "clear": clear_error, "inc": 1 if attempt else 0, "id": queue_id},
    )


@contextlib.contextmanager
def _claim(conn: psycopg.Connection[Any], queue_id: int) -> Iterator[None]:
    """A session advisory lock on the queue row: two workers never archive the same table at once.

    Session-level (not a row lock) so status updates can commit while it is held; released if the worker dies.
    """
    key = f"pg_partition.archive:{queue_id}"
    got = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()
    if not got or not got[0]:
        raise StateError(f"archive queue row {queue_id} is being processed by another worker",
                         fix="wait for that task to finish; this one can be retried safely")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))


def check_queued_table(conn: psycopg.Connection[Any], row: QueueRow) -> None:
    """Re-check a queue row against the catalog before its table is uploaded or dropped.

    Only a table this product detached or retired qualifies: a plain table (not a partition, not partitioned)
    owned by the running role, which is either ``<parent>_retired`` beside its parent (a conversion's original
    table) or sits in a schema other than its parent's that the running role owns (the archive schema rotation
    moves detached partitions to). A row naming anything else was not written by pg-partition."""
    info = conn.execute(
        """SELECT c.relkind, c.relispartition, pg_get_userbyid(c.relowner),
                  c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user),
                  n.nspowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s""", (row.schema_name, row.table_name)).fetchone()
    fix = ("delete this archive_queue row (it was not written by pg-partition) and check who can write to the "
           f"{state.SCHEMA} schema; only tables rotation detached or a conversion retired are archived")
    if info is None:
        return  # the caller reports a missing table with its own message
    relkind, is_partition, owner, mine, schema_mine = info
    if relkind != "r" or is_partition:
        raise StateError(f"archive queue row {row.id} names {row.table}, which is not a detached table "
                         f"(relkind {relkind}{', attached as a partition' if is_partition else ''}); refusing to "
                         "archive or drop it", fix=fix)
    if not mine:
        raise StateError(f"archive queue row {row.id} names {row.table}, owned by {owner}, not by the role running "
                         "pg-partition; refusing to archive or drop it", fix=fix)
    retired = bool(row.parent_schema and row.parent_table and row.schema_name == row.parent_schema
                   and row.table_name == derived_name(row.parent_table, "retired"))
    detached = bool(row.parent_schema and row.schema_name != row.parent_schema and schema_mine)
    if not (retired or detached):
        raise StateError(f"archive queue row {row.id} names {row.table}, which is neither a conversion's retired "
                         "table (<parent>_retired) nor a detached partition in the archive schema; refusing to "
                         "archive or drop it", fix=fix)


@heavy_step  # counts against the database's heavy-step slots
def archive_queued(
    ex: Executor,
    s3: S3Client,
    queue_id: int,
    *,
    defaults: Mapping[str, Any] | ArchivePolicy | None = None,
    pg_dump: str | None = None,
    pg_restore: str | None = None,
    lock_timeout: str = "2s",
    retries: int = 5,
) -> dict[str, Any]:
    """Take one archive-queue row through upload -> verify -> drop (or keep). Resumable at every stage.

    The row's ``archive`` jsonb records ``stage`` (uploaded/verified), the manifest and any open upload id; a
    retried task continues where the last one stopped. Any exception marks the row ``failed`` with
    ``last_error`` (the table stays) and is re-raised so the Airflow task fails and is retried.
    """
    conn = ex.conn
    state.ensure_schema(conn)
    row = queue_row(conn, queue_id)
    check_queued_table(conn, row)
    base = defaults.model_dump() if isinstance(defaults, ArchivePolicy) else (defaults or {})
    result: dict[str, Any] = {"queue_id": queue_id, "table": str(row.table)}
    if row.status in DONE:
        ex.logger.info("archive queue row %s (%s) is already %s; nothing to do", queue_id, row.table, row.status)
        return result | {"status": row.status, "skipped": True}
    policy = ArchivePolicy.build(base, row.archive.get("policy"))
    if ex.dry_run:
        plan = archive_table(ex, s3, row.target, policy, pg_dump=pg_dump, lock_timeout=lock_timeout)
        if policy.drop:
            ex.run(sql.SQL("DROP TABLE {}").format(row.table.ident))
        return result | {"status": row.status, "dry_run": True, "key": plan["key"],
                         "statements": list(ex.statements)}
    with table_lock(conn, row.table, what=f"archive of queue row {queue_id}"), _claim(conn, queue_id):
        row = queue_row(conn, queue_id)
        if row.status in DONE:
            return result | {"status": row.status, "skipped": True}
        check_queued_table(conn, row)
        stage = row.archive.get("stage")
        manifest: dict[str, Any] | None = row.archive.get("manifest")
        try:
            if not catalog.exists(conn, row.table):
                raise StateError(
                    f"{row.table} no longer exists but its archive queue row is {row.status!r}",
                    fix="if it was dropped by hand after a verified archive, set the row's status to 'dropped'; "
                    "if it was renamed, update schema_name/table_name")
            upload = manifest is None or row.status in ("pending", "uploading") or (
                row.status == "failed" and stage != "verified")
            if upload:
                key, _ = plan_keys(conn, row.target, policy)
                recorded = row.archive.get("upload")
                # a worker killed mid-upload left its upload open: resume it (parts S3 holds are kept when the
                # regenerated bytes match), abort any other
                resume = (str(recorded["upload_id"]) if recorded and recorded.get("upload_id")
                          and recorded.get("key") == key and recorded.get("bucket", policy.bucket) == policy.bucket
                          else None)
                _cleanup_uploads(s3, policy.bucket, key, None if resume else recorded, ex.logger, keep=resume)
                update(conn, queue_id, status="uploading", attempt=True, clear_error=True,
                        remove=["stage", "manifest", "verification"])

                def remember(key: str, upload_id: str) -> None:
                    update(conn, queue_id, patch={"upload": {"bucket": policy.bucket, "key": key,
                                                              "upload_id": upload_id}})

                manifest = archive_table(ex, s3, row.target, policy, pg_dump=pg_dump, lock_timeout=lock_timeout,
                                         on_upload_started=remember, resume_upload_id=resume)
                update(conn, queue_id, status="uploaded", remove=["upload"],
                        patch={"stage": "uploaded", "manifest": manifest, "key": manifest["key"],
                               "sha256": manifest["sha256"], "bytes": manifest["bytes"],
                               "bucket": policy.bucket, "manifest_key": manifest["manifest_key"]})
                stage = "uploaded"
            assert manifest is not None
            if stage != "verified":
                checks = verify_archive(conn, s3, manifest, pg_restore=pg_restore, pg_dump=pg_dump)
                checks.pop("pg_restore_list", None)
                update(conn, queue_id, status="verified",
                        patch={"stage": "verified", "verification": checks | {"at": now()}})
            if policy.drop:
                drop_archived(ex, row.table, manifest, queue_id=queue_id, lock_timeout=lock_timeout,
                              retries=retries)
                final = "dropped"
            else:
                update(conn, queue_id, status="kept")
                final = "kept"
                ex.logger.info("archive policy drop=false: %s is kept in the database", row.table)
        except BaseException as exc:
            clear = no_such_bucket(exc, policy.bucket)
            _mark_failed(conn, queue_id, clear or exc, ex.logger)
            if clear is not None:
                raise clear from None
            raise
    return result | {"status": final, "key": manifest["key"], "bucket": manifest["bucket"],
                     "manifest_key": manifest["manifest_key"], "rows": manifest["rows"],
                     "bytes": manifest["bytes"], "sha256": manifest["sha256"], "format": manifest["format"]}


def no_such_bucket(exc: BaseException, bucket: str) -> InvalidInputError | None:
    """botocore's NoSuchBucket as an error naming the bucket and the fix (None for any other error)."""
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    if code != "NoSuchBucket":
        return None
    return InvalidInputError(f"the S3 bucket {bucket!r} does not exist (or is not visible to these credentials)",
                             where=f"s3://{bucket}",
                             fix="create the bucket, or fix the archive policy's bucket / the AWS connection "
                             "(aws_conn_id, endpoint, region); the table was not touched")


def _cleanup_uploads(s3: S3Client, bucket: str, key: str, recorded: Mapping[str, Any] | None,
                     logger: logging.Logger, *, keep: str | None = None) -> None:
    """Abort uploads a previous (killed or failed) attempt left open: the recorded one (unless it is resumed,
    ``keep``) and any other under the key."""
    if recorded and recorded.get("upload_id"):
        abort_upload(s3, str(recorded.get("bucket") or bucket), str(recorded.get("key") or key),
                     str(recorded["upload_id"]), logger=logger)
    aborted = abort_stale_uploads(s3, bucket, key, keep=keep, logger=logger)
    if aborted:
        logger.warning("aborted %d multipart upload(s) left open by an earlier attempt: %s", len(aborted), aborted)


def _mark_failed(conn: psycopg.Connection[Any], queue_id: int, exc: BaseException, logger: logging.Logger) -> None:
    message = f"{type(exc).__name__}: {exc}"[:4000]
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        update(conn, queue_id, status="failed", error=message)
    except Exception as mark_exc:  # the connection itself may be what failed
        logger.error("could not mark archive queue row %s failed (%s); it stays as it was and is retried",
                     queue_id, mark_exc)


# --------------------------------------------------------------------------------------------------- drop


@locks_table()  # the per-table lock, also for a direct caller of the engine
def drop_archived(ex: Executor, table: QualifiedName, manifest: dict[str, Any], *, queue_id: int | None = None,
                  lock_timeout: str = "2s", retries: int = 5) -> None:
    """DROP the archived table once its archive is verified, re-counting its rows under the DROP's own lock.

    Why the re-count: between verification and the drop someone could have written to the table (it is only
    detached, not read-only); ACCESS EXCLUSIVE freezes it, and a changed count aborts the drop.
    """
    rows = int(manifest["rows"])

    def body() -> None:
        ex.run(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table.ident))
        if not ex.dry_run:
            attached = ex.scalar("SELECT c.relispartition FROM pg_class c WHERE c.oid = %s::regclass",
                                 (table.ident.as_string(ex.conn),))
            if attached:
                raise PreflightError(f"{table} is attached as a partition again; it will not be dropped",
                                     fix="detach it first (rotation does), then re-run the archive")
            live = int(ex.scalar(sql.SQL("SELECT count(*) FROM {}").format(table.ident)))
            if live != rows:
                raise VerificationError(f"{table} holds {live} rows, the verified archive {rows}: not dropping",
                                        fix="the table changed after archiving; it will be archived again")
        ex.run(sql.SQL("DROP TABLE {}").format(table.ident))
        if queue_id is not None and not ex.dry_run:
            update(ex.conn, queue_id, status="dropped", patch={"dropped_at": now()})

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"drop archived table {table}")
