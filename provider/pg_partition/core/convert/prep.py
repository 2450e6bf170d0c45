"""prep, add_partitions, build_indexes, analyze: the intermediate partitioned table and its partitions."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date, datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert import parity
from pg_partition.core.convert.parallel import DEFAULT_WORKERS, run_bounded
from pg_partition.core.convert.preflight import check, validate_where
from pg_partition.core.convert.spec import (
    PREPPED,
    SWAPPED,
    ConvertSpec,
    checkpoint,
    forget,
    put,
    recorded_job,
    set_status,
    timed,
)
from pg_partition.core.db import catalog, leaf, state
from pg_partition.core.db.capabilities import capabilities
from pg_partition.core.db.catalog import Index, QualifiedName, TableInfo
from pg_partition.core.db.errors import InvalidInputError, PreflightError, StateError
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import heavy_step, locks_table
from pg_partition.core.db.names import Range, covering, fit_identifier, window
from pg_partition.core.db.partitions import copy_grants, create_partition
from pg_partition.core.params import LOCK_RETRIES, MAX_PARTITIONS, PERIODS, bounded_int, parse_lock_timeout

# {compression} is INCLUDING COMPRESSION where the server has it (14+): see db.capabilities.like_compression
LIKE_OPTIONS = ("INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE {compression}INCLUDING GENERATED "
                "INCLUDING IDENTITY INCLUDING STATISTICS INCLUDING COMMENTS")


# --- indexes of the source and their counterparts ------------------------------------------------------------


def _index_tail(conn: psycopg.Connection[Any], table: QualifiedName, idx: Index) -> str:
    """``USING btree (...) INCLUDE (...) WHERE ...`` of an index, i.e. its definition without name and table.

    Cut from ``pg_get_indexdef`` at the exact prefix PostgreSQL renders (quoting computed by the server), so a
    table or index name containing `` USING `` cannot confuse it.
    """
    row = conn.execute("SELECT quote_ident(%s), format('%%I.%%I', %s::text, %s::text)",
                       (idx.name, table.schema, table.name)).fetchone()
    assert row is not None
    for only in ("", "ONLY "):
        prefix = f"CREATE {'UNIQUE ' if idx.is_unique else ''}INDEX {row[0]} ON {only}{row[1]} "
        if idx.definition.startswith(prefix) and idx.definition[len(prefix):].startswith("USING "):
            return idx.definition[len(prefix):]
    raise StateError(f"cannot read the definition of index {idx.name}: {idx.definition}",
                     fix="report this index definition to the pg-partition maintainers")


def index_plan(conn: psycopg.Connection[Any], spec: ConvertSpec, src: TableInfo) -> list[dict[str, Any]]:
    """How each source index is mirrored: temporary name on the intermediate (restored at the swap), the name
    the source's index takes at the swap, whether it is built after the fill, whether it lives on the parent."""
    out: list[dict[str, Any]] = []
    for idx in src.indexes:
        kind = "pk" if idx.is_primary else ("constraint" if idx.constraint else "index")
        on_parent = not (kind == "pk" and spec.primary_key == "per_partition")
        constraint_def = None
        if kind == "constraint":
            row = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s AND "
                               "conname = %s", (src.oid, idx.constraint)).fetchone()
            constraint_def = row[0] if row else None
        out.append({
            "source": idx.name,
            "temp": fit_identifier(idx.name, "_intermediate"),
            "retired": fit_identifier(idx.name, "_retired"),
            "kind": kind,
            "unique": idx.is_unique,
            "columns": list(idx.columns),
            "tail": _index_tail(conn, src.name, idx),
            "constraint_def": constraint_def,
            "deferred": kind == "index" and spec.defer_indexes,
            "on_parent": on_parent,
        })
    return out


def _pk_columns(spec: ConvertSpec, src: TableInfo) -> list[str]:
    assert src.primary_key is not None
    cols = list(src.primary_key.columns)
    if spec.primary_key == "composite" and spec.column not in cols:
        cols.append(spec.column)
    return cols


# --- prep ----------------------------------------------------------------------------------------------------


def _start_job(ex: Executor, spec: ConvertSpec, resuming: bool) -> None:
    if ex.dry_run:
        return
    conn = ex.conn
    state.ensure_schema(conn)
    if not resuming:  # no intermediate of ours: any older record of this table is stale
        forget(conn, spec)
    recorded = state.start_job(conn, spec.job_id, "convert", str(spec.table), spec.config())
    if recorded != spec.config():  # pragma: no cover - preflight refuses this first
        raise StateError(f"a different conversion of {spec.table} is recorded: {recorded}",
                         fix="run unprep for it first")


@locks_table()  # the per-table lock, also for a direct caller of the engine
def prep(ex: Executor, spec: ConvertSpec, *, lock_timeout: str = "2s", retries: int = 5) -> dict[str, Any]:
    """Create ``<table>_intermediate``, partitioned by RANGE on the column and mirroring the source.

    Mirrored: columns with defaults, NOT NULL, CHECK constraints, storage, compression, statistics targets,
    column and table comments, generated columns, identity (its own sequence, restarted at the swap), extended
    statistics, outgoing foreign keys, owner, grants and every index (temporary names, the original ones restored
    by the swap). Idempotent: on an existing intermediate of the same conversion only missing indexes are added
    (e.g. an index created on the source during the fill).
    """
    conn = ex.conn
    lock_timeout = parse_lock_timeout(lock_timeout)  # every param checked before the first change
    retries = bounded_int(retries, what="lock_retries", bounds=LOCK_RETRIES)
    src, warnings, resuming = check(conn, spec)
    for w in warnings:
        ex.logger.warning("%s", w)
    refused = parity.refusals(conn, src.oid, spec.table)
    if refused:  # before anything changes
        raise PreflightError("; ".join(p for p, _ in refused), where=str(spec.table),
                             fix="; ".join(f for _, f in refused))
    indexes = index_plan(conn, spec, src)
    settings = leaf.read(conn, src.oid)
    _start_job(ex, spec, resuming)
    started = time.monotonic()
    exists = catalog.exists(conn, spec.intermediate)
    inter = spec.intermediate

    # PostgreSQL refuses "TABLESPACE pg_default" on a partitioned table (it means "the database's default" there);
    # like pgslice, pg_default is then simply not named on the parent: its partitions land in the default.
    parent_ts = spec.tablespace if spec.tablespace and spec.tablespace != "pg_default" else None

    def body() -> None:
        if parent_ts:
            ex.run(sql.SQL("SET LOCAL default_tablespace = {}").format(sql.Literal(parent_ts)))
        if not exists:
            ex.run(sql.SQL("CREATE TABLE {i} (LIKE {s} {opts}) PARTITION BY RANGE ({c}){ts}").format(
                i=inter.ident, s=spec.table.ident, opts=sql.SQL(LIKE_OPTIONS).format(
                    compression=capabilities(conn).like_compression(ex.logger)), c=sql.Identifier(spec.column),
                ts=sql.SQL(" TABLESPACE {}").format(sql.Identifier(parent_ts)) if parent_ts
                else sql.SQL("")))
            for col in src.columns:
                if col.stats_target is not None:
                    ex.run(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS {}").format(
                        inter.ident, sql.Identifier(col.name), sql.Literal(col.stats_target)))
            if src.comment is not None:
                ex.run(sql.SQL("COMMENT ON TABLE {} IS {}").format(inter.ident, sql.Literal(src.comment)))
            current = conn.execute("SELECT current_user").fetchone()
            if current and current[0] != src.owner:
                ex.run(sql.SQL("ALTER TABLE {} OWNER TO {}").format(inter.ident, sql.Identifier(src.owner)))
            inter_oid = None if ex.dry_run else catalog.table_oid(conn, inter)
            if inter_oid is None:
                copy_grants(ex, src.grants, inter)
            else:  # a diff: grant options, column grants and the owner's trimmed privileges too
                parity.sync_privileges(ex, src.oid, inter_oid, inter)
            # replica identity FULL/NOTHING on the parent too (publish_via_partition_root reads the parent's)
            leaf.apply(ex, inter, leaf.LeafSettings(replica_identity=settings.replica_identity))
            for fk in src.foreign_keys_out:
                ex.run(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    inter.ident, sql.Identifier(fk.name), sql.SQL(fk.definition)))
        have = set() if ex.dry_run or not exists else {
            i.name for i in catalog.indexes(conn, catalog.table_oid(conn, inter) or 0)}
        for m in indexes:
            if not m["on_parent"] or m["deferred"] or m["temp"] in have:
                continue
            if m["kind"] == "pk":
                ex.run(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY ({})").format(
                    inter.ident, sql.Identifier(m["temp"]),
                    sql.SQL(", ").join(map(sql.Identifier, _pk_columns(spec, src)))))
            elif m["kind"] == "constraint":
                ex.run(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    inter.ident, sql.Identifier(m["temp"]), sql.SQL(m["constraint_def"])))
            else:
                ex.run(sql.SQL("CREATE {}INDEX {} ON {} {}").format(
                    sql.SQL("UNIQUE ") if m["unique"] else sql.SQL(""), sql.Identifier(m["temp"]), inter.ident,
                    sql.SQL(m["tail"])))
        put(ex, spec, "prep", {"indexes": indexes, "source_oid": src.oid, "leaf": settings.as_dict()})
        set_status(ex, spec, PREPPED)

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"prep {inter}")
    result = {"intermediate": str(inter), "created": not exists, "resumed": resuming, "indexes": indexes,
              "warnings": warnings, "seconds": round(time.monotonic() - started, 3)}
    if not ex.dry_run:
        with conn.transaction():
            put(ex, spec, "timing", {"seconds": result["seconds"]}, "prep")
    return result


def prep_record(conn: psycopg.Connection[Any], spec: ConvertSpec) -> dict[str, Any]:
    rec = checkpoint(conn, spec, "prep")
    if rec is None:
        raise StateError(f"prep of {spec.table} is not recorded", fix="run prep first")
    return dict(rec)


# --- partitions ----------------------------------------------------------------------------------------------


def _parent_for(ex: Executor, spec: ConvertSpec, target: str) -> TableInfo:
    name = spec.intermediate if target == "intermediate" else spec.table
    if catalog.exists(ex.conn, name):
        info = catalog.describe(ex.conn, name)
        if not info.is_partitioned:
            raise StateError(f"{name} is not partitioned", fix="use target='intermediate' before the swap")
        return info
    if ex.dry_run and target == "intermediate":  # a rehearsal before prep ran: the source stands in
        src = catalog.describe(ex.conn, spec.table)
        return replace(src, name=name, relkind="p", partitions=[], tablespace=spec.tablespace,
                       primary_key=None if spec.primary_key == "per_partition" else src.primary_key)
    raise StateError(f"{name} does not exist", fix="run prep first")


def _min_max(conn: psycopg.Connection[Any], table: QualifiedName, column: str,
             where_sql: sql.Composable | None) -> tuple[Any, Any]:
    filt = sql.SQL(" WHERE {}").format(where_sql) if where_sql is not None else sql.SQL("")
    row = conn.execute(sql.SQL("SELECT min({c}), max({c}) FROM {t}{f}").format(
        c=sql.Identifier(column), t=table.ident, f=filt)).fetchone()
    return (row[0], row[1]) if row else (None, None)


@locks_table()  # the per-table lock, also for a direct caller of the engine
def add_partitions(
    ex: Executor,
    spec: ConvertSpec,
    *,
    past: int = 0,
    future: int = 0,
    cover_data: bool = False,
    where: str | None = None,
    target: str = "intermediate",
    today: date | None = None,
    lock_timeout: str = "2s",
    retries: int = 5,
) -> dict[str, Any]:
    """Partitions for ``past`` periods before the current one, the current one and ``future`` after it, plus
    (``cover_data``) every period holding source rows (matching ``where``), plus the DEFAULT partition if the
    conversion asks for one. ``target`` is ``intermediate`` (before the swap) or ``table`` (the live partitioned
    table). Ranges overlapping an existing partition are skipped, so the step is idempotent."""
    if target not in ("intermediate", "table"):
        raise InvalidInputError(f"unknown target {target!r}", fix="use 'intermediate' or 'table'")
    past = bounded_int(past, what="past", bounds=PERIODS, fix="pass a count of periods, e.g. past=24")
    future = bounded_int(future, what="future", bounds=PERIODS, fix="pass a count of periods, e.g. future=3")
    lock_timeout = parse_lock_timeout(lock_timeout)
    retries = bounded_int(retries, what="lock_retries", bounds=LOCK_RETRIES)
    conn = ex.conn
    # the filter is checked before anything else, so a refused one leaves no trace (not even a timing row)
    where_sql = validate_where(conn, spec.table, where) if cover_data and target == "intermediate" else None
    with timed(ex, spec, f"add_partitions:{target}") as info:
        parent = _parent_for(ex, spec, target)
        wanted = set(window(today or datetime.now(timezone.utc).date(), spec.period, past, future))
        if cover_data:
            data_table = spec.table
            lo, hi = _min_max(conn, data_table, spec.column, None if ex.dry_run else where_sql)  # dry run: not run
            if target == "table" and catalog.exists(conn, spec.retired):
                rlo, rhi = _min_max(conn, spec.retired, spec.column, None)
                lo = rlo if lo is None else (lo if rlo is None else min(lo, rlo))
                hi = rhi if hi is None else (hi if rhi is None else max(hi, rhi))
            if lo is not None and hi is not None:
                if _periods_between(lo, hi, spec.period) > MAX_PARTITIONS:
                    raise InvalidInputError(
                        f"cover_data would create more than {MAX_PARTITIONS:,} {spec.period.value} partitions "
                        f"({lo} .. {hi})", where=str(spec.table),
                        fix="use a longer period, a where filter that excludes outliers, or clean the outlying "
                        "rows first")
                wanted |= set(covering(lo, hi, spec.period))
        if len(wanted) > MAX_PARTITIONS:
            raise InvalidInputError(f"{len(wanted):,} partitions asked; at most {MAX_PARTITIONS:,} at once",
                                    where=str(spec.table), fix="ask fewer past/future periods")
        existing = [Range(p.start_day, p.end_day) for p in parent.partitions if not p.is_default]
        pk = None
        if spec.primary_key == "per_partition":
            src_pk = catalog.describe(conn, spec.table if target == "intermediate" else spec.retired).primary_key \
                if catalog.exists(conn, spec.table if target == "intermediate" else spec.retired) else None
            pk = tuple(src_pk.columns) if src_pk else None
        created, skipped = [], []
        for rng in sorted(wanted):
            if any(rng.start < e.end and e.start < rng.end for e in existing):
                if rng not in existing:
                    skipped.append(f"{rng.start}..{rng.end}")
                continue
            made = create_partition(ex, parent, spec.column, rng, spec.period, name=spec.partition(rng.start),
                                    primary_key=pk, lock_timeout=lock_timeout, retries=retries)
            _apply_leaf(ex, spec, made.name, lock_timeout=lock_timeout, retries=retries)
            created.append(str(made.name))
        default = None
        if spec.default_partition and parent.default_partition is None:
            default = _create_default(ex, spec, parent, pk, lock_timeout=lock_timeout, retries=retries)
            _apply_leaf(ex, spec, spec.default_name, lock_timeout=lock_timeout, retries=retries)
        if skipped:
            ex.logger.warning("skipped ranges overlapping existing partitions of %s: %s", parent.name,
                              ", ".join(skipped))
        info.update({"created": created, "skipped_overlapping": skipped, "default": default,
                     "existing": len(existing)})
    return info


def _apply_leaf(ex: Executor, spec: ConvertSpec, child: QualifiedName, *, lock_timeout: str, retries: int) -> None:
    """The source's storage options and replica identity on a new partition (they live on leaves only)."""
    rec = checkpoint(ex.conn, spec, "prep") if not ex.dry_run else None
    settings = leaf.LeafSettings.from_dict((rec or {}).get("leaf"))
    if ex.dry_run and rec is None and catalog.exists(ex.conn, spec.table):
        src = catalog.describe(ex.conn, spec.table)
        settings = leaf.read(ex.conn, src.oid) if not src.is_partitioned else settings
    if settings.empty:
        return
    ex.with_lock_timeout(lambda: leaf.apply(ex, child, settings), lock_timeout=lock_timeout, retries=retries,
                         what=f"storage options of {child}")


def _create_default(ex: Executor, spec: ConvertSpec, parent: TableInfo, pk: tuple[str, ...] | None, *,
                    lock_timeout: str, retries: int) -> str:
    child = spec.default_name

    def body() -> None:
        if ex.dry_run or not catalog.exists(ex.conn, child):
            ex.run(sql.SQL(
                "CREATE TABLE {c} (LIKE {p} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
                "{compression}INCLUDING GENERATED INCLUDING STATISTICS)").format(
                c=child.ident, p=parent.name.ident,
                compression=capabilities(ex.conn).like_compression(ex.logger)))
            for col in parent.columns:
                if col.stats_target is not None:
                    ex.run(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS {}").format(
                        child.ident, sql.Identifier(col.name), sql.Literal(col.stats_target)))
            if pk:
                ex.run(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                    child.ident, sql.SQL(", ").join(map(sql.Identifier, pk))))
            copy_grants(ex, parent.grants, child)
        ex.run(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} DEFAULT").format(parent.name.ident, child.ident))

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"attach default partition {child}")
    return str(child)


# --- indexes, analyze ----------------------------------------------------------------------------------------


def _live_parent(conn: psycopg.Connection[Any], spec: ConvertSpec) -> QualifiedName:
    """The partitioned table of this conversion: the intermediate before the swap, the table after it."""
    job = recorded_job(conn, spec.table)
    if job is not None and job.status == SWAPPED:
        return spec.table
    return spec.intermediate


# Each partition's CREATE INDEX runs with these, for that statement only:
# - no parallel maintenance workers: ``workers`` sessions are the bound on the cores the builds take (the
#   application keeps the rest), and on partitions of tens of MB a parallel build only adds worker start-up and a
#   merge (2M rows, 124 builds on 2 sessions, 2 cores: 6.7 s with PostgreSQL's default of 2 workers per build, 4.8 s
#   without, PostgreSQL 15);
# - no wait for the WAL flush at commit: the partitions are not live yet, and a build lost in a crash is simply
#   built again (the step is idempotent).
BUILD_SETTINGS = {"max_parallel_maintenance_workers": "0", "synchronous_commit": "off"}


@locks_table()  # the per-table lock, also for a direct caller of the engine
@heavy_step  # counts against the database's heavy-step slots
def build_indexes(ex: Executor, spec: ConvertSpec, *, workers: int = DEFAULT_WORKERS,
                  connect: Callable[[], psycopg.Connection[Any]] | None = None,
                  throttle: Callable[[], None] | None = None) -> dict[str, Any]:
    """Build deferred indexes: an invalid index ON ONLY the parent, one plain CREATE INDEX per partition (the
    partitions are not live, so no CONCURRENTLY is needed) on up to ``workers`` sessions at once, then ATTACH
    each (catalog only, this session); the parent index becomes valid when the last partition's is attached.

    Idempotent: a partition index built by an interrupted run (CREATE INDEX is transactional, so it is complete)
    is attached, not rebuilt. ``connect`` opens a worker session (default: the same parameters as ``ex.conn``);
    ``throttle`` is called before each build.
    """
    conn = ex.conn
    with timed(ex, spec, "indexes") as info:
        rec = checkpoint(conn, spec, "prep")
        deferred = [m for m in (rec or {}).get("indexes", []) if m["deferred"]]
        if rec is None and ex.dry_run:
            deferred = [m for m in index_plan(conn, spec, catalog.describe(conn, spec.table)) if m["deferred"]]
        parent_name = _live_parent(conn, spec)
        parent = catalog.describe(conn, parent_name) if catalog.exists(conn, parent_name) else None
        parts = [p.name for p in parent.partitions] if parent else []
        have = {i.name: i for i in parent.indexes} if parent else {}
        timings: list[dict[str, Any]] = []
        builds: list[tuple[int, sql.Composed]] = []  # (partition's position, CREATE INDEX)
        attaches: list[sql.Composed] = []
        for m in deferred:
            # after the swap the parent's index already carries the source's name
            name = m["source"] if parent_name == spec.table else m["temp"]
            if name in have and have[name].is_valid:
                timings.append({"index": name, "partitions": 0, "already": True})
                continue
            unique = sql.SQL("UNIQUE ") if m["unique"] else sql.SQL("")
            if name not in have:
                ex.run(sql.SQL("CREATE {}INDEX IF NOT EXISTS {} ON ONLY {} {}").format(
                    unique, sql.Identifier(name), parent_name.ident, sql.SQL(m["tail"])))
            attached = set() if ex.dry_run else {r[0] for r in conn.execute(
                """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                   WHERE i.inhparent = to_regclass(%s)""", (parent_name.sibling(name).ident.as_string(conn),))}
            n = 0
            for at, part in enumerate(parts):
                child = part.sibling(fit_identifier(f"{part.name}_{m['source']}", ""))
                if child.name in attached:
                    continue
                builds.append((at, sql.SQL("CREATE {}INDEX IF NOT EXISTS {} ON {} {}").format(
                    unique, sql.Identifier(child.name), part.ident, sql.SQL(m["tail"]))))
                attaches.append(sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                    parent_name.sibling(name).ident, child.ident))
                n += 1
            timings.append({"index": name, "partitions": n})
        started = time.monotonic()
        # partition by partition (a stable sort keeps the index order within one): a partition's builds follow
        # each other, so its heap is read while still cached, and an autovacuum of it is cancelled by our
        # ShareLock (after deadlock_timeout) once, not once per index
        ordered = [stmt for _, stmt in sorted(builds, key=lambda b: b[0])]
        run_bounded(ex, ordered, workers=workers, connect=connect, throttle=throttle, local_settings=BUILD_SETTINGS)
        for stmt in attaches:
            ex.run(stmt)
        seconds = round(time.monotonic() - started, 3)
        if builds:
            ex.logger.info("%d partition index(es) of %d deferred index(es) built on up to %d session(s) and "
                           "attached in %.1fs", len(builds), len(timings), max(1, min(workers, len(builds))),
                           seconds)
        info["indexes"] = timings
        info["build_seconds"] = seconds
        info["workers"] = workers
    return info


@locks_table()  # the per-table lock, also for a direct caller of the engine
@heavy_step  # counts against the database's heavy-step slots
def analyze(ex: Executor, spec: ConvertSpec, *, workers: int = DEFAULT_WORKERS,
            connect: Callable[[], psycopg.Connection[Any]] | None = None,
            throttle: Callable[[], None] | None = None) -> dict[str, Any]:
    """Statistics for every partition and for the parent (the inheritance statistics the planner uses for the
    whole table). Before PostgreSQL 18, ``ANALYZE parent`` already processes every partition, so one statement
    does both (analyzing partitions first would sample everything twice); from 18 (``ANALYZE ONLY`` arrived
    there, not in 17), the partitions on up to ``workers`` sessions at once and then ``ANALYZE ONLY parent``.
    The DAG runs it alongside the pre-swap verify (:func:`analyze_unlocked` on a second session)."""
    return analyze_unlocked(ex, spec, workers=workers, connect=connect, throttle=throttle)


def analyze_unlocked(ex: Executor, spec: ConvertSpec, *, workers: int = DEFAULT_WORKERS,
                     connect: Callable[[], psycopg.Connection[Any]] | None = None,
                     throttle: Callable[[], None] | None = None) -> dict[str, Any]:
    """:func:`analyze` without taking the table's lock or a heavy-step slot: for a step that holds both on
    another session of the same run (verify runs it in the background, see ``verify_conversion``)."""
    conn = ex.conn
    with timed(ex, spec, "analyze") as info:
        parent_name = _live_parent(conn, spec)
        if not catalog.exists(conn, parent_name):
            if not ex.dry_run:
                raise StateError(f"{parent_name} does not exist", fix="run prep first")
            ex.run(sql.SQL("ANALYZE {}").format(parent_name.ident))
            return info
        parent = catalog.describe(conn, parent_name)
        caps = capabilities(conn)
        if caps.analyze_only:
            run_bounded(ex, [sql.SQL("ANALYZE {}").format(part.name.ident) for part in parent.partitions],
                        workers=workers, connect=connect, throttle=throttle)
            ex.run(sql.SQL("ANALYZE ONLY {}").format(parent_name.ident))
        else:
            ex.logger.info("PostgreSQL %s has no ANALYZE ONLY (18+): ANALYZE of the parent, which also analyzes "
                           "each partition", caps.major)
            ex.run(sql.SQL("ANALYZE {}").format(parent_name.ident))
        info["partitions"] = len(parent.partitions)
    return info


def _periods_between(lo: Any, hi: Any, period: Any) -> int:
    """An upper bound of the periods between two values (cheap: no list of ranges is built)."""
    def day(v: Any) -> date:
        return v.date() if isinstance(v, datetime) else v
    days = (day(hi) - day(lo)).days
    per = {"day": 1, "week": 7, "month": 28, "quarter": 89, "year": 365}.get(getattr(period, "value", str(period)), 1)
    return days // per + 2
