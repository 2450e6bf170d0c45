"""Settings PostgreSQL keeps per leaf table, not on a partitioned parent: storage options and replica identity.

``ALTER TABLE <partitioned> SET (fillfactor = ...)`` is refused and ``REPLICA IDENTITY`` on a parent does not
reach its partitions, and ``CREATE TABLE ... (LIKE ...)`` copies neither. So the conversion reads them from the
source table once (prep) and applies them to every partition it creates, and rotation copies them from the newest
existing partition to each new one; otherwise a table tuned for HOT updates (fillfactor) or per-table
autovacuum, or published with ``REPLICA IDENTITY FULL``, silently loses that on every new partition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName, TableInfo
from pg_partition.core.db.execute import Executor


@dataclass(frozen=True)
class LeafSettings:
    reloptions: list[str] = field(default_factory=list)  # ``name=value`` as in pg_class.reloptions
    toast: list[str] = field(default_factory=list)  # the TOAST table's, applied as ``toast.name``
    replica_identity: str = "d"  # d, f, n (i: an index, carried by the caller with the index)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LeafSettings:
        d = d or {}
        return cls(list(d.get("reloptions") or []), list(d.get("toast") or []), d.get("replica_identity") or "d")

    @property
    def empty(self) -> bool:
        return not self.reloptions and not self.toast and self.replica_identity not in ("f", "n")


def read(conn: psycopg.Connection[Any], oid: int) -> LeafSettings:
    """The leaf settings of a plain table (or partition)."""
    row = conn.execute(
        """SELECT coalesce(c.reloptions, '{}'), coalesce(t.reloptions, '{}'), c.relreplident
           FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid = %s""", (oid,)).fetchone()
    if row is None:
        return LeafSettings()
    return LeafSettings(list(row[0]), list(row[1]), str(row[2]))


def newest_leaf(conn: psycopg.Connection[Any], parent: TableInfo) -> LeafSettings:
    """The settings of the newest non-default partition (latest range), the model for a new one."""
    parts = sorted((p for p in parent.partitions if not p.is_default), key=lambda p: str(p.end_day))
    oid = catalog.table_oid(conn, parts[-1].name) if parts else None
    return read(conn, oid) if oid else LeafSettings()


def _options(items: list[str], prefix: str = "") -> sql.Composable:
    parts = []
    for item in items:
        name, _, value = item.partition("=")
        key: sql.Composable = sql.Identifier(name)
        if prefix:
            key = sql.SQL("{}.{}").format(sql.Identifier(prefix), key)
        parts.append(sql.SQL("{} = {}").format(key, sql.Literal(value)))
    return sql.SQL(", ").join(parts)


def statements(table: QualifiedName, settings: LeafSettings) -> list[sql.Composed]:
    """The DDL giving ``table`` these settings (nothing when they are PostgreSQL's defaults)."""
    out: list[sql.Composed] = []
    if settings.reloptions or settings.toast:
        opts = ([_options(settings.reloptions)] if settings.reloptions else []) + (
            [_options(settings.toast, "toast")] if settings.toast else [])
        out.append(sql.SQL("ALTER TABLE {} SET ({})").format(table.ident, sql.SQL(", ").join(opts)))
    if settings.replica_identity in ("f", "n"):
        out.append(sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(
            table.ident, sql.SQL("FULL" if settings.replica_identity == "f" else "NOTHING")))
    return out


def apply(ex: Executor, table: QualifiedName, settings: LeafSettings) -> None:
    """Run :func:`statements` (inside the caller's transaction and lock_timeout)."""
    for stmt in statements(table, settings):
        ex.run(stmt)
