"""Is this table a partitioning candidate? The talk's sizing rules, answered from the catalog.

Rules (from the users' talk and the PostgreSQL docs): partition when the table exceeds the server's memory, or is
at least 100 GB; it needs a time column to range-partition on and an integer key to copy in batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core import catalog
from pg_partition.core.catalog import QualifiedName, TableInfo
from pg_partition.core.names import ColumnKind

GB = 1024**3
INTEGER_TYPES = {"smallint", "integer", "bigint"}


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _indexed_leading(info: TableInfo, column: str) -> bool:
    return any(i.columns[:1] == (column,) for i in info.indexes)


def assess(conn: psycopg.Connection[Any], table: QualifiedName, *, memory_gb: float = 16.0,
           min_gb: float = 100.0, time_column: str | None = None) -> Assessment:
    info = catalog.describe(conn, table)
    time_cols = [c.name for c in info.columns if ColumnKind.from_type(c.type) is not None]
    pk = info.primary_key
    key = pk.columns[0] if pk and (info.column(pk.columns[0]) or _no_col()).type in INTEGER_TYPES else None
    a = Assessment(
        table=str(table), rows_estimate=info.row_estimate, table_bytes=info.sizes.table,
        index_bytes=info.sizes.indexes, toast_bytes=info.sizes.toast, total_bytes=info.sizes.total,
        is_partitioned=info.is_partitioned, partitions=len(info.partitions), append_only=info.looks_append_only,
        time_columns=time_cols, integer_key=key,
    )
    col = time_column or next((c for c in time_cols if c == "created_at"), time_cols[0] if time_cols else None)
    # min/max only through an index: a full scan of a 1 TB table is not an acceptable side effect of a report.
    if col and _indexed_leading(info, col):
        lo, hi = conn.execute(sql.SQL("SELECT min({c}), max({c}) FROM {t}").format(
            c=sql.Identifier(col), t=table.ident)).fetchone() or (None, None)
        if lo is not None and hi is not None:
            a.span_from, a.span_to = str(lo), str(hi)
            months = max(_months_between(lo, hi), 1.0)
            a.rows_per_month = int(info.row_estimate / months)
            a.bytes_per_month = int(info.sizes.total / months)
    if info.sizes.total >= memory_gb * GB:
        a.reasons.append(f"total size {info.sizes.total / GB:.1f} GB >= server memory {memory_gb:g} GB")
    if info.sizes.total >= min_gb * GB:
        a.reasons.append(f"total size {info.sizes.total / GB:.1f} GB >= {min_gb:g} GB")
    if info.is_partitioned:
        a.blockers.append("already partitioned")
    if not time_cols:
        a.blockers.append("no timestamp/timestamptz/date column to partition on")
    if key is None:
        a.blockers.append("no primary key whose first column is an integer (needed for batched copy)")
    if info.foreign_keys_in:
        a.blockers.append("referenced by foreign keys: " + ", ".join(f"{fk.table}.{fk.name}"
                                                                    for fk in info.foreign_keys_in))
    a.candidate = bool(a.reasons) and not a.blockers
    return a


def _no_col() -> catalog.Column:
    return catalog.Column("", "", False, None, "", "", "", "", None, None, None)


def _months_between(lo: Any, hi: Any) -> float:
    if isinstance(lo, datetime) and isinstance(hi, datetime):
        return (hi.replace(tzinfo=None) - lo.replace(tzinfo=None)).total_seconds() / (30.44 * 86400)
    return float((hi - lo).days) / 30.44


def render(a: Assessment) -> str:
    """A short human summary for task logs and the demo."""
    lines = [
        f"Table {a.table}: ~{a.rows_estimate:,} rows, {a.total_bytes / 1024**2:,.1f} MiB total "
        f"(heap {a.table_bytes / 1024**2:,.1f}, indexes {a.index_bytes / 1024**2:,.1f}, "
        f"toast {a.toast_bytes / 1024**2:,.1f})",
        f"  partitioned: {'yes, ' + str(a.partitions) + ' partitions' if a.is_partitioned else 'no'}; "
        f"append-only so far: {'yes' if a.append_only else 'no (has UPDATE/DELETE)'}",
        f"  time columns: {', '.join(a.time_columns) or 'none'}; integer key: {a.integer_key or 'none'}",
    ]
    if a.rows_per_month is not None:
        lines.append(f"  data from {a.span_from} to {a.span_to}: ~{a.rows_per_month:,} rows/month, "
                     f"~{(a.bytes_per_month or 0) / 1024**2:,.1f} MiB/month")
    verdict = "CANDIDATE for partitioning" if a.candidate else "not a candidate now"
    why = "; ".join(a.reasons + [f"blocked: {b}" for b in a.blockers]) or "below the size thresholds"
    lines.append(f"  verdict: {verdict} ({why})")
    return "\n".join(lines)
