"""Append-only catch-up: copy rows written to the source after the fill (before and after the swap)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert.capture import composite_key_refusal
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
from pg_partition.core.db.catalog import QualifiedName, TableInfo
from pg_partition.core.db.errors import PartitionError
from pg_partition.core.db.execute import Executor, read_only
from pg_partition.core.db.locks import locks_table
from pg_partition.core.db.names import ColumnKind
from pg_partition.core.params import BATCH_SIZE, bounded_int

log = logging.getLogger("pg_partition")



def safe_low(conn: psycopg.Connection[Any], spec: ConvertSpec, plan: dict[str, Any]) -> int:
    low = int(plan["high_water"])
    for step in ("catch_up", "swap"):
        cp = checkpoint(conn, spec, step) or {}
        if cp.get("high_water") is not None:
            low = max(low, int(cp["high_water"]))
    return low


@locks_table()  # the per-table lock, also for a direct caller of the engine
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
    batch_size = bounded_int(batch_size, what="batch_size", bounds=BATCH_SIZE, fix="pass e.g. batch_size=10000")
    conn = ex.conn
    with timed(ex, spec, "catch_up") as info:
        plan = checkpoint(conn, spec, "plan")
        if plan is None:
            plan = plan_fill(ex, spec) if ex.dry_run else recorded_plan(conn, spec)
        job = recorded_job(conn, spec.table)
        swapped = job is not None and job.status == SWAPPED
        src, dst = (spec.retired, spec.table) if swapped else (spec.table, spec.intermediate)
        if not swapped and not full:
            refusal = composite_key_refusal(conn, spec.table)
            if refusal is not None:
                raise refusal
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


def key_columns(conn: psycopg.Connection[Any], plan: dict[str, Any], *tables: QualifiedName) -> list[str]:
    """The whole primary key, from the first of ``tables`` that has one on its own (a per-partition key lives on
    the partitions, not the parent). Matching rows by the first key column alone loses a new row that shares it
    with an existing one (a composite key ``(account_id, id)``)."""
    for table in tables:
        if catalog.exists(conn, table):
            pk = catalog.describe(conn, table).primary_key
            if pk is not None and pk.columns:
                return list(pk.columns)
    return list(plan.get("key_columns") or [plan["key"]])


def current_coverage(conn: psycopg.Connection[Any], plan: dict[str, Any], dst: QualifiedName) -> dict[str, Any]:
    """``plan`` with the partitions ``dst`` has now (add_partitions may have run since the fill was planned), so a
    row the user made room for is copied, and a row with no partition is counted."""
    if not catalog.exists(conn, dst):
        return plan
    info = catalog.describe(conn, dst)
    if not info.is_partitioned:
        return plan
    covered = [[p.range_from, p.range_to] for p in info.partitions
               if not p.is_default and p.range_from is not None and p.range_to is not None]
    return dict(plan, covered=covered, has_default=info.default_partition is not None)


def _column_index(conn: psycopg.Connection[Any], table: QualifiedName, column: str) -> str | None:
    """A valid, non-partial btree index of ``table`` whose first column is ``column`` (it answers each range
    probe of :func:`rows_outside` with an index scan), or None."""
    for idx in catalog.describe(conn, table).indexes:
        if (idx.is_valid and idx.columns[:1] == (column,) and " USING btree " in idx.definition
                and " WHERE " not in idx.definition):
            return idx.name
    return None


def outside_ranges(conn: psycopg.Connection[Any], plan: dict[str, Any], dst: QualifiedName) -> list[sql.Composable]:
    """The partition-column conditions no partition of ``dst`` takes: NULL, below the first partition, each gap
    between partitions, above the last (empty when a DEFAULT partition takes everything)."""
    cov = current_coverage(conn, plan, dst)
    if cov.get("has_default") or not catalog.exists(conn, dst) or not catalog.describe(conn, dst).is_partitioned:
        return []
    kind = ColumnKind(plan["kind"])
    c = sql.Identifier(plan["column"])
    typ = sql.SQL(kind.value)
    texts = sorted({b for r in cov["covered"] for b in r})
    order = dict(zip(texts, (r[0] for r in conn.execute(sql.SQL("SELECT x::{} FROM unnest(%s::text[]) x").format(
        typ), (texts,)).fetchall()), strict=True)) if texts else {}
    merged: list[list[str]] = []
    for lo, hi in sorted(cov["covered"], key=lambda r: order[r[0]]):
        if merged and order[lo] <= order[merged[-1][1]]:
            if order[hi] > order[merged[-1][1]]:
                merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    if not merged:
        return [sql.SQL("true")]
    conds: list[sql.Composable] = [sql.SQL("{} IS NULL").format(c),
                                   sql.SQL("{} < {}::{}").format(c, sql.Literal(merged[0][0]), typ)]
    for a, b in itertools.pairwise(merged):
        conds.append(sql.SQL("({c} >= {hi}::{t} AND {c} < {lo}::{t})").format(
            c=c, hi=sql.Literal(a[1]), lo=sql.Literal(b[0]), t=typ))
    conds.append(sql.SQL("{} >= {}::{}").format(c, sql.Literal(merged[-1][1]), typ))
    return conds


def rows_outside(conn: psycopg.Connection[Any], plan: dict[str, Any], src: QualifiedName,
                 dst: QualifiedName, *, logger: logging.Logger | None = None) -> tuple[int, Any, Any, int]:
    """Rows of ``src`` (the conversion's ``where`` applied) that no partition of ``dst`` takes and that no DEFAULT
    partition catches: (count, lowest and highest partition-column value, NULLs).

    Index-driven when ``src`` has an index on the partition column: one ``EXISTS`` probe per range (NULLs, below
    the first partition, each gap, above the last), each an index scan that stops at the first row, so the check
    costs milliseconds whatever the table's size; only ranges that hold rows are counted (the refusal's
    numbers). Without such an index, one scan of the source answers every range at once."""
    conds = outside_ranges(conn, plan, dst)
    if not conds:
        return 0, None, None, 0
    c = sql.Identifier(plan["column"])
    where_sql = validate_where(conn, src, plan.get("where"))
    filt = sql.SQL(" AND {}").format(where_sql) if where_sql is not None else sql.SQL("")
    index = _column_index(conn, src, plan["column"])
    if index is not None:  # the user's filter runs READ ONLY, so it cannot write whatever it is
        hits = [cond for cond in conds if read_only(conn, sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {s} WHERE ({o}){f})").format(s=src.ident, o=cond, f=filt))[0][0]]
        (logger or log).info("rows outside every partition of %s: %d range probes on index %s, %d with rows",
                             dst, len(conds), index, len(hits))
        if not hits:
            return 0, None, None, 0
        conds = hits
    row = read_only(conn, sql.SQL(
        "SELECT count(*), min({c})::text, max({c})::text, count(*) FILTER (WHERE {c} IS NULL) FROM {s} "
        "WHERE ({o}){f}").format(c=c, s=src.ident, o=sql.SQL(" OR ").join(conds), f=filt))[0]
    return int(row[0]), row[1], row[2], int(row[3])


def outside_error(count: int, low: Any, high: Any, nulls: int, src: QualifiedName, dst: QualifiedName,
                  column: str) -> PartitionError:
    """The swap's refusal when rows would be left behind in the retired table."""
    span = f"{column} from {low} to {high}" if low is not None else ""
    null_part = f"{nulls} with NULL {column}" if nulls else ""
    detail = "; ".join(x for x in (span, null_part) if x)
    return PartitionError(
        f"{count} row{'s' if count != 1 else ''} of {src} fall outside every partition of {dst} ({detail}): "
        "swapping now would leave them only in the retired table", where=str(dst),
        fix="add_partitions with more past/future (or cover_data=true) so every row has a partition, or convert "
        "with default_partition=true, or fix the rows' values; then run the swap again (nothing was changed)")


def _missing_rows_insert(plan: dict[str, Any], src: QualifiedName, dst: QualifiedName, cols: list[str],
                         override: bool, where_sql: sql.Composable | None, low: int,
                         high: int | None, keys: list[str] | None = None) -> tuple[sql.Composed, sql.Composed]:
    """INSERT the rows of ``src`` with ``low < id <= high`` that ``dst`` lacks (matched on every primary-key
    column), and COUNT the rows of that window that fall outside every partition (they cannot be inserted)."""
    kind = ColumnKind(plan["kind"])
    k = sql.Identifier(plan["key"])
    match = sql.SQL(" AND ").join(sql.SQL("x.{c} = s.{c}").format(c=sql.Identifier(c))
                                  for c in (keys or [plan["key"]]))
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
        "AND NOT EXISTS (SELECT 1 FROM {d} x WHERE {m})"
    ).format(d=dst.ident, c=collist, sc=scols, s=src.ident, m=match,
             w=sql.SQL(" AND ").join([*window, *inside]),
             o=sql.SQL(" OVERRIDING SYSTEM VALUE") if override else sql.SQL(""))
    outside = sql.SQL("SELECT count(*), min(s.{k}) FROM {s} s WHERE {w} AND {o}").format(k=k,
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
    plan = current_coverage(conn, plan, dst)
    keys = key_columns(conn, plan, src, dst)
    cols = common_columns(conn, info, dst)
    override = needs_override(info) or (catalog.exists(conn, dst) and needs_override(catalog.describe(conn, dst)))
    where_sql = validate_where(conn, src, plan.get("where"))
    # the ceiling is read as late as possible: rows committed after it are left for the next pass
    ceiling = id_ceiling(conn, info, key)
    if live:
        wait_for_writers(conn, src, timeout=wait_timeout, logger=ex.logger)
    top_row = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(key), src.ident)).fetchone()
    top = int(top_row[0]) if top_row and top_row[0] is not None else low
    copied = outside = 0
    first_outside = math.inf  # the high-water mark stays below rows it could not copy: once a partition takes
    # them (add_partitions), the next catch-up copies them instead of skipping them for good
    cursor = low
    progress = FillProgress(f"catch-up {src} -> {dst}", math.ceil(max(top - low, 0) / batch_size),
                            every=10.0, logger=ex.logger)
    while cursor < top:
        upper = min(cursor + batch_size, top)
        insert, count_outside = _missing_rows_insert(plan, src, dst, cols, override, where_sql, cursor, upper,
                                                     keys)
        with ex.transaction():
            if not synchronous and not ex.dry_run:
                conn.execute("SET LOCAL synchronous_commit = off")
            # the first batch's INSERT at INFO (the template), the others at DEBUG
            cur = ex.run(insert, level=logging.INFO if cursor == low else logging.DEBUG)
            n = max(cur.rowcount, 0) if cur is not None else 0
            out_row = conn.execute(count_outside).fetchone()
        copied += n
        outside += int(out_row[0]) if out_row else 0
        if out_row and out_row[1] is not None:
            first_outside = min(first_outside, int(out_row[1]))
        progress.rows += n
        progress.add(1, force=upper >= top)
        cursor = upper
        if ex.dry_run:
            break
        if throttle is not None and cursor < top:
            throttle()
    high_water = ceiling if live else max(top, low)
    if first_outside is not math.inf:
        high_water = min(high_water, max(int(first_outside) - 1, low))
    return {"rows": copied, "outside_rows": outside, "high_water": high_water,
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
    keys: list[str]


def common_columns(conn: psycopg.Connection[Any], info: TableInfo, dst: QualifiedName) -> list[str]:
    """The columns a copy from ``info`` into ``dst`` writes: ``src``'s copyable columns that ``dst`` also has
    (after a schema change on one side, e.g. a column an application migration added to the new table before an
    unswap; the caller reports what is not carried)."""
    cols = copy_columns(info)
    if not catalog.exists(conn, dst):
        return cols
    dst_info = catalog.describe(conn, dst)
    theirs = {c.name for c in dst_info.columns if not c.generated}
    return [c for c in cols if c in theirs]


def prepare_locked_copy(conn: psycopg.Connection[Any], plan: dict[str, Any], src: QualifiedName,
                        dst: QualifiedName) -> LockedCopy:
    info = catalog.describe(conn, src)
    override = needs_override(info) or (catalog.exists(conn, dst) and needs_override(catalog.describe(conn, dst)))
    plan = current_coverage(conn, plan, dst)
    return LockedCopy(plan, src, dst, common_columns(conn, info, dst), override,
                      validate_where(conn, src, plan.get("where")), key_columns(conn, plan, src, dst))


def copy_missing_locked(ex: Executor, prepared: LockedCopy, *, low: int) -> dict[str, Any]:
    """The last anti-join, in the caller's transaction (under the swap's exclusive lock): one INSERT of the rows
    above ``low`` the destination lacks, a count of rows outside every partition, and the source's largest id.
    Builds its SQL from ``prepared`` without reading the catalog."""
    conn = ex.conn
    p = prepared
    insert, count_outside = _missing_rows_insert(p.plan, p.src, p.dst, p.cols, p.override, p.where_sql, low, None,
                                                 p.keys)
    cur = ex.run(insert)
    n = max(cur.rowcount, 0) if cur is not None else 0
    outside = conn.execute(count_outside).fetchone() if not p.plan["has_default"] else None
    top_row = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(p.plan["key"]), p.src.ident)
                           ).fetchone()
    top = int(top_row[0]) if top_row and top_row[0] is not None else low
    return {"rows": n, "outside_rows": int(outside[0]) if outside else 0, "high_water": max(top, low)}
