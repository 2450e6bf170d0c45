"""Restore: from S3 into a schema, or ATTACH back as a partition (checksum first)."""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.archive import arrow_copy
from pg_partition.core.archive.manifest import get_manifest
from pg_partition.core.archive.policy import DEFAULT_PREFIX, MARKER, RESTORE_SCHEMA
from pg_partition.core.archive.readers import Hashing, S3RangeReader, dump_copy_data, s3_chunks
from pg_partition.core.archive.s3 import S3Client, segment
from pg_partition.core.archive.tools import pg_restore_for
from pg_partition.core.archive.verify import verify_archive
from pg_partition.core.db import catalog, leaf, state
from pg_partition.core.db.capabilities import capabilities
from pg_partition.core.db.catalog import QualifiedName, TableInfo
from pg_partition.core.db.errors import (
    InvalidInputError,
    PreflightError,
    VerificationError,
)
from pg_partition.core.db.execute import Executor, Progress
from pg_partition.core.db.locks import heavy_step, locks_table
from pg_partition.core.db.names import Range, parse_bound_day
from pg_partition.core.db.partitions import (
    bounds_condition,
    check_constraint_name,
    column_kind,
    copy_grants,
    partition_column,
    per_partition_key,
)

log = logging.getLogger("pg_partition")


# --------------------------------------------------------------------------------------------------- restore


def find_archives(s3: S3Client, bucket: str, prefix: str, database: str, table: QualifiedName,
                  period: str | None = None) -> list[str]:
    """Manifest keys under ``prefix/<db>/<schema>/<table>/`` (one period, or all), sorted."""
    folder = "/".join(p for p in [prefix.strip("/"), segment(database), segment(table.schema),
                                  segment(table.name)] if p) + "/"
    if period:
        folder += f"period={segment(period)}/"
    keys: list[str] = []
    token: str | None = None
    while True:
        args: dict[str, Any] = {"Bucket": bucket, "Prefix": folder}
        if token:
            args["ContinuationToken"] = token
        resp = s3.list_objects_v2(**args)
        keys += [o["Key"] for o in resp.get("Contents", []) or [] if str(o["Key"]).endswith(".manifest.json")]
        if not resp.get("IsTruncated"):
            break
        token = resp.get("NextContinuationToken")
    return sorted(keys)


def locate_manifest(s3: S3Client, bucket: str, *, key: str | None = None, prefix: str = DEFAULT_PREFIX,
                    database: str | None = None, table: QualifiedName | None = None, period: str | None = None,
                    format: str | None = None) -> dict[str, Any]:
    """The manifest to restore from: by object/manifest key, or by table + period (preferring ``format``)."""
    if key:
        return get_manifest(s3, bucket, key)
    if not (database and table and period):
        raise InvalidInputError("restore needs either an S3 key or a table and a period",
                                fix="pass s3_key, or table (schema.table of the partitioned parent) and period "
                                "(e.g. 2024-01)")
    keys = find_archives(s3, bucket, prefix, database, table, period)
    if not keys:
        raise InvalidInputError(
            f"no archive of {table} for period {period} under s3://{bucket}/{prefix}/{database}/",
            fix="check the period label (e.g. 2024-01), the bucket/prefix, or pass the S3 key")
    manifests = [get_manifest(s3, bucket, k) for k in keys]
    if format:
        manifests = [m for m in manifests if m["format"] == format] or []
        if not manifests:
            raise InvalidInputError(f"no {format} archive of {table} for period {period}",
                                    fix="omit format to use what exists: " + ", ".join(keys))
    order = {"pg_dump": 0, "parquet": 1, "csv": 2, "rds_csv": 3}
    manifests.sort(key=lambda m: order.get(m["format"], 9))
    return manifests[0]


def _verify_before_restore(s3: S3Client, manifest: dict[str, Any], pg_restore: str | None) -> dict[str, Any]:
    return verify_archive(None, s3, manifest, pg_restore=pg_restore, check_table=False)


def _load(ex: Executor, s3: S3Client, manifest: dict[str, Any], target: QualifiedName, *,
          pg_restore: str | None, allowed: set[str]) -> int:
    """COPY the archive's rows into ``target`` (inside the caller's transaction). Returns rows loaded.

    The object is re-hashed while it streams (dump/CSV) or read with IfMatch on the verified ETag (Parquet), so
    an object swapped after verification cannot be loaded.
    """
    conn = ex.conn
    bucket, key, fmt = manifest["bucket"], manifest["key"], manifest["format"]
    conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
    conn.execute("SET LOCAL IntervalStyle = 'postgres'")
    etag = manifest.get("etag") or None
    loaded = 0
    progress = Progress(f"restore of s3://{bucket}/{key} into {target}", int(manifest["rows"]), logger=ex.logger)

    def copy_stmt(cols: list[str], options: str) -> sql.Composed:
        unknown = [c for c in cols if c not in allowed]
        if unknown:
            raise PreflightError(f"the archive has columns {unknown} that {target} does not have",
                                 fix="restore into a separate schema (target=schema) instead")
        return sql.SQL("COPY {} ({}) FROM STDIN {}").format(
            target.ident, sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(options))

    if fmt == "pg_dump":
        tool = pg_restore_for(int(manifest.get("pg_dump_major") or 0), pg_restore)
        hashing = Hashing(s3_chunks(s3, bucket, key, if_match=etag))
        with dump_copy_data(hashing, tool) as (info, data, _):
            first = next(data, None)
            if first is not None or info.columns:
                with conn.cursor() as cur, cur.copy(copy_stmt(info.columns, "")) as copy:
                    if first is not None:
                        copy.write(first)
                        progress.add(first.count(b"\n"))
                    for chunk in data:
                        copy.write(chunk)
                        progress.add(chunk.count(b"\n"))
            loaded = info.rows
        _check_hash(hashing, manifest)
    elif fmt in ("csv", "rds_csv"):
        hashing = Hashing(s3_chunks(s3, bucket, key, if_match=etag))
        cols = [c["name"] for c in manifest["columns"]]
        gz = zlib.decompressobj(31) if fmt == "csv" else None
        with conn.cursor() as cur:
            with cur.copy(copy_stmt(cols, "(FORMAT csv, HEADER true)")) as copy:
                for chunk in hashing:
                    copy.write(gz.decompress(chunk) if gz else chunk)
                if gz:
                    copy.write(gz.flush())
            loaded = int(cur.rowcount)
        _check_hash(hashing, manifest)
    elif fmt == "parquet":
        pa = arrow_copy.load_pyarrow()
        import pyarrow.parquet as pq

        reader = S3RangeReader(s3, bucket, key, int(manifest["bytes"]), etag)
        pf = pq.ParquetFile(pa.PythonFile(reader, mode="r"))
        cols = list(pf.schema_arrow.names)
        with conn.cursor() as cur, cur.copy(copy_stmt(cols, "")) as copy:
            for batch in pf.iter_batches(batch_size=20_000):
                columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
                for values in zip(*columns, strict=True):
                    copy.write_row(values)
                loaded += batch.num_rows
                progress.add(batch.num_rows)
    else:
        raise InvalidInputError(f"unknown archive format {fmt!r} in the manifest")
    progress.add(0, force=True)
    if loaded != int(manifest["rows"]):
        raise VerificationError(f"loaded {loaded} rows, the manifest says {manifest['rows']}",
                                where=f"s3://{bucket}/{key}", fix="nothing was restored (rolled back)")
    return loaded


def _check_hash(hashing: Hashing, manifest: dict[str, Any]) -> None:
    if hashing.sha.hexdigest() != manifest["sha256"] or hashing.size != int(manifest["bytes"]):
        raise VerificationError(
            f"the object read during restore has sha256 {hashing.sha.hexdigest()} ({hashing.size} bytes), the "
            f"manifest {manifest['sha256']} ({manifest['bytes']} bytes)",
            where=f"s3://{manifest['bucket']}/{manifest['key']}", fix="nothing was restored (rolled back)")


def _marker(manifest: dict[str, Any]) -> str:
    return f"{MARKER}s3://{manifest['bucket']}/{manifest['key']} sha256={manifest['sha256']}"


def _comment(conn: psycopg.Connection[Any], table: QualifiedName) -> str | None:
    row = conn.execute("SELECT obj_description(%s::regclass, 'pg_class')", (table.ident.as_string(conn),)).fetchone()
    return None if row is None else row[0]


_INDEX_TAIL = re.compile(r'^CREATE (UNIQUE )?INDEX .+? ON (?:ONLY )?(?:"(?:[^"]|"")*"|[^\s"]+)'
                         r'(?:\.(?:"(?:[^"]|"")*"|[^\s"]+))? (USING .*)$', re.S)


def _child_indexes(conn: psycopg.Connection[Any], parent: TableInfo, child: QualifiedName) -> list[sql.Composed]:
    """Statements building the parent's (partitioned) indexes on a standalone child before ATTACH.

    ATTACH matches equivalent existing indexes instead of building them while it holds its lock. Primary key
    and unique constraints are added as constraints: ATTACH only matches a constraint index with a constraint.
    """
    stmts: list[sql.Composed] = []
    for idx in parent.indexes:
        cols = sql.SQL(", ").join(map(sql.Identifier, idx.columns))
        if idx.is_primary:
            stmts.append(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(child.ident, cols))
            continue
        m = _INDEX_TAIL.match(idx.definition)
        if idx.constraint and idx.is_unique and m and m.group(2).startswith("USING btree (") \
                and " WHERE " not in m.group(2) and all(idx.columns):
            stmts.append(sql.SQL("ALTER TABLE {} ADD UNIQUE ({})").format(child.ident, cols))
            continue
        if not m or idx.constraint:
            log.warning("not pre-building index %s (%s); ATTACH will build it", idx.name, idx.definition)
            continue
        stmts.append(sql.SQL("CREATE {}INDEX ON {} {}").format(
            sql.SQL("UNIQUE " if m.group(1) else ""), child.ident, sql.SQL(m.group(2))))
    if parent.primary_key is None:
        pk = per_partition_key(conn, parent)
        if pk:
            stmts.append(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                child.ident, sql.SQL(", ").join(map(sql.Identifier, pk))))
    return stmts


@dataclass(frozen=True)
class RestorePlan:
    manifest: dict[str, Any]
    target: str  # attach | schema
    table: QualifiedName  # where the rows go
    parent: QualifiedName | None
    range: Range | None


def check_recorded(conn: psycopg.Connection[Any], manifest: dict[str, Any], logger: Any) -> bool:
    """Compare the manifest with what the archive queue recorded when the archive was written (sha256, bytes,
    rows). Why: whoever can write the bucket can replace an object and its manifest together, so the manifest
    alone proves nothing; the record in the database can. Returns whether a record was found (an archive made by
    another database has none: then only the manifest is checked, and a warning says so)."""
    if not state.ready(conn):
        logger.warning("no archive record in this database (no state schema): restoring s3://%s/%s on the "
                       "manifest's checksum alone", manifest["bucket"], manifest["key"])
        return False
    state.check_trusted(conn)
    rec = conn.execute(sql.SQL(
        """SELECT id, coalesce(archive->>'sha256', archive->'manifest'->>'sha256'),
                  coalesce(archive->>'bytes', archive->'manifest'->>'bytes'), archive->'manifest'->>'rows'
           FROM {} WHERE archive->>'bucket' = %s AND archive->>'key' = %s ORDER BY id DESC LIMIT 1""").format(
        state.QUEUE), (manifest["bucket"], manifest["key"])).fetchone()
    if rec is None:
        logger.warning("s3://%s/%s has no record in this database's archive queue: restoring on the manifest's "
                       "checksum alone", manifest["bucket"], manifest["key"])
        return False
    queue_id, sha, size, rows = rec
    if (sha, str(size), str(rows)) != (manifest["sha256"], str(manifest["bytes"]), str(manifest["rows"])):
        raise VerificationError(
            f"the manifest of s3://{manifest['bucket']}/{manifest['key']} (sha256 {manifest['sha256']}, "
            f"{manifest['bytes']} bytes, {manifest['rows']} rows) differs from what archive queue row {queue_id} "
            f"recorded when it was written (sha256 {sha}, {size} bytes, {rows} rows)",
            where=f"s3://{manifest['bucket']}/{manifest['key']}",
            fix="the object or its manifest was replaced after archiving; nothing was restored. Check who can "
            "write the bucket, and restore from a copy whose checksum matches the record")
    return True


def _restore_table(ex: Executor, s3: S3Client, manifest: dict[str, Any], *args: Any, **kwargs: Any,
                   ) -> QualifiedName | None:
    """The table a restore changes, for its lock: the parent it attaches to, or the table it loads."""
    if kwargs.get("target", "attach") == "attach":
        parent = kwargs.get("parent")
        if parent is None and manifest.get("parent"):
            parent = QualifiedName(manifest["parent"]["schema"], manifest["parent"]["name"])
        return parent if isinstance(parent, QualifiedName) else None
    return QualifiedName(kwargs.get("schema") or RESTORE_SCHEMA, manifest["table"]["name"])


@locks_table(_restore_table)  # the per-table lock, also for a direct caller of the engine
@heavy_step  # counts against the database's heavy-step slots
def restore(
    ex: Executor,
    s3: S3Client,
    manifest: dict[str, Any],
    *,
    target: str = "attach",
    parent: QualifiedName | None = None,
    schema: str | None = None,
    pg_restore: str | None = None,
    verify: bool = True,
    lock_timeout: str = "2s",
    retries: int = 5,
) -> dict[str, Any]:
    """Bring an archive back: ``attach`` it as a partition of its parent again, or load it into ``schema``.

    The checksum is verified first (a full streaming read). ``attach`` refuses, changing nothing, when the
    bounds overlap an existing partition or rows of the DEFAULT partition. Resumable: a half-done restore
    (standalone table marked with a comment naming this archive) is reloaded or attached on the next run.
    """
    if target not in ("attach", "schema"):
        raise InvalidInputError(f"unknown restore target {target!r}", fix="use attach or schema")
    conn = ex.conn
    if not conn.autocommit:
        raise InvalidInputError("restore needs an autocommit connection", fix="open it with autocommit=True")
    name = manifest["table"]["name"]
    if target == "schema":
        table = QualifiedName(schema or RESTORE_SCHEMA, name)
        plan = RestorePlan(manifest, target, table, None, None)
        preflight = _restore_schema_preflight(ex, plan)
    else:
        plan = _attach_plan(ex, manifest, parent)
        preflight = _attach_preflight(ex, plan)
    result = {"target": target, "table": str(plan.table), "key": manifest["key"], "rows": manifest["rows"],
              "sha256": manifest["sha256"]}
    if preflight == "done":
        ex.logger.info("%s is already restored from s3://%s/%s", plan.table, manifest["bucket"], manifest["key"])
        return result | {"status": "already restored"}
    result["recorded"] = check_recorded(conn, manifest, ex.logger)
    checks: dict[str, Any] = {}
    if verify and not ex.dry_run:
        checks = _verify_before_restore(s3, manifest, pg_restore)
        checks.pop("pg_restore_list", None)
    if target == "schema":
        _restore_into_schema(ex, s3, plan, preflight, pg_restore=pg_restore)
    else:
        _restore_attach(ex, s3, plan, preflight, pg_restore=pg_restore, lock_timeout=lock_timeout, retries=retries)
    return result | {"status": "dry run" if ex.dry_run else "restored", "verification": checks,
                     "statements": list(ex.statements) if ex.dry_run else []}


def _attach_plan(ex: Executor, manifest: dict[str, Any], parent: QualifiedName | None) -> RestorePlan:
    bounds = manifest.get("bounds") or {}
    if parent is None:
        if not manifest.get("parent"):
            raise InvalidInputError(
                f"the archive of {manifest['table']['name']} does not name a parent table",
                fix="pass the partitioned table to attach to, or restore with target=schema")
        parent = QualifiedName(manifest["parent"]["schema"], manifest["parent"]["name"])
    if not bounds.get("from") or not bounds.get("to"):
        raise InvalidInputError(
            f"the archive of {manifest['table']['name']} has no partition bounds (a retired table?)",
            fix="restore it with target=schema and query it there")
    rng = Range(parse_bound_day(str(bounds["from"])), parse_bound_day(str(bounds["to"])))
    return RestorePlan(manifest, "attach", parent.sibling(manifest["table"]["name"]), parent, rng)


def _attach_preflight(ex: Executor, plan: RestorePlan) -> str:
    """Refuse unsafe restores before changing anything. Returns 'new', 'resume-load', 'resume-attach' or 'done'."""
    conn, m = ex.conn, plan.manifest
    assert plan.parent is not None and plan.range is not None
    info = catalog.describe(conn, plan.parent)
    if not info.is_partitioned:
        raise PreflightError(f"{plan.parent} is not a partitioned table", where=str(plan.parent),
                             fix="attach to the partitioned parent, or restore with target=schema")
    column = partition_column(info)
    kind = column_kind(info, column)
    rng = plan.range
    for p in info.partitions:
        if p.is_default:
            continue
        if p.name == plan.table and (p.start_day, p.end_day) == (rng.start, rng.end):
            return "done"
        if p.start_day < rng.end and rng.start < p.end_day:
            raise PreflightError(
                f"the archived range [{rng.start}, {rng.end}) overlaps partition {p.name} "
                f"[{p.range_from}, {p.range_to})", where=str(plan.parent),
                fix="the period is already covered (perhaps re-created empty by premake): detach/drop that "
                "partition if it holds nothing you need, or restore with target=schema")
    default = info.default_partition
    if default is not None:
        in_default = ex.scalar(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            default.name.ident, bounds_condition(column, rng, kind)))
        if in_default:
            raise PreflightError(
                f"{in_default} rows in the DEFAULT partition {default.name} fall in [{rng.start}, {rng.end})",
                where=str(plan.parent), fix="move those rows out of the DEFAULT partition first (rotation does "
                "this before creating partitions), or restore with target=schema")
    if catalog.exists(conn, plan.table):
        comment = _comment(conn, plan.table) or ""
        if not comment.startswith(_marker(m)):
            raise PreflightError(
                f"a table named {plan.table} already exists and is not a restore of this archive",
                where=str(plan.table), fix="rename or drop it, or restore with target=schema")
        attached = ex.scalar("SELECT relispartition FROM pg_class WHERE oid = %s::regclass",
                             (plan.table.ident.as_string(conn),))
        if attached:
            raise PreflightError(f"{plan.table} is a partition of another table", where=str(plan.table),
                                 fix="detach it or restore with target=schema")
        return "resume-attach" if comment.endswith(" loaded") else "resume-load"
    return "new"


def _decoded(conn: psycopg.Connection[Any]) -> bool:
    """Whether this database has a logical-decoding consumer (a publication or a logical slot), for which the
    restore must load its rows without WAL-logging them as changes of the standalone table.

    Why: the rows are already in the subscriber's table (a DETACH and a DROP are not replicated), and once the
    table is attached they are part of the published parent. Loaded as plain COPY, they are decoded as INSERTs of
    the standalone table: with ``FOR ALL TABLES`` they are published under its name (the subscriber has no such
    table, its apply worker fails), and on PostgreSQL 13 and 14 the walsender caches "not published" for that
    table and keeps that after the ATTACH (its relcache callback does not reset the publication decision before
    15): every later UPDATE and DELETE of a restored row is silently not sent, and a row moved out of it arrives
    as a bare INSERT (duplicate key, the feed stops). Loaded into an UNLOGGED table and made LOGGED in the same
    transaction, the rows reach WAL only through the table rewrite, which logical decoding skips; WAL volume is
    the same (the rewrite logs each page once), the heap is written twice."""
    row = conn.execute(
        """SELECT EXISTS (SELECT 1 FROM pg_publication)
                  OR EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_type = 'logical'
                             AND database = current_database())""").fetchone()
    return bool(row and row[0])


def _restore_attach(ex: Executor, s3: S3Client, plan: RestorePlan, preflight: str, *, pg_restore: str | None,
                    lock_timeout: str, retries: int) -> None:
    conn, m = ex.conn, plan.manifest
    assert plan.parent is not None and plan.range is not None
    parent = catalog.describe(conn, plan.parent)
    column = partition_column(parent)
    kind = column_kind(parent, column)
    child, rng = plan.table, plan.range
    low, high = rng.literal(kind)
    check = sql.Identifier(check_constraint_name(child))
    marker = _marker(m)
    settings = leaf.newest_leaf(conn, parent)  # storage options, replica identity: they live on leaves only

    if preflight == "new":
        def create() -> None:
            ex.run(sql.SQL(
                "CREATE TABLE {child} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
                "{compression}INCLUDING GENERATED INCLUDING STATISTICS)"
            ).format(child=child.ident, parent=parent.name.ident,
                     compression=capabilities(ex.conn).like_compression(ex.logger)))
            if parent.tablespace:
                ex.run(sql.SQL("ALTER TABLE {} SET TABLESPACE {}").format(child.ident,
                                                                       sql.Identifier(parent.tablespace)))
            ex.run(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(
                child.ident, check, bounds_condition(column, rng, kind)))
            ex.run(sql.SQL("COMMENT ON TABLE {} IS {}").format(child.ident, sql.Literal(marker)))
            copy_grants(ex, parent.grants, child)

        # LIKE reads the parent: a short transaction under lock_timeout, never held during the load.
        ex.with_lock_timeout(create, lock_timeout=lock_timeout, retries=retries, what=f"create {child}")
    if preflight in ("new", "resume-load"):
        allowed = {c.name for c in parent.columns if not c.generated}
        hidden = _decoded(conn)
        with ex.transaction():
            if hidden:  # see _decoded: nothing below is decoded as a change of child
                ex.run(sql.SQL("ALTER TABLE {} SET UNLOGGED").format(child.ident))
            ex.run(sql.SQL("TRUNCATE {}").format(child.ident))
            if ex.dry_run:
                ex.logger.info("[dry run] would COPY %s rows from s3://%s/%s into %s", m["rows"], m["bucket"],
                               m["key"], child)
            else:
                _load(ex, s3, m, child, pg_restore=pg_restore, allowed=allowed)
            if hidden:
                ex.run(sql.SQL("ALTER TABLE {} SET LOGGED").format(child.ident))
            for stmt in _child_indexes(conn, parent, child):
                ex.run(stmt)
            ex.run(sql.SQL("ANALYZE {}").format(child.ident))
            ex.run(sql.SQL("COMMENT ON TABLE {} IS {}").format(child.ident, sql.Literal(marker + " loaded")))

    def attach() -> None:
        ex.run(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            parent.name.ident, child.ident, sql.Literal(low), sql.Literal(high)))
        ex.run(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(child.ident, check))
        leaf.apply(ex, child, settings)
        ex.run(sql.SQL("COMMENT ON TABLE {} IS NULL").format(child.ident))
        if not ex.dry_run:
            conn.execute(sql.SQL(
                """UPDATE {} SET status = 'restored', updated_at = now(),
                          archive = archive || jsonb_build_object('restored_at', now()::text,
                                                                  'restored_to', %s::text)
                   WHERE archive->>'key' = %s AND archive->>'bucket' = %s""").format(state.QUEUE),
                (str(child), m["key"], m["bucket"]))

    ex.with_lock_timeout(attach, lock_timeout=lock_timeout, retries=retries, what=f"attach restored {child}")
    ex.logger.info("restored %s rows from s3://%s/%s as partition %s of %s", m["rows"], m["bucket"], m["key"],
                   child, parent.name)


def _restore_schema_preflight(ex: Executor, plan: RestorePlan) -> str:
    if catalog.exists(ex.conn, plan.table):
        comment = _comment(ex.conn, plan.table) or ""
        if comment == _marker(plan.manifest) + " loaded":
            return "done"
        raise PreflightError(f"{plan.table} already exists", where=str(plan.table),
                             fix="drop it, or restore into another schema (param schema)")
    return "new"


def _restore_into_schema(ex: Executor, s3: S3Client, plan: RestorePlan, preflight: str, *,
                         pg_restore: str | None) -> None:
    """Create a plain table from the manifest's columns and load it: for ad-hoc queries, nothing else touched."""
    conn, m, table = ex.conn, plan.manifest, plan.table
    cols = []
    for c in m["columns"]:
        ok = conn.execute("SELECT to_regtype(%s) IS NOT NULL", (c["type"],)).fetchone()
        if not ok or not ok[0]:
            raise VerificationError(f"the manifest names an unknown type {c['type']!r} for column {c['name']!r}",
                                    fix="install the extension that defines it, or restore with pg_restore by hand")
        # The type text comes from format_type() and was just validated by to_regtype(): safe to splice.
        cols.append(sql.SQL("{} {}{}").format(sql.Identifier(c["name"]), sql.SQL(c["type"]),
                                              sql.SQL(" NOT NULL" if c.get("not_null") else "")))
    with ex.transaction():
        ex.run(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.schema)))
        ex.run(sql.SQL("CREATE TABLE {} ({})").format(table.ident, sql.SQL(", ").join(cols)))
        if not ex.dry_run:
            _load(ex, s3, m, table, pg_restore=pg_restore, allowed={c["name"] for c in m["columns"]})
        ex.run(sql.SQL("ANALYZE {}").format(table.ident))
        ex.run(sql.SQL("COMMENT ON TABLE {} IS {}").format(table.ident, sql.Literal(_marker(m) + " loaded")))
    ex.logger.info("restored %s rows from s3://%s/%s into %s", m["rows"], m["bucket"], m["key"], table)
