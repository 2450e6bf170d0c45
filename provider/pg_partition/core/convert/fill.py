"""Copying rows into the partitioned table: plan, batched fill, and catch-up, without pgslice's two flaws.

**Batches replace, never append.** Each batch is one short transaction that deletes whatever the destination
holds for a primary-key range and inserts the source's rows for that range, and records the checkpoint in the
same transaction. So any range can be copied again (a retried or re-planned fill never duplicates) and a
SIGKILLed worker resumes from the checkpoint committed with its last batch, never from ``max(id)`` of the
destination.

**A safe high-water mark.** pgslice's fill (and ``fill --swapped``) starts from the largest id already copied, so a
transaction that allocated a lower id and commits late is never copied. Here the plan first reads the id ceiling
``H`` (the sequence's ``last_value`` or the largest id) and then waits, as ``CREATE INDEX CONCURRENTLY`` does, for
every transaction that held a write lock on the source at that moment to finish. An ``INSERT`` takes its table lock
before it calls ``nextval``, so after the wait every row with ``id <= H`` is committed (or rolled back) and visible
to every later batch. Catch-up copies ``id > H`` with an anti-join (``NOT EXISTS`` in the destination), so rows the
fill already copied are skipped, late ones are not, and a repeated catch-up copies nothing twice. Each pre-swap
catch-up advances ``H`` the same way; the swap does the last, tiny anti-join under its exclusive lock, so nothing
committed before the swap is left behind. The one assumption (stated by preflight when it does not hold): ids come
from an uncached sequence at insert time, not handed out by the application ahead of time.

**Parallel by partition.** The plan reads the source once (``width_bucket`` over the partitions' bounds) to find
each partition's id range and row count; a fill inserts directly into each partition (no tuple routing, no index
contention between tasks). The DAG maps a few tasks over work groups of neighbouring partitions
(:func:`pack_items`: one for a small table, up to 4 by rows), each filling its partitions in sequence. When ids
do not follow time (a partition's id range would span most of the table) the plan falls back to id chunks
inserted through the parent.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert.parallel import map_sessions, serialized
from pg_partition.core.convert.preflight import read_only, validate_where
from pg_partition.core.convert.spec import ConvertSpec, checkpoint, forget, put
from pg_partition.core.db import catalog, state
from pg_partition.core.db.catalog import QualifiedName, TableInfo
from pg_partition.core.db.errors import PartitionError, StateError
from pg_partition.core.db.execute import Executor, Progress
from pg_partition.core.db.locks import heavy_step, locks_table
from pg_partition.core.db.names import ColumnKind, Range, bound_literal, covering
from pg_partition.core.params import BATCH_SIZE, SLEEP_SECONDS, bounded_float, bounded_int

log = logging.getLogger("pg_partition")

PLAN_VERSION = 1
DEFAULT_BATCH = 10_000
Throttle = Callable[[], None]


# --- helpers -------------------------------------------------------------------------------------------------


def copy_columns(info: TableInfo) -> list[str]:
    """Columns a copy writes: all but generated ones (PostgreSQL computes those again)."""
    return [c.name for c in info.columns if not c.generated]


def needs_override(info: TableInfo) -> bool:
    return any(c.identity == "a" for c in info.columns)


def key_column(info: TableInfo) -> str:
    if info.primary_key is None or not info.primary_key.columns:
        raise StateError(f"{info.name} has no primary key", fix="run preflight; the fill copies by key ranges")
    return info.primary_key.columns[0]


def column_kind(info: TableInfo, column: str) -> ColumnKind:
    col = info.column(column)
    kind = ColumnKind.from_type(col.type) if col else None
    if kind is None:
        raise StateError(f"{info.name}.{column} is not a timestamp/date column", fix="run preflight")
    return kind


def id_ceiling(conn: psycopg.Connection[Any], info: TableInfo, key: str) -> int:
    """An upper bound of every id handed out so far: the sequence's last value, or the largest id."""
    top = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(key), info.name.ident)).fetchone()
    ceiling = int(top[0]) if top and top[0] is not None else 0
    seq = info.sequences.get(key)
    if seq is not None:
        row = conn.execute(sql.SQL("SELECT last_value FROM {}").format(seq.ident)).fetchone()
        if row and row[0] is not None:
            ceiling = max(ceiling, int(row[0]))
    return ceiling


def wait_for_writers(conn: psycopg.Connection[Any], table: QualifiedName, *, timeout: float = 3600.0,
                     poll: float = 0.2, logger: logging.Logger | None = None) -> int:
    """Wait until every transaction that holds (or awaits) a write-capable lock on ``table`` *now* has ended.

    Why: ids below the ceiling read just before this call may belong to transactions still in flight; once they
    end, every such row is committed and visible. Only writers of this table are waited for (``pg_locks`` is
    readable by every role, unlike other sessions' rows in pg_stat_activity), so a long report query elsewhere
    does not hold the conversion up. Returns how many transactions were waited for.
    """
    logger = logger or log
    oid = catalog.table_oid(conn, table)
    if oid is None:
        return 0
    stmt = """SELECT DISTINCT virtualtransaction FROM pg_locks
              WHERE locktype = 'relation' AND relation = %s
                AND mode NOT IN ('AccessShareLock', 'RowShareLock')
                AND (pid IS NULL OR pid <> pg_backend_pid())"""
    pending = [r[0] for r in conn.execute(stmt, (oid,)).fetchall()]
    waited = len(pending)
    started = last_log = time.monotonic()
    while pending:
        rows = conn.execute(
            """SELECT DISTINCT l.virtualtransaction, l.pid, a.state, a.xact_start FROM pg_locks l
               LEFT JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'relation' AND l.relation = %s AND l.virtualtransaction = ANY(%s)""",
            (oid, pending),
        ).fetchall()
        pending = [r[0] for r in rows]
        if not pending:
            break
        now = time.monotonic()
        who = ", ".join(f"pid {r[1]} ({r[2] or 'prepared/unknown'}, since {r[3]})" for r in rows)
        if now - started > timeout:
            raise PartitionError(
                f"transactions writing to {table} did not finish within {timeout:.0f}s: {who}",
                where=str(table),
                fix="commit or end those sessions (pg_terminate_backend(pid) for an idle-in-transaction one), "
                "or raise wait_timeout; nothing was copied yet",
            )
        if now - last_log >= 10:
            last_log = now
            logger.info("waiting for %d in-flight writer(s) of %s to finish: %s", len(pending), table, who)
        time.sleep(poll)
    return waited


def _interval_sql(column: str, kind: ColumnKind, rng: tuple[str, str]) -> sql.Composable:
    col = sql.Identifier(column)
    return sql.SQL("({col} >= {lo}::{t} AND {col} < {hi}::{t})").format(
        col=col, lo=sql.Literal(rng[0]), hi=sql.Literal(rng[1]), t=sql.SQL(kind.value))


def coverage_sql(column: str, kind: ColumnKind, covered: list[list[str]], *, inside: bool) -> sql.Composable:
    """``inside``: the row falls in one of the partitions' ranges; otherwise: it falls in none (NULL included)."""
    if not covered:
        return sql.SQL("true") if not inside else sql.SQL("false")
    any_in = sql.SQL(" OR ").join(_interval_sql(column, kind, (r[0], r[1])) for r in covered)
    if inside:
        return sql.SQL("({})").format(any_in)
    return sql.SQL("NOT coalesce(({}), false)").format(any_in)


def merged_ranges(ranges: list[Range]) -> list[Range]:
    out: list[Range] = []
    for r in sorted(ranges):
        if out and r.start <= out[-1].end:
            out[-1] = Range(out[-1].start, max(out[-1].end, r.end))
        else:
            out.append(r)
    return out


# --- plan ----------------------------------------------------------------------------------------------------


def _destination_partitions(ex: Executor, spec: ConvertSpec, src: TableInfo) -> tuple[list[tuple[QualifiedName,
                                                                                                   Range]], bool]:
    """The intermediate's range partitions as (name, UTC day range), and whether it has a DEFAULT partition.
    In a dry run without an intermediate, the partitions that ``cover_data`` would create stand in."""
    if catalog.exists(ex.conn, spec.intermediate):
        inter = catalog.describe(ex.conn, spec.intermediate)
        parts = [(p.name, Range(p.start_day, p.end_day)) for p in inter.partitions if not p.is_default]
        return parts, inter.default_partition is not None
    if not ex.dry_run:
        raise StateError(f"{spec.intermediate} does not exist", fix="run prep and add_partitions first")
    row = ex.conn.execute(sql.SQL("SELECT min({c}), max({c}) FROM {t}").format(
        c=sql.Identifier(spec.column), t=spec.table.ident)).fetchone()
    if not row or row[0] is None:
        return [], spec.default_partition
    return [(spec.partition(r.start), r) for r in covering(row[0], row[1], spec.period)], spec.default_partition


@locks_table()  # the per-table lock, also for a direct caller of the engine
def plan_fill(
    ex: Executor,
    spec: ConvertSpec,
    *,
    where: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    start: int | None = None,
    stop: int | None = None,
    replan: bool = False,
    wait_timeout: float = 3600.0,
) -> dict[str, Any]:
    """Decide what the fill copies: one work item per partition (or per id chunk), recorded in the state schema.

    Idempotent: a recorded plan is returned as is (a retried task, or a second DAG run resuming), unless
    ``replan`` (then the fill's checkpoints are cleared too; batches replace ranges, so re-copying is safe).
    ``start``/``stop`` limit the copied ids (inclusive), like pgslice's options.
    """
    batch_size = bounded_int(batch_size, what="batch_size", bounds=BATCH_SIZE, fix="pass e.g. batch_size=10000")
    conn = ex.conn
    validate_where(conn, spec.table, where)  # before anything, also before a recorded plan is returned
    recorded = None if replan else checkpoint(conn, spec, "plan")
    if recorded is not None:
        if (recorded.get("where") or None) != (where or None):
            raise StateError(
                f"the fill was planned with where={recorded.get('where')!r}, now asked where={where!r}",
                where=str(spec.table),
                fix="pass the same where to resume, or replan=true to plan again (already copied ranges are "
                "replaced, not duplicated)")
        ex.logger.info("fill plan already recorded (%d items); resuming it", len(recorded["items"]))
        return dict(recorded)

    src = catalog.describe(conn, spec.table)
    where_sql = validate_where(conn, spec.table, where)
    key = key_column(src)
    kind = column_kind(src, spec.column)
    if catalog.exists(conn, spec.intermediate):
        inter_cols = {c.name for c in catalog.columns(conn, catalog.table_oid(conn, spec.intermediate) or 0)}
        missing = [c for c in copy_columns(src) if c not in inter_cols]
        if missing:
            raise StateError(
                f"{spec.intermediate} lacks column(s) {', '.join(missing)} that {spec.table} has "
                "(added to the source after prep?)",
                fix=f"add the same column(s) to {spec.intermediate} (ALTER TABLE ... ADD COLUMN ...), then plan again")

    ceiling = id_ceiling(conn, src, key)
    waited = wait_for_writers(conn, spec.table, timeout=wait_timeout, logger=ex.logger)
    ex.logger.info("fill high-water mark: id %d (waited for %d in-flight writer transaction(s))", ceiling, waited)

    parts, has_default = _destination_partitions(ex, spec, src)
    covered = [[bound_literal(r.start, kind), bound_literal(r.end, kind)]
               for r in merged_ranges([r for _, r in parts])]
    bounds = sorted({d for _, r in parts for d in (r.start, r.end)})
    k = sql.Identifier(key)
    conds: list[sql.Composable] = []
    if start is not None:
        conds.append(sql.SQL("{} >= {}").format(k, sql.Literal(int(start))))
    if stop is not None:
        conds.append(sql.SQL("{} <= {}").format(k, sql.Literal(int(stop))))
    if where_sql is not None and ex.dry_run:  # a dry run executes nothing the user wrote, not even a count
        ex.logger.info("[dry run] the where filter was validated but not run: the planned counts cover every row")
    elif where_sql is not None:
        conds.append(where_sql)
    filt = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
    bucket: sql.Composable
    if bounds:
        bucket = sql.SQL("width_bucket({}, ARRAY[{}]::{}[])").format(
            sql.Identifier(spec.column),
            sql.SQL(", ").join(sql.Literal(bound_literal(d, kind)) for d in bounds), sql.SQL(kind.value))
    else:
        bucket = sql.SQL("NULL::int")
    stats = read_only(conn, sql.SQL("SELECT {b} AS b, min({k}), max({k}), count(*) FROM {t}{f} GROUP BY 1").format(
        b=bucket, k=k, t=spec.table.ident, f=filt))

    by_bucket = {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in stats}
    part_of_bucket: dict[int, tuple[QualifiedName, Range]] = {}
    for name, rng in parts:
        part_of_bucket[bounds.index(rng.start) + 1] = (name, rng)
    items: list[dict[str, Any]] = []
    empty: list[str] = []
    outside = [v for b, v in by_bucket.items() if b not in part_of_bucket]
    outside_rows = sum(v[2] for v in outside)
    inside_rows = sum(v[2] for b, v in by_bucket.items() if b in part_of_bucket)
    global_lo = min((v[0] for v in by_bucket.values()), default=0)
    global_hi = max((v[1] for v in by_bucket.values()), default=-1)
    spans = sum(v[1] - v[0] + 1 for b, v in by_bucket.items() if b in part_of_bucket)
    correlated = spans <= 3 * max(global_hi - global_lo + 1, 1) + len(parts) * batch_size

    def item(key_: str, target: QualifiedName, lo: int, hi: int, rows: int, *, rng: Range | None = None,
             outside_only: bool = False) -> dict[str, Any]:
        return {
            "key": key_, "target": [target.schema, target.name], "lo": lo, "hi": hi, "rows": rows,
            "batches": math.ceil((hi - lo + 1) / batch_size),
            "range": [bound_literal(rng.start, kind), bound_literal(rng.end, kind)] if rng else None,
            "outside_only": outside_only,
        }

    if correlated:
        strategy = "partition"
        for b, (name, rng) in sorted(part_of_bucket.items(), key=lambda kv: kv[1][1]):
            if b in by_bucket:
                lo, hi, n = by_bucket[b]
                items.append(item(str(name), name, lo, hi, n, rng=rng))
            else:
                empty.append(str(name))
        if has_default and outside_rows:
            lo, hi = min(v[0] for v in outside), max(v[1] for v in outside)
            items.append(item(str(spec.default_name), spec.default_name, lo, hi, outside_rows, outside_only=True))
    else:
        strategy = "id_chunks"
        chunks = max(1, min(len(parts) or 1, 8))
        width = math.ceil((global_hi - global_lo + 1) / chunks) if global_hi >= global_lo else 0
        for i in range(chunks if width else 0):
            lo = global_lo + i * width
            hi = min(lo + width - 1, global_hi)
            items.append(item(f"chunk-{i}", spec.intermediate, lo, hi,
                              (inside_rows + (outside_rows if has_default else 0)) // chunks))
    plan = {
        "version": PLAN_VERSION,
        "strategy": strategy,
        "key": key,
        "column": spec.column,
        "kind": kind.value,
        "high_water": ceiling,
        "where": where or None,
        "batch_size": batch_size,
        "covered": covered,
        "has_default": has_default,
        "rows": inside_rows + (outside_rows if has_default else 0),
        "outside_rows": 0 if has_default else outside_rows,
        "rows_in_default": outside_rows if has_default else 0,
        "empty_partitions": empty,
        "items": items,
    }
    if outside_rows and not has_default:
        ex.logger.warning(
            "%d source rows fall outside every partition of %s and will NOT be copied; add partitions for them "
            "(add_partitions cover_data=true) or a DEFAULT partition, then plan again with replan=true",
            outside_rows, spec.intermediate)
    if not ex.dry_run:
        with conn.transaction():
            if replan:
                forget(conn, spec, ("fill", "catch_up"))
            put(ex, spec, "plan", plan)
    ex.logger.info("fill plan: %s strategy, %d items, %d rows to copy, %d outside every partition",
                   strategy, len(items), plan["rows"], plan["outside_rows"])
    return plan


# --- work groups (fewer, fatter fill tasks) -------------------------------------------------------------------

DEFAULT_FILL_TASKS = 2
DEFAULT_ROWS_PER_TASK = 5_000_000  # a smaller table is one task: its sessions copy it in seconds
DEFAULT_FILL_SESSIONS = 2  # sessions per fill task (fill(sessions=...)); tasks x sessions copy at once
FILL_SESSIONS = (1, 16)


def pack_items(items: list[dict[str, Any]], *, max_tasks: int = DEFAULT_FILL_TASKS,
               rows_per_task: int = DEFAULT_ROWS_PER_TASK) -> list[dict[str, Any]]:
    """Pack planned items into at most ``max_tasks`` work groups of neighbouring items, balanced by rows.

    Why: every Airflow task is a process that starts and parses the DAG again (a fraction of a second in
    ``dags test``, seconds under a scheduler), while one partition of a small table fills in milliseconds. A
    table of ``rows_per_task`` rows or fewer gets one group, a larger one up to ``max_tasks``. The plan and the
    per-partition checkpoints are unchanged: a group is filled item by item (:func:`fill`), each batch commits
    its own checkpoint, so a killed group resumes at the batch it stopped in and skips the items it finished.

    Deterministic (the same plan gives the same groups), so a retried ``plan_fill`` task maps the same tasks.
    A group's ``key`` names the items it covers (the grid label): the item's own key for a one-item group,
    else ``first .. last (n partitions)``.
    """
    max_tasks = max(1, int(max_tasks))
    rows_per_task = max(1, int(rows_per_task))
    if not items:
        return []
    total = sum(max(int(it.get("rows") or 0), 0) for it in items)
    n = max(1, min(max_tasks, len(items), math.ceil(total / rows_per_task) if total else 1))
    groups: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    before = 0
    for it in items:  # an item goes to the group its row-midpoint falls in: neighbours stay together, balanced
        rows = max(int(it.get("rows") or 0), 0)
        mid = (before + rows / 2) / total if total else 0.0
        groups[min(int(mid * n), n - 1)].append(it)
        before += rows
    out = []
    for members in (g for g in groups if g):
        unit = "partitions" if all(m.get("range") or m.get("outside_only") for m in members) else "items"
        key = members[0]["key"] if len(members) == 1 else (
            f"{members[0]['key']} .. {members[-1]['key']} ({len(members)} {unit})")
        out.append({"key": key, "items": members, "rows": sum(int(m.get("rows") or 0) for m in members),
                    "batches": sum(int(m.get("batches") or 0) for m in members)})
    return out


def recorded_plan(conn: psycopg.Connection[Any], spec: ConvertSpec) -> dict[str, Any]:
    plan = checkpoint(conn, spec, "plan")
    if plan is None:
        raise StateError(f"no fill plan is recorded for {spec.table}", fix="run plan_fill first")
    return dict(plan)


# --- fill ----------------------------------------------------------------------------------------------------


class FillProgress(Progress):
    """Progress in batches (done/total, ETA) that also reports rows and rows/s."""

    def __init__(self, what: str, total: int, *, every: float, logger: logging.Logger) -> None:
        super().__init__(what, total, unit="batches", every=every, logger=logger)
        self.rows = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return f"{super().line()}; {self.rows:,} rows, {self.rows / elapsed:,.0f} rows/s"


def _batch_statements(plan: dict[str, Any], item: dict[str, Any], src: TableInfo, cols: list[str],
                      where_sql: sql.Composable | None, lo: int, hi: int) -> tuple[sql.Composed, sql.Composed]:
    """DELETE the destination's rows of ``[lo, hi)`` and INSERT the source's: one batch, safe to repeat."""
    kind = ColumnKind(plan["kind"])
    target = QualifiedName(*item["target"])
    k = sql.Identifier(plan["key"])
    key_range = sql.SQL("{k} >= {lo} AND {k} < {hi}").format(k=k, lo=sql.Literal(lo), hi=sql.Literal(hi))
    conds: list[sql.Composable] = [key_range]
    if item.get("range"):
        conds.append(_interval_sql(plan["column"], kind, (item["range"][0], item["range"][1])))
    elif item.get("outside_only"):
        conds.append(coverage_sql(plan["column"], kind, plan["covered"], inside=False))
    elif not plan["has_default"]:
        conds.append(coverage_sql(plan["column"], kind, plan["covered"], inside=True))
    if where_sql is not None:
        conds.append(where_sql)
    collist = sql.SQL(", ").join(map(sql.Identifier, cols))
    delete = sql.SQL("DELETE FROM {t} WHERE {r}").format(t=target.ident, r=key_range)
    insert = sql.SQL("INSERT INTO {t} ({c}){o} SELECT {c} FROM {s} WHERE {w}").format(
        t=target.ident, c=collist, s=src.name.ident, w=sql.SQL(" AND ").join(conds),
        o=sql.SQL(" OVERRIDING SYSTEM VALUE") if needs_override(src) else sql.SQL(""))
    return delete, insert


def _fill_item(ex: Executor, spec: ConvertSpec, item: dict[str, Any] | str | None = None, *args: Any,
               **kwargs: Any) -> str | None:
    """The lock item of one fill (its key, as the mapped fill task locks it); None (every item): exclusive."""
    item = kwargs.get("item", item)
    return None if item is None else str(item if isinstance(item, str) else item.get("key"))


@locks_table(item_of=_fill_item)  # the per-table lock (shared, plus the item's), also for a direct engine caller
@heavy_step  # counts against the database's heavy-step slots
def fill(
    ex: Executor,
    spec: ConvertSpec,
    item: dict[str, Any] | str | None = None,
    *,
    batch_size: int | None = None,
    sleep_seconds: float = 0.0,
    throttle: Throttle | None = None,
    progress_every: float = 10.0,
    plan: dict[str, Any] | None = None,
    sessions: int = 1,
    connect: Callable[[], psycopg.Connection[Any]] | None = None,
) -> dict[str, Any]:
    """Fill one planned item (a partition or an id chunk), a work group of them (:func:`pack_items`), or every
    item when ``item`` is None.

    Resumes from the item's checkpoint. ``throttle`` is called before every batch, with no transaction open
    (replication-lag gating plugs in here: it may sleep as long as it needs, or raise to stop the item, which then
    resumes from its checkpoint); ``sleep_seconds`` is a fixed pause between batches.

    ``sessions``: a group's items are filled on up to this many sessions at once (``connect`` opens them;
    default: the same parameters as ``ex.conn``). Partitions are independent (each has its own key range,
    checkpoint and table), so two sessions copy in about half the time while the server has a second core
    idle; this session keeps the table's lock and the heavy-step slot for all of them, and the throttle is
    called by one session at a time (a pause holds them all).
    """
    if batch_size is not None:
        batch_size = bounded_int(batch_size, what="batch_size", bounds=BATCH_SIZE, fix="pass e.g. batch_size=10000")
    sleep_seconds = bounded_float(sleep_seconds, what="sleep_seconds", bounds=SLEEP_SECONDS)
    sessions = bounded_int(sessions, what="sessions", bounds=FILL_SESSIONS, fix="pass e.g. sessions=2")
    conn = ex.conn
    if plan is None:
        if ex.dry_run and not state.ready(conn):
            plan = plan_fill(ex, spec)
        else:
            plan = checkpoint(conn, spec, "plan") or (plan_fill(ex, spec) if ex.dry_run else None)
    if plan is None:
        raise StateError(f"no fill plan is recorded for {spec.table}", fix="run plan_fill first")
    if item is None or (isinstance(item, dict) and "items" in item):  # every item, or one work group's
        group = plan["items"] if item is None else item["items"]
        started = time.monotonic()
        pace = serialized(throttle) if sessions > 1 else throttle
        results = map_sessions(
            ex, list(group), lambda wex, it: _fill_one(wex, spec, plan, it, batch_size=batch_size,
                                                        sleep_seconds=sleep_seconds, throttle=pace,
                                                        progress_every=progress_every),
            workers=sessions, connect=connect)
        out = {"items": results, "rows": sum(r["rows"] for r in results),
               "batches": sum(r["batches"] for r in results), "resumed": any(r["resumed"] for r in results),
               "seconds": round(time.monotonic() - started, 3)}
        if item is None:
            return {**out, "outside_rows": plan["outside_rows"]}
        ex.logger.info("fill %s: %d item(s), %s rows in %.1fs", item["key"], len(results), f"{out['rows']:,}",
                       out["seconds"])
        return {"key": item["key"], **out}
    return _fill_one(ex, spec, plan, item, batch_size=batch_size, sleep_seconds=sleep_seconds, throttle=throttle,
                     progress_every=progress_every)


def _fill_one(ex: Executor, spec: ConvertSpec, plan: dict[str, Any], item: dict[str, Any] | str, *,
              batch_size: int | None, sleep_seconds: float, throttle: Throttle | None,
              progress_every: float) -> dict[str, Any]:
    """Fill one planned item from its checkpoint, batch by batch (the caller holds the locks)."""
    conn = ex.conn
    wanted = item if isinstance(item, str) else item["key"]
    found = next((it for it in plan["items"] if it["key"] == wanted), None)
    if found is None:
        if isinstance(item, dict) and ex.dry_run:
            found = item
        else:
            raise StateError(f"fill item {wanted!r} is not in the recorded plan",
                             fix="run plan_fill again (replan=true) and fill the items it returns")
    it = found
    src = catalog.describe(conn, spec.table)
    cols = copy_columns(src)
    where_sql = validate_where(conn, spec.table, plan.get("where"))
    size = int(batch_size or plan["batch_size"])
    cp = checkpoint(conn, spec, "fill", it["key"]) or {}
    if cp.get("done"):
        ex.logger.info("fill %s: already done (%d rows)", it["key"], cp.get("rows", 0))
        return {"key": it["key"], "rows": int(cp.get("rows", 0)), "batches": 0, "resumed": True,
                "seconds": float(cp.get("seconds", 0.0))}
    cursor = int(cp.get("next") or it["lo"])
    rows_total = int(cp.get("rows", 0))
    seconds_before = float(cp.get("seconds", 0.0))
    hi_end = int(it["hi"]) + 1
    batches_left = math.ceil(max(hi_end - cursor, 0) / size)
    progress = FillProgress(f"fill {it['key']}", batches_left, every=progress_every, logger=ex.logger)
    if cursor != it["lo"]:
        ex.logger.info("fill %s: resuming at %s=%d from the recorded checkpoint", it["key"], plan["key"], cursor)
    started = time.monotonic()
    batches = 0
    while cursor < hi_end:
        if throttle is not None and not ex.dry_run:
            throttle()  # before every batch, outside any transaction (the gate itself rate-limits its checks)
        upper = min(cursor + size, hi_end)
        delete, insert = _batch_statements(plan, it, src, cols, where_sql, cursor, upper)
        if ex.dry_run:
            ex.run(delete)
            ex.run(insert)
            remaining = math.ceil((hi_end - upper) / size)
            if remaining:
                ex.logger.info("[dry run] ... and %d more batches of %d ids up to %d", remaining, size, hi_end - 1)
            batches += 1 + remaining
            break
        with conn.transaction():
            # Losing the last few commits in a crash is harmless here: the checkpoint commits with its batch,
            # so both are redone on resume. It saves a WAL flush per batch on a table nobody reads yet.
            conn.execute("SET LOCAL synchronous_commit = off")
            level = logging.INFO if batches == 0 else logging.DEBUG  # the first batch is the template
            ex.run(delete, level=level)
            cur = ex.run(insert, level=level)
            n = cur.rowcount if cur is not None else 0
            rows_total += max(n, 0)
            done = upper >= hi_end
            put(ex, spec, "fill", {
                "next": upper, "rows": rows_total, "done": done,
                "seconds": round(seconds_before + time.monotonic() - started, 3),
            }, it["key"])
        cursor = upper
        if batches == 0 and cursor < hi_end:
            ex.logger.info("fill %s: the other %d batches run the same two statements over the next %s ranges "
                           "of %d (their SQL at DEBUG); progress every %.0fs", it["key"],
                           math.ceil((hi_end - cursor) / size), plan["key"], size, progress_every)
        batches += 1
        progress.rows += max(n, 0)
        progress.add(1, force=cursor >= hi_end)
        if cursor < hi_end and sleep_seconds > 0:
            time.sleep(sleep_seconds)
    if not ex.dry_run and batches == 0:  # an empty range: mark it done so the swap sees a complete fill
        with conn.transaction():
            put(ex, spec, "fill", {"next": hi_end, "rows": rows_total, "done": True,
                                   "seconds": seconds_before}, it["key"])
    return {"key": it["key"], "rows": rows_total, "batches": batches, "resumed": bool(cp),
            "seconds": round(seconds_before + time.monotonic() - started, 3)}


def fill_status(conn: psycopg.Connection[Any], spec: ConvertSpec) -> dict[str, Any]:
    """Which planned items are done (read by the swap, which refuses an incomplete fill)."""
    plan = checkpoint(conn, spec, "plan")
    if plan is None:
        return {"planned": False, "pending": [], "rows": 0}
    from pg_partition.core.db import state

    cps = state.checkpoints(conn, spec.job_id, "fill")
    pending = [it["key"] for it in plan["items"] if not (cps.get(it["key"]) or {}).get("done")]
    return {"planned": True, "pending": pending, "rows": sum(int(v.get("rows", 0)) for v in cps.values()),
            "items": {k: v for k, v in cps.items()}}
