"""Online conversion of a table into a RANGE-partitioned one: pgslice's steps, each idempotent and resumable.

    preflight -> prep -> add_partitions -> plan_fill -> fill (per partition) -> build_indexes -> analyze
    -> catch_up (pre-swap) -> swap -> catch_up (post-swap) -> report;  rollback: unswap, unprep

With change capture (tables that take UPDATE/DELETE, :mod:`pg_partition.core.capture`):

    prep -> add_partitions -> install_capture -> plan_fill -> fill -> replay -> indexes -> analyze -> verify
    -> replay -> swap (applies the last backlog and removes capture under its lock) -> report

Every function takes an :class:`Executor` (dry run logs every statement and changes nothing) and a
:class:`ConvertSpec`. Progress and the conversion's identity live in the ``pg_partition`` state schema, so a task
retried on another worker continues where the last one stopped. ``fill``, ``plan_fill`` and the catch-up
machinery live in :mod:`pg_partition.core.fill`, preflight in :mod:`pg_partition.core.preflight`; they are
re-exported here so callers import one module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date, datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core import capture, catalog, state
from pg_partition.core.catalog import Index, QualifiedName, TableInfo
from pg_partition.core.convert_spec import (
    PREPPED,
    SWAPPED,
    ConvertSpec,
    checkpoint,
    forget,
    load_spec,
    put,
    recorded_job,
    set_status,
    state_ready,
    timed,
)
from pg_partition.core.errors import InvalidInputError, PreflightError, StateError
from pg_partition.core.execute import Executor
from pg_partition.core.fill import (
    DEFAULT_BATCH,
    copy_missing,
    copy_missing_locked,
    fill,
    fill_status,
    plan_fill,
    prepare_locked_copy,
    recorded_plan,
    wait_for_writers,
)
from pg_partition.core.names import Range, covering, fit_identifier, window
from pg_partition.core.partitions import copy_grants, create_partition
from pg_partition.core.preflight import CAPTURE_TRIGGER_PREFIX, check, preflight, validate_where

__all__ = [
    "ConvertSpec",
    "add_partitions",
    "analyze",
    "build_indexes",
    "capture_on",
    "catch_up",
    "decide_capture",
    "fill",
    "fill_status",
    "format_report",
    "index_plan",
    "install_capture",
    "is_swapped",
    "load_spec",
    "plan_fill",
    "preflight",
    "prep",
    "report",
    "swap",
    "unprep",
    "unswap",
    "validate_where",
    "wait_for_writers",
]

LIKE_OPTIONS = ("INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION INCLUDING GENERATED "
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


def prep(ex: Executor, spec: ConvertSpec, *, lock_timeout: str = "2s", retries: int = 5) -> dict[str, Any]:
    """Create ``<table>_intermediate``, partitioned by RANGE on the column and mirroring the source.

    Mirrored: columns with defaults, NOT NULL, CHECK constraints, storage, compression, statistics targets,
    column and table comments, generated columns, identity (its own sequence, restarted at the swap), extended
    statistics, outgoing foreign keys, owner, grants and every index (temporary names, the original ones restored
    by the swap). Idempotent: on an existing intermediate of the same conversion only missing indexes are added
    (e.g. an index created on the source during the fill).
    """
    conn = ex.conn
    src, warnings, resuming = check(conn, spec)
    for w in warnings:
        ex.logger.warning("%s", w)
    indexes = index_plan(conn, spec, src)
    _start_job(ex, spec, resuming)
    started = time.monotonic()
    exists = catalog.exists(conn, spec.intermediate)
    inter = spec.intermediate

    def body() -> None:
        if spec.tablespace:
            ex.run(sql.SQL("SET LOCAL default_tablespace = {}").format(sql.Literal(spec.tablespace)))
        if not exists:
            ex.run(sql.SQL("CREATE TABLE {i} (LIKE {s} {opts}) PARTITION BY RANGE ({c}){ts}").format(
                i=inter.ident, s=spec.table.ident, opts=sql.SQL(LIKE_OPTIONS), c=sql.Identifier(spec.column),
                ts=sql.SQL(" TABLESPACE {}").format(sql.Identifier(spec.tablespace)) if spec.tablespace
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
            copy_grants(ex, src.grants, inter)
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
        put(ex, spec, "prep", {"indexes": indexes, "source_oid": src.oid})
        set_status(ex, spec, PREPPED)

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"prep {inter}")
    result = {"intermediate": str(inter), "created": not exists, "resumed": resuming, "indexes": indexes,
              "warnings": warnings, "seconds": round(time.monotonic() - started, 3)}
    if not ex.dry_run:
        with conn.transaction():
            put(ex, spec, "timing", {"seconds": result["seconds"]}, "prep")
    return result


def _prep_record(conn: psycopg.Connection[Any], spec: ConvertSpec) -> dict[str, Any]:
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
    if past < 0 or future < 0:
        raise InvalidInputError("past and future must be >= 0", fix="pass counts of periods, e.g. past=24")
    conn = ex.conn
    with timed(ex, spec, f"add_partitions:{target}") as info:
        parent = _parent_for(ex, spec, target)
        wanted = set(window(today or datetime.now(timezone.utc).date(), spec.period, past, future))
        if cover_data:
            data_table = spec.table
            where_sql = validate_where(conn, data_table, where) if target == "intermediate" else None
            lo, hi = _min_max(conn, data_table, spec.column, where_sql)
            if target == "table" and catalog.exists(conn, spec.retired):
                rlo, rhi = _min_max(conn, spec.retired, spec.column, None)
                lo = rlo if lo is None else (lo if rlo is None else min(lo, rlo))
                hi = rhi if hi is None else (hi if rhi is None else max(hi, rhi))
            if lo is not None and hi is not None:
                wanted |= set(covering(lo, hi, spec.period))
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
            created.append(str(made.name))
        default = None
        if spec.default_partition and parent.default_partition is None:
            default = _create_default(ex, spec, parent, pk, lock_timeout=lock_timeout, retries=retries)
        if skipped:
            ex.logger.warning("skipped ranges overlapping existing partitions of %s: %s", parent.name,
                              ", ".join(skipped))
        info.update({"created": created, "skipped_overlapping": skipped, "default": default,
                     "existing": len(existing)})
    return info


def _create_default(ex: Executor, spec: ConvertSpec, parent: TableInfo, pk: tuple[str, ...] | None, *,
                    lock_timeout: str, retries: int) -> str:
    child = spec.default_name

    def body() -> None:
        if ex.dry_run or not catalog.exists(ex.conn, child):
            ex.run(sql.SQL(
                "CREATE TABLE {c} (LIKE {p} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
                "INCLUDING COMPRESSION INCLUDING GENERATED INCLUDING STATISTICS)").format(
                c=child.ident, p=parent.name.ident))
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


def build_indexes(ex: Executor, spec: ConvertSpec) -> dict[str, Any]:
    """Build deferred indexes: an invalid index ON ONLY the parent, one plain CREATE INDEX per partition (the
    partitions are not live, so no CONCURRENTLY is needed), then ATTACH each; the parent index becomes valid
    when the last partition's is attached. Idempotent; reports each index's build time."""
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
        for m in deferred:
            # after the swap the parent's index already carries the source's name
            name = m["source"] if parent_name == spec.table else m["temp"]
            started = time.monotonic()
            if name in have and have[name].is_valid:
                timings.append({"index": name, "seconds": 0.0, "already": True})
                continue
            unique = sql.SQL("UNIQUE ") if m["unique"] else sql.SQL("")
            if name not in have:
                ex.run(sql.SQL("CREATE {}INDEX IF NOT EXISTS {} ON ONLY {} {}").format(
                    unique, sql.Identifier(name), parent_name.ident, sql.SQL(m["tail"])))
            attached = set() if ex.dry_run else {r[0] for r in conn.execute(
                """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                   WHERE i.inhparent = to_regclass(%s)""", (parent_name.sibling(name).ident.as_string(conn),))}
            for part in parts:
                child = part.sibling(fit_identifier(f"{part.name}_{m['source']}", ""))
                if child.name in attached:
                    continue
                t0 = time.monotonic()
                ex.run(sql.SQL("CREATE {}INDEX IF NOT EXISTS {} ON {} {}").format(
                    unique, sql.Identifier(child.name), part.ident, sql.SQL(m["tail"])))
                ex.run(sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                    parent_name.sibling(name).ident, child.ident))
                ex.logger.info("index %s on %s built in %.1fs", child.name, part, time.monotonic() - t0)
            seconds = round(time.monotonic() - started, 3)
            ex.logger.info("deferred index %s built on %d partitions in %.1fs", name, len(parts), seconds)
            timings.append({"index": name, "seconds": seconds})
        info["indexes"] = timings
    return info


def analyze(ex: Executor, spec: ConvertSpec) -> dict[str, Any]:
    """Statistics for every partition and for the parent (the inheritance statistics the planner uses for the
    whole table). Before PostgreSQL 17, ``ANALYZE parent`` already processes every partition, so one statement
    does both (analyzing partitions first would sample everything twice); from 17, partitions one by one (with
    a log line each) and then ``ANALYZE ONLY parent``."""
    conn = ex.conn
    with timed(ex, spec, "analyze") as info:
        parent_name = _live_parent(conn, spec)
        if not catalog.exists(conn, parent_name):
            if not ex.dry_run:
                raise StateError(f"{parent_name} does not exist", fix="run prep first")
            ex.run(sql.SQL("ANALYZE {}").format(parent_name.ident))
            return info
        parent = catalog.describe(conn, parent_name)
        if catalog.server_version_num(conn) >= 170000:
            for part in parent.partitions:
                ex.run(sql.SQL("ANALYZE {}").format(part.name.ident))
            ex.run(sql.SQL("ANALYZE ONLY {}").format(parent_name.ident))
        else:
            ex.run(sql.SQL("ANALYZE {}").format(parent_name.ident))
        info["partitions"] = len(parent.partitions)
    return info


# --- catch-up ------------------------------------------------------------------------------------------------


def _safe_low(conn: psycopg.Connection[Any], spec: ConvertSpec, plan: dict[str, Any]) -> int:
    low = int(plan["high_water"])
    for step in ("catch_up", "swap"):
        cp = checkpoint(conn, spec, step) or {}
        if cp.get("high_water") is not None:
            low = max(low, int(cp["high_water"]))
    return low


def catch_up(
    ex: Executor,
    spec: ConvertSpec,
    *,
    batch_size: int = DEFAULT_BATCH,
    full: bool = False,
    wait_timeout: float = 3600.0,
    throttle: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Copy rows the fill could not see (pgslice's ``fill --swapped``, without its late-commit hole).

    Before the swap it copies from the live table into the intermediate; after it, from the retired table into
    the new one. Only rows above the safe high-water mark are scanned (``full`` scans every id, for ids handed
    out by the application or a cached sequence), and rows already present are skipped by id, so repeating it
    copies nothing twice. Rows outside every partition are counted, not copied.
    """
    conn = ex.conn
    with timed(ex, spec, "catch_up") as info:
        plan = checkpoint(conn, spec, "plan")
        if plan is None:
            plan = plan_fill(ex, spec) if ex.dry_run else recorded_plan(conn, spec)
        job = recorded_job(conn, spec.table)
        swapped = job is not None and job.status == SWAPPED
        src, dst = (spec.retired, spec.table) if swapped else (spec.table, spec.intermediate)
        low = _safe_low(conn, spec, plan)
        if full:
            row = conn.execute(sql.SQL("SELECT min({}) FROM {}").format(sql.Identifier(plan["key"]), src.ident)
                               ).fetchone()
            low = int(row[0]) - 1 if row and row[0] is not None else low
        result = copy_missing(ex, plan, src, dst, low=low, live=not swapped, batch_size=batch_size,
                              wait_timeout=wait_timeout, throttle=throttle, synchronous=swapped)
        prev = checkpoint(conn, spec, "catch_up") or {}
        if not ex.dry_run:
            with conn.transaction():
                put(ex, spec, "catch_up", {
                    "high_water": max(int(result["high_water"]), _safe_low(conn, spec, plan)),
                    "rows": int(prev.get("rows", 0)) + result["rows"], "outside_rows": result["outside_rows"],
                    "after_swap": swapped})
        if result["outside_rows"]:
            ex.logger.warning("catch-up: %d rows of %s fall outside every partition and were not copied",
                              result["outside_rows"], src)
        info.update(result, source=str(src), destination=str(dst), after_swap=swapped)
    return info


# --- change capture ------------------------------------------------------------------------------------------

CAPTURE_STEP = "capture"


def _capture_setting(setting: bool | str | None) -> bool | None:
    """``capture_changes`` as given (True/False, "on"/"off", "true"/"false", "auto"): None means auto."""
    if setting is None or isinstance(setting, bool):
        return setting
    text = str(setting).strip().lower()
    if text in ("", "auto", "none", "null"):
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError(f"capture_changes={setting!r} is not auto, on or off",
                            fix="use auto (on when the table has seen UPDATE/DELETE), on/true or off/false")


def decide_capture(conn: psycopg.Connection[Any], spec: ConvertSpec, setting: bool | str | None = "auto", *,
                   where: str | None = None) -> dict[str, Any]:
    """Whether this conversion captures changes (read-only). Returns ``{"capture": bool, "reason": str}``.

    An explicit on/off wins. ``auto`` reuses the decision recorded by an earlier run of the same conversion (so a
    resumed run does not flip because the application updated a row meanwhile), keeps capture that is already
    installed, and otherwise asks :func:`capture.should_capture` (on when pg_stat_user_tables shows UPDATE or
    DELETE). Capture with a ``where`` filter is refused: replay copies every changed key's current row, filter
    or not, and verification compares whole tables, so the two cannot agree.
    """
    explicit = _capture_setting(setting)
    recorded = checkpoint(conn, spec, CAPTURE_STEP)
    installed = catalog.exists(conn, spec.table) and capture.is_installed(conn, spec.table)
    if explicit is not None:
        on, reason = explicit, f"capture_changes={'on' if explicit else 'off'} (explicit)"
    elif recorded is not None:
        on, reason = bool(recorded["capture"]), f"as decided earlier for this conversion: {recorded['reason']}"
    elif installed:
        on, reason = True, f"change capture is already installed on {spec.table}"
    else:
        on, reason = capture.should_capture(conn, spec.table, "auto")
    if on and where is not None and where.strip():
        raise InvalidInputError(
            f"change capture cannot be combined with a where filter ({where!r}) on {spec.table}",
            where=str(spec.table),
            fix="either convert every row with capture (leave where empty), or pass capture_changes=off to copy "
            "only the filtered rows in append-only mode (fill + catch-up); UPDATE/DELETE are then not carried over")
    return {"capture": on, "reason": reason, "installed": installed}


def install_capture(ex: Executor, spec: ConvertSpec, setting: bool | str | None = "auto", *,
                    where: str | None = None, lock_timeout: str = "2s", retries: int = 5) -> dict[str, Any]:
    """Decide (:func:`decide_capture`) and make it so, before the fill: install the triggers and changelog
    (:func:`capture.install`, which waits for in-flight writers so no write is missed) or, for an explicit off,
    remove a capture an earlier run installed. The decision is recorded with the conversion.

    Installing capture after a fill plan was recorded without it (a run resumed with capture newly on) forgets
    the plan and the fill's checkpoints: rows changed between those batches and now were not captured, so the
    fill must copy everything again (batches replace their ranges, so nothing is duplicated).
    """
    conn = ex.conn
    decision = decide_capture(conn, spec, setting, where=where)
    out: dict[str, Any] = {**decision, "created": False, "removed": False, "replanned": False}
    if not decision["capture"]:
        if decision["installed"]:
            ex.logger.warning("capture_changes is off but capture is installed on %s: removing it (updates and "
                              "deletes are no longer carried over; catch-up copies new rows)", spec.table)
            out["removed"] = capture.uninstall(ex, spec.table, lock_timeout=lock_timeout, retries=retries)
    else:
        planned = checkpoint(conn, spec, "plan") is not None
        # a rehearsal before prep ran has no intermediate: the source stands in for the column check
        dest = spec.intermediate if not ex.dry_run or catalog.exists(conn, spec.intermediate) else spec.table
        out["created"] = capture.install(ex, spec.table, dest, lock_timeout=lock_timeout, retries=retries)
        if out["created"] and planned and not ex.dry_run:
            ex.logger.warning("capture was installed after the fill of %s was planned: planning and filling again "
                              "(changes made before capture existed may not have been copied)", spec.table)
            with conn.transaction():
                forget(conn, spec, ("plan", "fill", "catch_up"))
            out["replanned"] = True
    ex.logger.info("change capture for %s: %s (%s)", spec.table, "on" if decision["capture"] else "off",
                   decision["reason"])
    if not ex.dry_run and state_ready(conn) and recorded_job(conn, spec.table) is not None:
        with conn.transaction():
            put(ex, spec, CAPTURE_STEP, {"capture": decision["capture"], "reason": decision["reason"]})
    return out


def capture_on(conn: psycopg.Connection[Any], table: QualifiedName) -> bool:
    """Whether the conversion of ``table`` runs with change capture: the recorded decision, else whether capture
    is installed (before the swap). Used to skip the capture tasks, or the catch-up, of the other mode."""
    rec = checkpoint(conn, ConvertSpec(table, "-"), CAPTURE_STEP)
    if rec is not None:
        return bool(rec["capture"])
    return catalog.exists(conn, table) and capture.is_installed(conn, table)


# --- swap ----------------------------------------------------------------------------------------------------


def _publications(conn: psycopg.Connection[Any], table: QualifiedName) -> tuple[list[dict[str, Any]], list[str]]:
    """Explicit memberships of ``table`` (with row filter and column list), and every publication that
    publishes it (FOR ALL TABLES / TABLES IN SCHEMA included)."""
    oid = catalog.table_oid(conn, table)
    explicit = conn.execute(
        """SELECT p.pubname, pg_get_expr(pr.prqual, pr.prrelid),
                  CASE WHEN pr.prattrs IS NOT NULL THEN array(
                      SELECT a.attname FROM pg_attribute a WHERE a.attrelid = pr.prrelid
                      AND a.attnum = ANY(pr.prattrs::int2[]) ORDER BY a.attnum)::text[] END
           FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
           WHERE pr.prrelid = %s ORDER BY 1""", (oid,)).fetchall()
    every = conn.execute(
        "SELECT DISTINCT pubname FROM pg_publication_tables WHERE schemaname = %s AND tablename = %s ORDER BY 1",
        (table.schema, table.name)).fetchall()
    return ([{"name": r[0], "row_filter": r[1], "columns": r[2]} for r in explicit], [r[0] for r in every])


def _move_publications(ex: Executor, explicit: list[dict[str, Any]], every: list[str], old: QualifiedName,
                       new: QualifiedName, *, via_root: bool) -> None:
    conn = ex.conn
    if via_root:
        for pubname in every:
            row = conn.execute("SELECT pubviaroot FROM pg_publication WHERE pubname = %s", (pubname,)).fetchone()
            if row and not row[0]:
                ex.run(sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(
                    sql.Identifier(pubname)))
    for pub in explicit:
        ex.run(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(sql.Identifier(pub["name"]), old.ident))
        cols = sql.SQL(" ({})").format(sql.SQL(", ").join(map(sql.Identifier, pub["columns"]))) \
            if pub["columns"] else sql.SQL("")
        filt = sql.SQL(" WHERE ({})").format(sql.SQL(pub["row_filter"])) if pub["row_filter"] else sql.SQL("")
        ex.run(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}{}{}").format(
            sql.Identifier(pub["name"]), new.ident, cols, filt))


def _sequence_state(conn: psycopg.Connection[Any], seq: QualifiedName) -> int:
    """The next value the sequence would hand out."""
    row = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(seq.ident)).fetchone()
    assert row is not None
    return int(row[0]) + 1 if row[1] else int(row[0])


def _move_sequences(ex: Executor, old_info: TableInfo, new_info: TableInfo, new_name: QualifiedName, *,
                    top: int) -> list[str]:
    """Carry id generation from the table that stops being live (``old``) to the one that becomes live (``new``),
    both already renamed; ``top`` is the largest id the new live table holds. Serial: the shared sequence
    changes owner. Identity: the new table's own identity is restarted past every id either side handed out,
    and the two sequences swap names. Both TableInfos are read before the lock; only the sequences' positions
    are read under it."""
    conn = ex.conn
    done: list[str] = []
    for col, old_seq in old_info.sequences.items():
        column = old_info.column(col)
        if column is None:
            continue
        if column.identity:
            new_seq = new_info.sequences.get(col)
            if new_seq is None:
                raise StateError(f"{new_name}.{col} has no identity sequence", fix="re-create it with prep")
            restart = max(_sequence_state(conn, old_seq), _sequence_state(conn, new_seq), top + 1)
            ex.run(sql.SQL("ALTER TABLE {} ALTER COLUMN {} RESTART WITH {}").format(
                new_name.ident, sql.Identifier(col), sql.Literal(restart)))
            parked = old_seq.sibling(fit_identifier(old_seq.name, "_swap"))
            ex.run(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(old_seq.ident, sql.Identifier(parked.name)))
            ex.run(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(new_seq.ident, sql.Identifier(old_seq.name)))
            ex.run(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(parked.ident, sql.Identifier(new_seq.name)))
            done.append(f"{col}: identity restarted at {restart}")
        else:
            ex.run(sql.SQL("ALTER SEQUENCE {} OWNED BY {}.{}").format(
                old_seq.ident, new_name.ident, sql.Identifier(col)))
            done.append(f"{col}: {old_seq} now owned by {new_name}")
    return done


def _capture_triggers(conn: psycopg.Connection[Any], table: QualifiedName) -> list[str]:
    oid = catalog.table_oid(conn, table)
    return [r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal AND tgname LIKE %s",
        (oid, CAPTURE_TRIGGER_PREFIX + "%"))]


def is_swapped(conn: psycopg.Connection[Any], spec: ConvertSpec) -> bool:
    job = recorded_job(conn, spec.table)
    if job is None or job.status != SWAPPED:
        return False
    info = catalog.describe(conn, spec.table) if catalog.exists(conn, spec.table) else None
    return info is not None and info.is_partitioned and catalog.exists(conn, spec.retired)


def _notify(ex: Executor, spec: ConvertSpec) -> None:
    ex.run(sql.SQL("SELECT pg_notify('pg_partition', {})").format(sql.Literal(str(spec.table))))


def swap(
    ex: Executor,
    spec: ConvertSpec,
    *,
    lock_timeout: str = "2s",
    retries: int = 5,
    sync: bool = True,
    require_complete_fill: bool = True,
    wait_timeout: float = 3600.0,
) -> dict[str, Any]:
    """Make the partitioned table live in one short transaction under ``lock_timeout`` with retries.

    Under ACCESS EXCLUSIVE on both tables: finish change capture if it is installed, copy the rows committed
    since the last catch-up (``sync``; an anti-join above the safe high-water mark, so only seconds' worth of
    rows), rename ``<table>`` to ``<table>_retired`` and the intermediate to ``<table>``, restore index names,
    move sequence ownership or restart identity, carry publication membership (publish_via_partition_root),
    re-grant, ``NOTIFY pg_partition, '<table>'`` and record the swap. Logs how long the lock was held.
    """
    conn = ex.conn
    if not ex.dry_run and is_swapped(conn, spec):
        ex.logger.info("%s is already swapped in; nothing to do", spec.table)
        return {"already_swapped": True, **(checkpoint(conn, spec, "swap") or {})}
    if not catalog.exists(conn, spec.intermediate) and not ex.dry_run:
        raise StateError(f"{spec.intermediate} does not exist", fix="run prep, add_partitions and fill first")
    src = catalog.describe(conn, spec.table)
    if src.is_partitioned:
        raise PreflightError(f"{spec.table} is already partitioned", fix="nothing to swap")
    rec = checkpoint(conn, spec, "prep")
    indexes = rec["indexes"] if rec else index_plan(conn, spec, src)
    plan = checkpoint(conn, spec, "plan")
    if not ex.dry_run:
        status = fill_status(conn, spec)
        if require_complete_fill and (not status["planned"] or status["pending"]):
            raise StateError(
                f"the fill of {spec.intermediate} is not complete (pending: {status['pending'] or 'no plan'})",
                fix="run plan_fill and fill for every item (or pass require_complete_fill=false to swap anyway)")
        known = {m["source"] for m in indexes}
        extra = [i.name for i in src.indexes if i.name not in known]
        if extra:
            raise StateError(f"{spec.table} has indexes created after prep: {', '.join(extra)}",
                             fix="run prep again (it adds missing indexes to the intermediate), then swap")
        inter_idx = {i.name: i for i in catalog.describe(conn, spec.intermediate).indexes}
        missing = [m["temp"] for m in indexes if m["on_parent"] and not (
            m["temp"] in inter_idx and inter_idx[m["temp"]].is_valid)]
        if missing:
            raise StateError(f"indexes of {spec.intermediate} are missing or not yet valid: {', '.join(missing)}",
                             fix="run the indexes step (build_indexes) first")
    explicit, every = _publications(conn, spec.table)
    low = _safe_low(conn, spec, plan) if plan else 0
    # every catalog read happens here, before the lock: the locked transaction only acts
    new_info = None if ex.dry_run else catalog.describe(conn, spec.intermediate)
    prepared = prepare_locked_copy(conn, plan, spec.table, spec.intermediate) \
        if sync and plan and not ex.dry_run else None
    last_pass: dict[str, Any] | None = None
    if prepared is not None:
        # one more catch-up just before locking: the locked anti-join then only sees the last milliseconds' rows
        last_pass = copy_missing(ex, plan, spec.table, spec.intermediate, low=low, live=True,
                                 wait_timeout=wait_timeout)
        low = max(low, int(last_pass["high_water"]))
    lock_started: list[float] = []
    outcome: dict[str, Any] = {}

    def body() -> None:
        lock_started.clear()
        ex.run(sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(
            spec.table.ident, spec.intermediate.ident))
        lock_started.append(time.monotonic())
        triggers = _capture_triggers(conn, spec.table)
        if triggers:
            capture.finish_in_swap(ex, source=spec.table, dest=spec.intermediate)
        synced = copy_missing_locked(ex, prepared, low=low) if prepared is not None else {
            "rows": 0, "outside_rows": 0, "high_water": low}
        ex.run(sql.SQL("ALTER TABLE {} RENAME TO {}").format(spec.table.ident, sql.Identifier(spec.retired.name)))
        ex.run(sql.SQL("ALTER TABLE {} RENAME TO {}").format(spec.intermediate.ident,
                                                            sql.Identifier(spec.table.name)))
        for m in indexes:
            if not m["on_parent"]:
                continue
            ex.run(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                spec.table.sibling(m["source"]).ident, sql.Identifier(m["retired"])))
            ex.run(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                spec.table.sibling(m["temp"]).ident, sql.Identifier(m["source"])))
        seqs = _move_sequences(ex, src, new_info, spec.table, top=int(synced["high_water"])) \
            if new_info is not None else []
        _move_publications(ex, explicit, every, spec.retired, spec.table, via_root=True)
        copy_grants(ex, src.grants, spec.table)
        _notify(ex, spec)
        put(ex, spec, "swap", {"high_water": synced["high_water"], "synced_rows": synced["rows"],
                               "outside_rows": synced["outside_rows"]})
        set_status(ex, spec, SWAPPED)
        outcome.update(synced=synced, sequences=seqs, capture_triggers=triggers,
                       lock_body_ms=round((time.monotonic() - lock_started[0]) * 1000, 1))

    started = time.monotonic()
    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"swap {spec.table}")
    lock_ms = round((time.monotonic() - lock_started[0]) * 1000, 1) if lock_started else 0.0
    ex.logger.info("swap of %s: ACCESS EXCLUSIVE lock held for %.1f ms (%d rows synced under the lock)",
                   spec.table, lock_ms, outcome.get("synced", {}).get("rows", 0))
    result = {"lock_ms": lock_ms, "seconds": round(time.monotonic() - started, 3),
              "publications": [p["name"] for p in explicit], "last_pass_rows": last_pass["rows"] if last_pass else 0,
              **outcome}
    if not ex.dry_run:
        with conn.transaction():
            put(ex, spec, "swap", {**result, "high_water": outcome["synced"]["high_water"]})
            put(ex, spec, "timing", {"seconds": result["seconds"], "lock_ms": lock_ms}, "swap")
    return result


def unswap(ex: Executor, spec: ConvertSpec, *, lock_timeout: str = "2s", retries: int = 5,
           wait_timeout: float = 3600.0) -> dict[str, Any]:
    """Roll a swap back: the original table becomes live again, the partitioned one the intermediate.

    Rows inserted into the partitioned table after the swap are copied back first (outside the lock, then the
    last few under it), so nothing the application wrote is lost; updates or deletes made after the swap to rows
    that existed before it are not carried back (append-only mode).

    Change capture: the swap removed it, so nothing keeps the intermediate in step with the table any more. Any
    capture leftover is removed, and when the conversion ran with capture its fill checkpoints are forgotten, so
    a later swap is refused until a new run installs capture again and fills again (otherwise updates made after
    the unswap would be silently lost).
    """
    conn = ex.conn
    if not is_swapped(conn, spec):
        if catalog.exists(conn, spec.intermediate) and not catalog.describe(conn, spec.table).is_partitioned:
            ex.logger.info("%s is not swapped; nothing to unswap", spec.table)
            return {"already_unswapped": True}
        if not ex.dry_run:
            raise StateError(f"{spec.table} is not a swapped-in conversion", fix="nothing to roll back")
    rec = _prep_record(conn, spec)
    plan = recorded_plan(conn, spec)
    back = dict(plan, has_default=True, where=None)  # every row written after the swap goes back
    swap_cp = checkpoint(conn, spec, "swap") or {}
    low = int(swap_cp.get("high_water", plan["high_water"]))
    pre = copy_missing(ex, back, spec.table, spec.retired, low=low, live=True, wait_timeout=wait_timeout)
    new_info = catalog.describe(conn, spec.table)
    old_info = catalog.describe(conn, spec.retired)
    explicit, _ = _publications(conn, spec.table)
    prepared = prepare_locked_copy(conn, back, spec.table, spec.retired)
    captured = capture_on(conn, spec.table)
    lock_started: list[float] = []
    outcome: dict[str, Any] = {}

    def body() -> None:
        lock_started.clear()
        ex.run(sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(spec.table.ident, spec.retired.ident))
        lock_started.append(time.monotonic())
        synced = copy_missing_locked(ex, prepared, low=int(pre["high_water"]))
        ex.run(sql.SQL("ALTER TABLE {} RENAME TO {}").format(spec.table.ident,
                                                            sql.Identifier(spec.intermediate.name)))
        ex.run(sql.SQL("ALTER TABLE {} RENAME TO {}").format(spec.retired.ident, sql.Identifier(spec.table.name)))
        for m in rec["indexes"]:
            if not m["on_parent"]:
                continue
            ex.run(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                spec.table.sibling(m["source"]).ident, sql.Identifier(m["temp"])))
            ex.run(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                spec.table.sibling(m["retired"]).ident, sql.Identifier(m["source"])))
        top = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(
            sql.Identifier(plan["key"]), spec.table.ident)).fetchone()
        seqs = _move_sequences(ex, new_info, old_info, spec.table,
                               top=max(int(synced["high_water"]), int(top[0]) if top and top[0] else 0))
        _move_publications(ex, explicit, [], spec.intermediate, spec.table, via_root=False)
        _notify(ex, spec)
        if not ex.dry_run:
            forget(conn, spec, ("swap", CAPTURE_STEP, *(("plan", "fill", "catch_up") if captured else ())))
        set_status(ex, spec, PREPPED)
        outcome.update(synced_rows=synced["rows"], sequences=seqs)

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"unswap {spec.table}")
    lock_ms = round((time.monotonic() - lock_started[0]) * 1000, 1) if lock_started else 0.0
    ex.logger.info("unswap of %s: ACCESS EXCLUSIVE lock held for %.1f ms", spec.table, lock_ms)
    removed = capture.uninstall(ex, spec.table, lock_timeout=lock_timeout, retries=retries)
    if captured:
        ex.logger.warning("the conversion of %s ran with change capture: its fill is forgotten; run the DAG again "
                          "(it installs capture and fills again) before swapping again", spec.table)
    return {"lock_ms": lock_ms, "copied_back_rows": pre["rows"] + outcome.get("synced_rows", 0),
            "capture_removed": removed, "refill_needed": captured, **outcome}


def unprep(ex: Executor, spec: ConvertSpec, *, lock_timeout: str = "2s", retries: int = 5) -> dict[str, Any]:
    """Remove change capture (triggers, function, changelog), drop the intermediate table (with its partitions)
    and forget the conversion. Refused while swapped."""
    conn = ex.conn
    if is_swapped(conn, spec):
        raise StateError(f"{spec.table} is the swapped-in partitioned table; unprep would drop live data",
                         fix="run unswap first")
    # the capture triggers first: they cost the application on every write and feed only the intermediate
    capture_removed = catalog.exists(conn, spec.table) and capture.uninstall(
        ex, spec.table, lock_timeout=lock_timeout, retries=retries)
    dropped = False
    if catalog.exists(conn, spec.intermediate):
        inter = catalog.describe(conn, spec.intermediate)
        if not inter.is_partitioned:
            raise StateError(f"{spec.intermediate} is not partitioned, so it is not this conversion's",
                             fix="inspect and drop it by hand")

        def body() -> None:
            ex.run(sql.SQL("DROP TABLE {}").format(spec.intermediate.ident))

        ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"unprep {spec.intermediate}")
        dropped = True
    if not ex.dry_run and state_ready(conn):
        forget(conn, spec)
    return {"dropped": dropped, "intermediate": str(spec.intermediate), "capture_removed": capture_removed}


# --- report --------------------------------------------------------------------------------------------------


def _count(conn: psycopg.Connection[Any], table: QualifiedName, exact: bool) -> int:
    if exact:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()
    else:
        row = conn.execute("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass(%s)",
                           (table.ident.as_string(conn),)).fetchone()
    return int(row[0]) if row else 0


def report(conn: psycopg.Connection[Any], spec: ConvertSpec, *, exact_below: int = 5_000_000) -> dict[str, Any]:
    """Rows and size before/after, per-partition rows and bytes, time per step, swap lock time, rows left out."""
    swapped = is_swapped(conn, spec)
    new = spec.table if swapped else spec.intermediate
    old = spec.retired if swapped else spec.table
    out: dict[str, Any] = {"table": str(spec.table), "swapped": swapped, "before": None, "after": None}
    if catalog.exists(conn, old):
        info = catalog.describe(conn, old)
        exact = info.row_estimate < exact_below
        out["before"] = {"table": str(old), "rows": _count(conn, old, exact), "rows_exact": exact,
                         "bytes": info.sizes.total}
    if catalog.exists(conn, new):
        info = catalog.describe(conn, new)
        exact = info.row_estimate < exact_below
        parts = [{"name": str(p.name), "from": p.range_from, "to": p.range_to, "default": p.is_default,
                  "rows": _count(conn, p.name, exact),
                  "bytes": catalog.sizes(conn, catalog.table_oid(conn, p.name) or 0).total}
                 for p in info.partitions]
        out["after"] = {"table": str(new), "rows": sum(p["rows"] for p in parts), "rows_exact": exact,
                        "bytes": info.sizes.total, "partitions": parts}
    if state_ready(conn):
        out["timings"] = state.checkpoints(conn, spec.job_id, "timing")
        plan = checkpoint(conn, spec, "plan") or {}
        out["fill"] = {"planned_rows": plan.get("rows"), "outside_rows": plan.get("outside_rows"),
                       "strategy": plan.get("strategy"), "high_water": plan.get("high_water"),
                       "copied_rows": fill_status(conn, spec)["rows"]}
        out["swap"] = checkpoint(conn, spec, "swap")
        out["catch_up"] = checkpoint(conn, spec, "catch_up")
        out["capture"] = checkpoint(conn, spec, CAPTURE_STEP)
        job = recorded_job(conn, spec.table)
        out["status"] = job.status if job else None
    return out


def format_report(rep: dict[str, Any]) -> str:
    """The report as a few readable lines for task logs and ``make demo``."""
    lines = [f"conversion of {rep['table']} ({'swapped' if rep['swapped'] else 'not swapped'})"]
    b, a = rep.get("before"), rep.get("after")
    if b:
        lines.append(f"  before: {b['table']}: {b['rows']:,} rows, {b['bytes'] / 2**20:,.1f} MiB")
    if a:
        lines.append(f"  after:  {a['table']}: {a['rows']:,} rows, {a['bytes'] / 2**20:,.1f} MiB, "
                     f"{len(a['partitions'])} partitions")
        for p in a["partitions"]:
            if p["rows"]:
                lines.append(f"    {p['name']}: {p['rows']:,} rows, {p['bytes'] / 2**20:,.1f} MiB")
    if rep.get("capture"):
        lines.append(f"  change capture: {'on' if rep['capture']['capture'] else 'off'} ({rep['capture']['reason']})")
    fill_info = rep.get("fill") or {}
    if fill_info.get("outside_rows"):
        lines.append(f"  rows outside every partition (not copied): {fill_info['outside_rows']:,}")
    for step, t in sorted((rep.get("timings") or {}).items()):
        extra = f", lock {t['lock_ms']} ms" if "lock_ms" in t else ""
        lines.append(f"  step {step}: {t.get('seconds', 0):.1f}s{extra}")
    return "\n".join(lines)

