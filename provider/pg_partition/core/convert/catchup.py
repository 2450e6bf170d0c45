"""Append-only catch-up: copy rows written to the source after the fill (before and after the swap)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert.fill import (
    DEFAULT_BATCH,
    FillProgress,
    Throttle,
    copy_columns,
    coverage_sql,
    id_ceiling,
    needs_override,
    plan_fill,
    recorded_plan,
    wait_for_writers,
)
from pg_partition.core.convert.preflight import validate_where
from pg_partition.core.convert.spec import (
    SWAPPED,
    ConvertSpec,
    checkpoint,
    put,
    recorded_job,
    timed,
)
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.names import ColumnKind

log = logging.getLogger("pg_partition")



def safe_low(conn: psycopg.Connection[Any], spec: ConvertSpec, plan: dict[str, Any]) -> int:
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
        low = safe_low(conn, spec, plan)
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
                    "high_water": max(int(result["high_water"]), safe_low(conn, spec, plan)),
                    "rows": int(prev.get("rows", 0)) + result["rows"], "outside_rows": result["outside_rows"],
                    "after_swap": swapped})
        if result["outside_rows"]:
            ex.logger.warning("catch-up: %d rows of %s fall outside every partition and were not copied",
                              result["outside_rows"], src)
        info.update(result, source=str(src), destination=str(dst), after_swap=swapped)
    return info

# --- catch-up ------------------------------------------------------------------------------------------------


def _missing_rows_insert(plan: dict[str, Any], src: QualifiedName, dst: QualifiedName, cols: list[str],
                         override: bool, where_sql: sql.Composable | None, low: int,
                         high: int | None) -> tuple[sql.Composed, sql.Composed]:
    """INSERT the rows of ``src`` with ``low < id <= high`` that ``dst`` lacks (by id), and COUNT the rows of
    that window that fall outside every partition (they cannot be inserted; they are reported)."""
    kind = ColumnKind(plan["kind"])
    k = sql.Identifier(plan["key"])
    window: list[sql.Composable] = [sql.SQL("s.{} > {}").format(k, sql.Literal(low))]
    if high is not None:
        window.append(sql.SQL("s.{} <= {}").format(k, sql.Literal(high)))
    if where_sql is not None:
        window.append(where_sql)
    collist = sql.SQL(", ").join(map(sql.Identifier, cols))
    scols = sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in cols)
    inside = [] if plan["has_default"] else [coverage_sql(plan["column"], kind, plan["covered"], inside=True)]
    insert = sql.SQL(
        "INSERT INTO {d} ({c}){o} SELECT {sc} FROM {s} s WHERE {w} "
        "AND NOT EXISTS (SELECT 1 FROM {d} x WHERE x.{k} = s.{k})"
    ).format(d=dst.ident, c=collist, sc=scols, s=src.ident, k=k,
             w=sql.SQL(" AND ").join([*window, *inside]),
             o=sql.SQL(" OVERRIDING SYSTEM VALUE") if override else sql.SQL(""))
    outside = sql.SQL("SELECT count(*) FROM {s} s WHERE {w} AND {o}").format(
        s=src.ident, w=sql.SQL(" AND ").join(window),
        o=coverage_sql(plan["column"], kind, plan["covered"], inside=False) if not plan["has_default"]
        else sql.SQL("false"))
    return insert, outside


def copy_missing(
    ex: Executor,
    plan: dict[str, Any],
    src: QualifiedName,
    dst: QualifiedName,
    *,
    low: int,
    live: bool,
    batch_size: int = DEFAULT_BATCH,
    wait_timeout: float = 3600.0,
    throttle: Throttle | None = None,
    synchronous: bool = True,
) -> dict[str, Any]:
    """Copy every row of ``src`` with ``id > low`` that ``dst`` lacks, in batches. Returns the rows copied, the
    rows outside every partition, and the new safe high-water mark: with ``live`` (``src`` still takes writes)
    the id ceiling read before waiting for in-flight writers; otherwise the largest id of ``src``."""
    conn = ex.conn
    info = catalog.describe(conn, src)
    key = plan["key"]
    cols = copy_columns(info)
    override = needs_override(info) or (catalog.exists(conn, dst) and needs_override(catalog.describe(conn, dst)))
    where_sql = validate_where(conn, src, plan.get("where"))
    # the ceiling is read as late as possible: rows committed after it are left for the next pass
    ceiling = id_ceiling(conn, info, key)
    if live:
        wait_for_writers(conn, src, timeout=wait_timeout, logger=ex.logger)
    top_row = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(key), src.ident)).fetchone()
    top = int(top_row[0]) if top_row and top_row[0] is not None else low
    copied = outside = 0
    cursor = low
    progress = FillProgress(f"catch-up {src} -> {dst}", math.ceil(max(top - low, 0) / batch_size),
                            every=10.0, logger=ex.logger)
    while cursor < top:
        upper = min(cursor + batch_size, top)
        insert, count_outside = _missing_rows_insert(plan, src, dst, cols, override, where_sql, cursor, upper)
        with ex.transaction():
            if not synchronous and not ex.dry_run:
                conn.execute("SET LOCAL synchronous_commit = off")
            # the first batch's INSERT at INFO (the template), the others at DEBUG
            cur = ex.run(insert, level=logging.INFO if cursor == low else logging.DEBUG)
            n = max(cur.rowcount, 0) if cur is not None else 0
            out_row = conn.execute(count_outside).fetchone()
        copied += n
        outside += int(out_row[0]) if out_row else 0
        progress.rows += n
        progress.add(1, force=upper >= top)
        cursor = upper
        if ex.dry_run:
            break
        if throttle is not None and cursor < top:
            throttle()
    return {"rows": copied, "outside_rows": outside, "high_water": ceiling if live else max(top, low),
            "scanned_from": low, "scanned_to": top}


@dataclass(frozen=True)
class LockedCopy:
    """Everything the last anti-join needs, read from the catalog *before* the exclusive lock is taken, so the
    locked transaction runs only the copy itself (the swap's lock time is what the application feels)."""

    plan: dict[str, Any]
    src: QualifiedName
    dst: QualifiedName
    cols: list[str]
    override: bool
    where_sql: sql.Composable | None


def prepare_locked_copy(conn: psycopg.Connection[Any], plan: dict[str, Any], src: QualifiedName,
                        dst: QualifiedName) -> LockedCopy:
    info = catalog.describe(conn, src)
    override = needs_override(info) or (catalog.exists(conn, dst) and needs_override(catalog.describe(conn, dst)))
    return LockedCopy(plan, src, dst, copy_columns(info), override, validate_where(conn, src, plan.get("where")))


def copy_missing_locked(ex: Executor, prepared: LockedCopy, *, low: int) -> dict[str, Any]:
    """The last anti-join, in the caller's transaction (under the swap's exclusive lock): one INSERT of the rows
    above ``low`` the destination lacks, a count of rows outside every partition, and the source's largest id.
    Builds its SQL from ``prepared`` without reading the catalog."""
    conn = ex.conn
    p = prepared
    insert, count_outside = _missing_rows_insert(p.plan, p.src, p.dst, p.cols, p.override, p.where_sql, low, None)
    cur = ex.run(insert)
    n = max(cur.rowcount, 0) if cur is not None else 0
    outside = conn.execute(count_outside).fetchone() if not p.plan["has_default"] else None
    top_row = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(p.plan["key"]), p.src.ident)
                           ).fetchone()
    top = int(top_row[0]) if top_row and top_row[0] is not None else low
    return {"rows": n, "outside_rows": int(outside[0]) if outside else 0, "high_water": max(top, low)}
