"""Is this table (or any table in this database) worth partitioning? The talk's "SQL goodie bag", answered.

The users partitioned because the table outgrew server memory and justified the archive by cost; they found the
candidates with hand-written queries (10 largest tables, append-only look, CREATE INDEX statements for the index
rebuild, partition row counts and size estimates). This module gives the same answers from ``core.catalog``:

* :func:`assess` - one table: sizes, write pattern, usable time column and integer key, rows/bytes per month,
  candidacy (size >= server memory, or >= 100 GB, as the PostgreSQL docs and postgres.fm suggest).
* :func:`advise` - :func:`assess` plus the details a DBA acts on: ``CREATE INDEX`` statements, per-partition row
  counts and sizes, a fleet-config entry for rotation and a ready ``pg_partition_convert`` params dict.
* :func:`survey` - the largest tables of a whole database, each assessed and advised.

Everything is read-only. The only data read from the table itself is ``min``/``max`` of the time column, and
only through an index: a full scan of a 1 TB table is not an acceptable side effect of a report.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import psycopg
import yaml
from psycopg import sql

from pg_partition.core.db import catalog, state
from pg_partition.core.db.catalog import QualifiedName, TableInfo
from pg_partition.core.db.names import ColumnKind, Period, covering, parse_bound_day

GB = 1024**3
MB = 1024**2
INTEGER_TYPES = {"smallint", "integer", "bigint"}
# Schemas that never hold conversion candidates: the system's and our own (state, detached partitions).
# (pg_partition.config.ARCHIVE_SCHEMA is the state schema's name + "_archive"; core does not import config.)
EXCLUDED_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", state.SCHEMA, f"{state.SCHEMA}_archive")
# Columns that change on every UPDATE: partitioning on them would move rows between partitions.
MUTABLE_TIME_COLUMNS = {"updated_at", "modified_at", "last_modified", "changed_at"}


@dataclass(frozen=True)
class Thresholds:
    """What makes a table a candidate and how its writes are classified. Defaults follow the talk."""

    memory_gb: float = 16.0
    min_gb: float = 100.0
    # (updates + deletes) / inserts at or below this: append-only (pgslice's assumption holds).
    append_only_ratio: float = 0.01
    # at or above this: update-heavy (the conversion needs change capture, and the rows churn).
    update_heavy_ratio: float = 0.1


@dataclass(frozen=True)
class Recipe:
    """How recommendations are written: rotation settings and conversion settings."""

    premake: int = 3
    retention_months: int | None = 24  # the talk's "2 years of data is more than enough"; None keeps all
    batch_size: int = 10_000
    lock_timeout: str = "2s"
    primary_key: str = "per_partition"
    sleep_seconds: float = 0.0


@dataclass
class Assessment:
    table: str
    rows_estimate: int
    table_bytes: int
    index_bytes: int
    toast_bytes: int
    total_bytes: int
    is_partitioned: bool
    partitions: int
    append_only: bool
    time_columns: list[str]
    integer_key: str | None
    span_from: str | None = None
    span_to: str | None = None
    rows_per_month: int | None = None
    bytes_per_month: int | None = None
    candidate: bool = False
    reasons: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    # write pattern since the last statistics reset (pg_stat_user_tables)
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    write_pattern: str = "no writes recorded"
    time_column: str | None = None  # the column recommended to partition on
    partition_column: str | None = None  # for an already RANGE-partitioned table: its key column
    period: str | None = None  # recommended (or, when partitioned, detected) period
    notes: list[str] = field(default_factory=list)
    # filled by advise()
    create_indexes: list[str] = field(default_factory=list)
    partition_stats: list[dict[str, Any]] = field(default_factory=list)
    config_entry: dict[str, Any] | None = None
    convert_params: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def name(self) -> QualifiedName:
        return QualifiedName.parse(self.table)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'. Binary units, as pg_size_pretty (and AWS's GB-month) count them."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} PiB"  # pragma: no cover - unreachable


def _indexed_leading(info: TableInfo, column: str) -> bool:
    return any(i.columns[:1] == (column,) and i.is_valid for i in info.indexes)


def _integer_key(info: TableInfo) -> str | None:
    pk = info.primary_key
    if pk is None or not pk.columns:
        return None
    col = info.column(pk.columns[0])
    return pk.columns[0] if col is not None and col.type in INTEGER_TYPES else None


def choose_time_column(info: TableInfo, preferred: str | None = None) -> str | None:
    """The column to range-partition on: the one asked for, else ``created_at``, else the best-looking one.

    Preference order: NOT NULL (the conversion refuses NULLs without a DEFAULT partition), led by an index (so the
    advisor and the fill can find min/max cheaply), and not an ``updated_at``-style column (an UPDATE would move
    the row to another partition).
    """
    times = [c for c in info.columns if ColumnKind.from_type(c.type) is not None and not c.generated]
    if preferred:
        return preferred if any(c.name == preferred for c in times) else None
    if any(c.name == "created_at" for c in times):
        return "created_at"
    if not times:
        return None
    ranked = sorted(times, key=lambda c: (c.name in MUTABLE_TIME_COLUMNS, not c.not_null,
                                          not _indexed_leading(info, c.name)))
    return ranked[0].name


def classify_writes(stats: dict[str, int], thresholds: Thresholds) -> str:
    """'append-only' | 'mixed' | 'update-heavy' | 'no writes recorded', from pg_stat_user_tables counters."""
    ins, changed = stats.get("n_tup_ins", 0), stats.get("n_tup_upd", 0) + stats.get("n_tup_del", 0)
    if ins == 0 and changed == 0:
        return "no writes recorded"
    if changed <= thresholds.append_only_ratio * ins:
        return "append-only"
    if ins == 0 or changed >= thresholds.update_heavy_ratio * ins:
        return "update-heavy"
    return "mixed"


def period_for(bytes_per_month: int | None) -> Period:
    """Monthly partitions (the talk's choice) unless a month would be unwieldy: keep a partition in the tens of GB.

    Weekly from 40 GB/month, daily from 300 GB/month: then one partition's index builds, VACUUMs and archive
    uploads stay in the minutes, and a year of partitions stays far below the hundreds that slow planning.
    """
    if bytes_per_month is not None and bytes_per_month >= 300 * GB:
        return Period.DAY
    if bytes_per_month is not None and bytes_per_month >= 40 * GB:
        return Period.WEEK
    return Period.MONTH


def detect_period(info: TableInfo) -> Period | None:
    """The period of an existing RANGE-partitioned table, from the width of its partitions."""
    widths = {(p.end_day - p.start_day).days for p in info.partitions
              if not p.is_default and p.range_from is not None and p.range_to is not None
              and _is_day_bound(p.range_from)}
    for period, allowed in ((Period.DAY, {1}), (Period.WEEK, {7}), (Period.MONTH, {28, 29, 30, 31}),
                            (Period.QUARTER, {89, 90, 91, 92}), (Period.YEAR, {365, 366})):
        if widths and widths <= allowed:
            return period
    return None


def _is_day_bound(text: str) -> bool:
    try:
        parse_bound_day(text)
    except ValueError:
        return False
    return True


_RANGE_KEY_RE = re.compile(r'^RANGE \(("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)\)$')


def range_key_column(info: TableInfo) -> str | None:
    """``RANGE (created_at)`` -> ``created_at``; None for LIST/HASH, expressions and multi-column keys."""
    m = _RANGE_KEY_RE.match(info.partition_key or "")
    if not m:
        return None
    text = m.group(1)
    return text[1:-1].replace('""', '"') if text.startswith('"') else text


def assess(conn: psycopg.Connection[Any], table: QualifiedName, *, memory_gb: float = 16.0,
           min_gb: float = 100.0, time_column: str | None = None,
           thresholds: Thresholds | None = None) -> Assessment:
    """Size, write pattern, keys and candidacy of one table (see the module docstring)."""
    th = thresholds or Thresholds(memory_gb=memory_gb, min_gb=min_gb)
    info = catalog.describe(conn, table)
    return _assess_info(conn, info, th, time_column)


def _assess_info(conn: psycopg.Connection[Any], info: TableInfo, th: Thresholds,
                 time_column: str | None) -> Assessment:
    table = info.name
    time_cols = [c.name for c in info.columns if ColumnKind.from_type(c.type) is not None]
    key = _integer_key(info)
    pattern = classify_writes(info.stats, th)
    a = Assessment(
        table=str(table), rows_estimate=info.row_estimate, table_bytes=info.sizes.table,
        index_bytes=info.sizes.indexes, toast_bytes=info.sizes.toast, total_bytes=info.sizes.total,
        is_partitioned=info.is_partitioned, partitions=len(info.partitions),
        append_only=pattern in ("append-only", "no writes recorded"), time_columns=time_cols, integer_key=key,
        inserts=info.stats.get("n_tup_ins", 0), updates=info.stats.get("n_tup_upd", 0),
        deletes=info.stats.get("n_tup_del", 0), write_pattern=pattern,
    )
    if info.is_partitioned:
        a.partition_column = range_key_column(info)
        detected = detect_period(info)
        a.period = detected.value if detected else None
    col = a.partition_column or choose_time_column(info, time_column)
    a.time_column = col
    if time_column and col is None:
        a.blockers.append(f"column {time_column!r} is not a timestamp/timestamptz/date column of {table}")
    if col and _indexed_leading(info, col):
        lo, hi = conn.execute(sql.SQL("SELECT min({c}), max({c}) FROM {t}").format(
            c=sql.Identifier(col), t=table.ident)).fetchone() or (None, None)
        if lo is not None and hi is not None:
            a.span_from, a.span_to = str(lo), str(hi)
            months = max(_months_between(lo, hi), 1.0)
            a.rows_per_month = int(info.row_estimate / months)
            a.bytes_per_month = int(info.sizes.total / months)
    elif col:
        a.notes.append(f"{col} is not the leading column of an index: rows/month not estimated (that would "
                       f"need a full scan)")
    if not info.is_partitioned:
        a.period = period_for(a.bytes_per_month).value
    if info.sizes.total >= th.memory_gb * GB:
        a.reasons.append(f"total size {info.sizes.total / GB:.3g} GB >= server memory {th.memory_gb:g} GB")
    if info.sizes.total >= th.min_gb * GB:
        a.reasons.append(f"total size {info.sizes.total / GB:.3g} GB >= {th.min_gb:g} GB")
    if info.is_partitioned:
        a.blockers.append("already partitioned")
    if not time_cols:
        a.blockers.append("no timestamp/timestamptz/date column to partition on")
    if key is None:
        a.blockers.append("no primary key whose first column is an integer (needed for batched copy)")
    if info.foreign_keys_in:
        a.blockers.append("referenced by foreign keys: " + ", ".join(f"{fk.table}.{fk.name}"
                                                                    for fk in info.foreign_keys_in))
    if col and not info.is_partitioned:
        column = info.column(col)
        if col in MUTABLE_TIME_COLUMNS:
            a.notes.append(f"{col} changes on UPDATE: rows would move between partitions; prefer a creation "
                           f"time column (pass time_column)")
        if column is not None and not column.not_null:
            a.notes.append(f"{col} allows NULL: the conversion refuses NULLs unless default_partition is on")
    if pattern in ("update-heavy", "mixed"):
        a.notes.append(f"takes UPDATE/DELETE ({a.updates:,} updates, {a.deletes:,} deletes vs {a.inserts:,} "
                       f"inserts): the conversion must capture and replay changes made during the fill; "
                       f"pgslice alone would lose them")
    a.candidate = bool(a.reasons) and not a.blockers
    return a


def _months_between(lo: Any, hi: Any) -> float:
    if isinstance(lo, datetime) and isinstance(hi, datetime):
        return (hi.replace(tzinfo=None) - lo.replace(tzinfo=None)).total_seconds() / (30.44 * 86400)
    return float((hi - lo).days) / 30.44


# ------------------------------------------------------------------------------------------ the goodie bag


def create_index_statements(info: TableInfo) -> list[str]:
    """The table's index definitions, runnable as-is (for a deferred index rebuild after a fill).

    Indexes backing a PRIMARY KEY / UNIQUE constraint are listed too, marked with a comment, because on the
    partitioned table they come back as constraints rather than plain indexes.
    """
    out = []
    for i in info.indexes:
        stmt = i.definition + ";"
        if i.constraint:
            stmt += f"  -- backs constraint {i.constraint}"
        if not i.is_valid:
            stmt += "  -- INVALID (a failed CREATE INDEX CONCURRENTLY): drop and rebuild it"
        out.append(stmt)
    return out


@dataclass
class PartitionStat:
    name: str
    bound: str
    rows_estimate: int
    rows_exact: int | None
    table_bytes: int
    index_bytes: int
    toast_bytes: int
    total_bytes: int
    detach_pending: bool


def partition_stats(conn: psycopg.Connection[Any], info: TableInfo, *,
                    exact_counts: bool = False) -> list[PartitionStat]:
    """Row counts (planner estimate; exact ``count(*)`` on request) and sizes of each partition."""
    out = []
    for p in info.partitions:
        oid = catalog.table_oid(conn, p.name)
        if oid is None:  # detached (or dropped) between the two catalog reads
            continue
        s = catalog.sizes(conn, oid, partitioned=_relkind(conn, oid) == "p")
        exact = None
        if exact_counts:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(p.name.ident)).fetchone()
            exact = int(row[0]) if row else 0
        out.append(PartitionStat(
            name=str(p.name), bound=p.bound, rows_estimate=catalog.row_estimate(conn, oid), rows_exact=exact,
            table_bytes=s.table, index_bytes=s.indexes, toast_bytes=s.toast, total_bytes=s.total,
            detach_pending=p.detach_pending,
        ))
    return out


def _relkind(conn: psycopg.Connection[Any], oid: int) -> str:
    row = conn.execute("SELECT relkind::text FROM pg_class WHERE oid = %s", (oid,)).fetchone()
    return str(row[0]) if row else ""


def periods_covering(span_from: str | None, span_to: str | None, period: Period) -> int:
    """How many partitions of ``period`` the data span needs (at least one)."""
    if not span_from or not span_to:
        return 1
    lo, hi = _parse_moment(span_from), _parse_moment(span_to)
    return max(len(covering(lo, hi, period)), 1)


def _parse_moment(text: str) -> date | datetime:
    value = datetime.fromisoformat(text.replace(" ", "T")) if len(text) > 10 else date.fromisoformat(text)
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value


def retention_periods(months: int | None, period: Period) -> int | None:
    """``retention_months`` expressed in periods of the table (rounded up): 24 months -> 105 weeks, 731 days."""
    if not months:
        return None
    per_month = {Period.DAY: 30.44, Period.WEEK: 30.44 / 7, Period.MONTH: 1.0, Period.QUARTER: 1 / 3,
                 Period.YEAR: 1 / 12}[period]
    return max(int(-(-months * per_month // 1)), 1)


def config_entry(a: Assessment, conn_id: str, recipe: Recipe) -> dict[str, Any] | None:
    """A rotation entry for the fleet config (``pg_partition.config.TableConfig``), or None if not applicable.

    For a conversion candidate: the entry to add once it is converted. For a table already RANGE-partitioned on
    a time column: the entry that keeps it rotated. The tests validate it against the config model
    (``pg_partition.config.TableConfig``), so a recommendation can always be pasted into the file; the engine
    itself does not import the config layer.
    """
    column = a.partition_column if a.is_partitioned else a.time_column
    if column is None or a.period is None or (not a.is_partitioned and not a.candidate):
        return None
    period = Period(a.period)
    return {"conn_id": conn_id, "table": a.table, "column": column, "period": period.value,
            "premake": recipe.premake, "retention": retention_periods(recipe.retention_months, period)}


def convert_params(a: Assessment, conn_id: str, recipe: Recipe) -> dict[str, Any] | None:
    """Params for the ``pg_partition_convert`` DAG that convert this candidate as the talk did.

    ``cover_data`` makes the partitions span the existing data; ``past`` says the same thing in periods, so the
    params are right whichever of the two the DAG honours. ``defer_indexes`` is on when there are secondary
    indexes: copying into a table without them and building them afterwards is the talk's speed-up.
    """
    if not a.candidate or a.time_column is None or a.period is None:
        return None
    period = Period(a.period)
    secondary = [s for s in a.create_indexes if "-- backs constraint" not in s]
    return {
        "conn_id": conn_id,
        "table": a.table,
        "column": a.time_column,
        "period": period.value,
        "past": periods_covering(a.span_from, a.span_to, period),
        "future": recipe.premake,
        "cover_data": True,
        "batch_size": recipe.batch_size,
        "where": "",
        "sleep_seconds": recipe.sleep_seconds,
        "primary_key": recipe.primary_key,
        "default_partition": False,
        "defer_indexes": bool(secondary),
        "lock_timeout": recipe.lock_timeout,
        "dry_run": False,
    }


def advise(conn: psycopg.Connection[Any], table: QualifiedName, *, conn_id: str,
           thresholds: Thresholds | None = None, recipe: Recipe | None = None, time_column: str | None = None,
           exact_counts: bool = False) -> Assessment:
    """:func:`assess` plus CREATE INDEX statements, partition stats and the two recommendations."""
    info = catalog.describe(conn, table)
    a = _assess_info(conn, info, thresholds or Thresholds(), time_column)
    _complete(conn, a, info, conn_id, recipe or Recipe(), exact_counts=exact_counts)
    return a


def _complete(conn: psycopg.Connection[Any], a: Assessment, info: TableInfo, conn_id: str, recipe: Recipe,
              *, exact_counts: bool) -> None:
    a.create_indexes = create_index_statements(info)
    if info.is_partitioned:
        a.partition_stats = [asdict(p) for p in partition_stats(conn, info, exact_counts=exact_counts)]
    a.config_entry = config_entry(a, conn_id, recipe)
    a.convert_params = convert_params(a, conn_id, recipe)


# --------------------------------------------------------------------------------------- whole database


@dataclass(frozen=True)
class TableSize:
    name: QualifiedName
    relkind: str
    sizes: catalog.Sizes


def list_tables(conn: psycopg.Connection[Any], *,
                exclude_schemas: tuple[str, ...] = EXCLUDED_SCHEMAS) -> list[tuple[QualifiedName, int, str]]:
    """Top-level user tables: ordinary and partitioned, not partitions themselves, not temp or system.

    (``core.catalog`` describes one known table; it has no listing, hence this one small query.)
    """
    rows = conn.execute(
        """SELECT n.nspname, c.relname, c.oid, c.relkind::text FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
             AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
             AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%%'
           ORDER BY 1, 2""",
        (list(exclude_schemas),),
    ).fetchall()
    return [(QualifiedName(r[0], r[1]), int(r[2]), r[3]) for r in rows]


def largest_tables(conn: psycopg.Connection[Any], limit: int = 10, *,
                   exclude_schemas: tuple[str, ...] = EXCLUDED_SCHEMAS) -> list[TableSize]:
    """The ``limit`` largest tables by total size (heap + indexes + TOAST, partitions summed)."""
    found = [TableSize(name, kind, catalog.sizes(conn, oid, partitioned=kind == "p"))
             for name, oid, kind in list_tables(conn, exclude_schemas=exclude_schemas)]
    found.sort(key=lambda t: (-t.sizes.total, str(t.name)))
    return found[:limit] if limit > 0 else found


@dataclass
class Survey:
    database: str
    conn_id: str
    thresholds: dict[str, Any]
    tables_total: int
    tables: list[Assessment]

    @property
    def candidates(self) -> list[Assessment]:
        return [a for a in self.tables if a.candidate]

    def config_entries(self) -> list[dict[str, Any]]:
        return [a.config_entry for a in self.tables if a.config_entry]

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": "database", "database": self.database, "conn_id": self.conn_id,
            "thresholds": self.thresholds, "tables_total": self.tables_total,
            "tables": [a.as_dict() for a in self.tables],
            "candidates": [a.table for a in self.candidates],
            "config_yaml": config_yaml(self.config_entries()),
            "convert_params": {a.table: a.convert_params for a in self.candidates if a.convert_params},
        }


def survey(conn: psycopg.Connection[Any], *, conn_id: str, limit: int = 10, thresholds: Thresholds | None = None,
           recipe: Recipe | None = None, exclude_schemas: tuple[str, ...] = EXCLUDED_SCHEMAS) -> Survey:
    """The ``limit`` largest tables of the connected database, each assessed and advised."""
    th = thresholds or Thresholds()
    rc = recipe or Recipe()
    all_tables = list_tables(conn, exclude_schemas=exclude_schemas)
    top = largest_tables(conn, limit, exclude_schemas=exclude_schemas)
    out = []
    for t in top:
        if not catalog.exists(conn, t.name):  # dropped since the listing
            continue
        info = catalog.describe(conn, t.name)
        a = _assess_info(conn, info, th, None)
        _complete(conn, a, info, conn_id, rc, exact_counts=False)
        out.append(a)
    row = conn.execute("SELECT current_database()").fetchone()
    return Survey(database=str(row[0]) if row else "", conn_id=conn_id, thresholds=asdict(th),
                  tables_total=len(all_tables), tables=out)


# -------------------------------------------------------------------------------------------- rendering


def config_yaml(entries: list[dict[str, Any]]) -> str:
    """Entries as a ``tables:`` block to paste into the fleet config (dags/pg_partition.yaml)."""
    if not entries:
        return ""
    return yaml.safe_dump({"tables": entries}, sort_keys=False, default_flow_style=False)


def render(a: Assessment) -> str:
    """A human summary of one table for task logs and the demo."""
    lines = [
        f"Table {a.table}: ~{a.rows_estimate:,} rows, {human_bytes(a.total_bytes)} total "
        f"(heap {human_bytes(a.table_bytes)}, indexes {human_bytes(a.index_bytes)}, "
        f"toast {human_bytes(a.toast_bytes)})",
        f"  partitioned: {'yes, ' + str(a.partitions) + ' partitions' if a.is_partitioned else 'no'}; "
        f"writes: {a.write_pattern} ({a.inserts:,} ins / {a.updates:,} upd / {a.deletes:,} del)",
        f"  time columns: {', '.join(a.time_columns) or 'none'}; integer key: {a.integer_key or 'none'}",
    ]
    if a.rows_per_month is not None:
        lines.append(f"  data from {a.span_from} to {a.span_to}: ~{a.rows_per_month:,} rows/month, "
                     f"~{human_bytes(a.bytes_per_month or 0)}/month")
    verdict = "CANDIDATE for partitioning" if a.candidate else "not a candidate now"
    why = "; ".join(a.reasons + [f"blocked: {b}" for b in a.blockers]) or "below the size thresholds"
    lines.append(f"  verdict: {verdict} ({why})")
    lines += [f"  note: {n}" for n in a.notes]
    if a.create_indexes:
        lines.append("  CREATE INDEX statements (for a deferred index rebuild):")
        lines += [f"    {s}" for s in a.create_indexes]
    if a.partition_stats:
        lines.append("  partitions (rows: planner estimate" + (", exact" if any(
            p["rows_exact"] is not None for p in a.partition_stats) else "") + "):")
        for p in a.partition_stats:
            exact = f", exact {p['rows_exact']:,}" if p["rows_exact"] is not None else ""
            lines.append(f"    {p['name']:<40} ~{p['rows_estimate']:>12,} rows{exact}  "
                         f"{human_bytes(p['total_bytes']):>12}  {p['bound']}")
        total = sum(p["total_bytes"] for p in a.partition_stats)
        sized = [p for p in a.partition_stats if p["bound"] != "DEFAULT"]
        if sized:
            lines.append(f"    estimated size per partition: ~{human_bytes(total / len(sized))} "
                         f"(total {human_bytes(total)})")
    if a.config_entry:
        lines.append("  fleet config entry for rotation (dags/pg_partition.yaml):")
        lines += ["    " + s for s in config_yaml([a.config_entry]).splitlines()]
    if a.convert_params:
        lines.append("  pg_partition_convert params:")
        lines.append("    " + json.dumps(a.convert_params))
    return "\n".join(lines)


def render_survey(s: Survey) -> str:
    """The largest tables as a Markdown table, then what to do about the candidates."""
    head = ("| # | table | total | heap | indexes | toast | rows (est.) | writes | time col | int key "
            "| rows/month | size/month | verdict |")
    lines = [
        f"Database {s.database} ({s.conn_id}): {len(s.tables)} largest of {s.tables_total} tables; "
        f"candidate when size >= {s.thresholds['memory_gb']:g} GB (server memory) or >= "
        f"{s.thresholds['min_gb']:g} GB",
        "",
        head,
        "|" + "---|" * 13,
    ]
    for i, a in enumerate(s.tables, 1):
        verdict = "CANDIDATE" if a.candidate else ("partitioned" if a.is_partitioned else
                                                   ("blocked" if a.reasons else "small"))
        lines.append(
            f"| {i} | {a.table} | {human_bytes(a.total_bytes)} | {human_bytes(a.table_bytes)} | "
            f"{human_bytes(a.index_bytes)} | {human_bytes(a.toast_bytes)} | {a.rows_estimate:,} | "
            f"{a.write_pattern} | {a.time_column or '-'} | {a.integer_key or '-'} | "
            f"{'-' if a.rows_per_month is None else f'{a.rows_per_month:,}'} | "
            f"{'-' if a.bytes_per_month is None else human_bytes(a.bytes_per_month)} | {verdict} |")
    for a in s.tables:
        if a.blockers and a.reasons:
            lines.append(f"\n{a.table} is large but blocked: " + "; ".join(a.blockers))
        for n in a.notes if a.candidate else []:
            lines.append(f"\n{a.table}: {n}")
    yaml_text = config_yaml(s.config_entries())
    if yaml_text:
        lines += ["", "Recommended fleet config entries for rotation (dags/pg_partition.yaml):", "", yaml_text]
    for a in s.candidates:
        if a.convert_params:
            lines += [f"pg_partition_convert params for {a.table}:", json.dumps(a.convert_params), ""]
    if not s.candidates:
        lines += ["", "No conversion candidates at these thresholds."]
    return "\n".join(lines)
