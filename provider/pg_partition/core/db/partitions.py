"""Creating range partitions with the weakest lock that works.

``CREATE TABLE ... PARTITION OF`` takes ACCESS EXCLUSIVE on the parent for the whole statement. Creating the
table standalone, giving it a CHECK constraint that matches its bounds, and then ``ATTACH PARTITION`` only takes
SHARE UPDATE EXCLUSIVE on the parent, and the CHECK lets PostgreSQL skip the validation scan. Conversion
(add partitions), rotation (premake) and restore (attach back) all create partitions through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName, TableInfo
from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.names import ColumnKind, Period, Range, partition_name


@dataclass(frozen=True)
class PartitionSpec:
    name: QualifiedName
    range: Range


def column_kind(info: TableInfo, column: str) -> ColumnKind:
    col = info.column(column)
    if col is None:
        raise InvalidInputError(f"column {column!r} does not exist in {info.name}",
                                fix="pass the name of the table's timestamp/date column")
    kind = ColumnKind.from_type(col.type)
    if kind is None:
        raise InvalidInputError(
            f"column {column!r} of {info.name} has type {col.type}",
            fix="partition on a timestamp, timestamptz or date column",
        )
    return kind


def partition_column(info: TableInfo) -> str:
    """The single column of a RANGE-partitioned table's key (``RANGE (created_at)`` -> ``created_at``)."""
    key = info.partition_key or ""
    if not key.startswith("RANGE (") or "," in key:
        raise InvalidInputError(
            f"{info.name} is not RANGE partitioned on a single column (key: {key or 'none'})",
            fix="pg-partition manages single-column RANGE partitioning by time",
        )
    inner = key[len("RANGE ("):-1]
    return inner.strip('"').replace('""', '"') if inner.startswith('"') else inner


def check_constraint_name(child: QualifiedName) -> str:
    from pg_partition.core.db.names import fit_identifier

    return fit_identifier(child.name, "_bounds")


def bounds_condition(column: str, rng: Range, kind: ColumnKind) -> sql.Composable:
    low, high = rng.literal(kind)
    col = sql.Identifier(column)
    return sql.SQL("{col} IS NOT NULL AND {col} >= {low}::{t} AND {col} < {high}::{t}").format(
        col=col, low=sql.Literal(low), high=sql.Literal(high), t=sql.SQL(kind.value),
    )


def per_partition_key(conn: psycopg.Connection[Any], parent: TableInfo) -> tuple[str, ...] | None:
    """Columns of a primary key that lives on each partition but not on the parent (pgslice's layout)."""
    if parent.primary_key is not None:
        return None
    for part in reversed([p for p in parent.partitions if not p.is_default]):
        pk = catalog.describe(conn, part.name).primary_key
        if pk is not None:
            return pk.columns
    return None


def create_partition(
    ex: Executor,
    parent: TableInfo,
    column: str,
    rng: Range,
    period: Period,
    *,
    name: QualifiedName | None = None,
    primary_key: tuple[str, ...] | None = None,
    lock_timeout: str = "2s",
    retries: int = 5,
) -> PartitionSpec:
    """Create one partition standalone and ATTACH it. Idempotent: an attached partition is left alone.

    ``primary_key`` adds a per-partition primary key (pgslice's layout, where the parent has none).
    """
    kind = column_kind(parent, column)
    child = name or parent.name.sibling(partition_name(parent.name.name, rng.start, period))
    low, high = rng.literal(kind)
    existing = {p.name for p in parent.partitions}
    if child in existing:
        return PartitionSpec(child, rng)

    def body() -> None:
        if ex.dry_run or not catalog.exists(ex.conn, child):
            ex.run(sql.SQL(
                "CREATE TABLE {child} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
                "INCLUDING COMPRESSION INCLUDING GENERATED INCLUDING STATISTICS)"
            ).format(child=child.ident, parent=parent.name.ident))
            # LIKE ... INCLUDING STATISTICS copies extended statistics only, not per-column targets.
            for col in parent.columns:
                if col.stats_target is not None:
                    ex.run(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS {}").format(
                        child.ident, sql.Identifier(col.name), sql.Literal(col.stats_target)))
            if parent.tablespace:
                ex.run(sql.SQL("ALTER TABLE {} SET TABLESPACE {}").format(
                    child.ident, sql.Identifier(parent.tablespace)))
            ex.run(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(
                child.ident, sql.Identifier(check_constraint_name(child)), bounds_condition(column, rng, kind)))
            if primary_key:
                ex.run(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                    child.ident, sql.SQL(", ").join(map(sql.Identifier, primary_key))))
            copy_grants(ex, parent.grants, child)
        ex.run(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            parent.name.ident, child.ident, sql.Literal(low), sql.Literal(high)))
        ex.run(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
            child.ident, sql.Identifier(check_constraint_name(child))))

    ex.with_lock_timeout(body, lock_timeout=lock_timeout, retries=retries, what=f"attach partition {child}")
    return PartitionSpec(child, rng)


def copy_grants(ex: Executor, acl: list[str], target: QualifiedName) -> None:
    """Re-issue the privileges of an ACL (``grantee=arwdDxt/grantor`` items) on another table."""
    letters = {"a": "INSERT", "r": "SELECT", "w": "UPDATE", "d": "DELETE", "D": "TRUNCATE",
               "x": "REFERENCES", "t": "TRIGGER"}
    for item in acl:
        grantee, _, rest = item.partition("=")
        privs = rest.split("/", 1)[0]
        names = [letters[ch] for ch in privs if ch in letters]
        if not names:
            continue
        who = sql.SQL("PUBLIC") if grantee == "" else sql.Identifier(grantee.strip('"'))
        ex.run(sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(", ").join(map(sql.SQL, names)), target.ident, who))
