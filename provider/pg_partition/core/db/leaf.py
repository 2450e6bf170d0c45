"""Settings PostgreSQL keeps per leaf table, not on a partitioned parent: storage options and replica identity.

``ALTER TABLE <partitioned> SET (fillfactor = ...)`` is refused and ``REPLICA IDENTITY`` on a parent does not
reach its partitions, and ``CREATE TABLE ... (LIKE ...)`` copies neither. So the conversion reads them from the
source table once (prep) and applies them to every partition it creates, and rotation copies them from the newest
existing partition to each new one; otherwise a table tuned for HOT updates (fillfactor) or per-table
autovacuum, or published with ``REPLICA IDENTITY FULL``, silently loses that on every new partition.

``REPLICA IDENTITY USING INDEX`` names an index, and a new partition has its own: the setting is carried as the
index's key columns and applied on the new table's valid unique index with exactly those columns. Where it has
none (yet), ``FULL`` is used instead: a subscriber keyed by those columns can still apply every UPDATE and
DELETE (the old row carries every column), at the cost of logging whole old rows; left at DEFAULT, the old row
would carry only the partition's primary key and the subscriber would silently miss the change.
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
    replica_identity: str = "d"  # d, f, n, i (i: the index with the key columns ``identity_index``)
    identity_index: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LeafSettings:
        d = d or {}
        return cls(list(d.get("reloptions") or []), list(d.get("toast") or []), d.get("replica_identity") or "d",
                   list(d.get("identity_index") or []))

    @property
    def empty(self) -> bool:
        return not self.reloptions and not self.toast and self.replica_identity not in ("f", "n", "i")


def read(conn: psycopg.Connection[Any], oid: int) -> LeafSettings:
    """The leaf settings of a plain table (or partition)."""
    row = conn.execute(
        """SELECT coalesce(c.reloptions, '{}'), coalesce(t.reloptions, '{}'), c.relreplident
           FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid = %s""", (oid,)).fetchone()
    if row is None:
        return LeafSettings()
    return LeafSettings(list(row[0]), list(row[1]), str(row[2]), identity_columns(conn, oid))


def identity_columns(conn: psycopg.Connection[Any], oid: int) -> list[str]:
    """The key columns of the table's ``REPLICA IDENTITY USING INDEX`` index (empty when it has none)."""
    row = conn.execute(
        """SELECT array(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(num, pos)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num
                        WHERE k.pos <= i.indnkeyatts ORDER BY k.pos)::text[]
           FROM pg_index i WHERE i.indrelid = %s AND i.indisreplident""", (oid,)).fetchone()
    return list(row[0]) if row else []


def identity_index(conn: psycopg.Connection[Any], table: QualifiedName, columns: list[str]) -> str | None:
    """The name of an index of ``table`` PostgreSQL accepts for ``REPLICA IDENTITY USING INDEX`` with exactly
    these key columns: unique, valid, immediate, not partial, not on expressions, columns NOT NULL."""
    if not columns:
        return None
    row = conn.execute(
        """SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
           WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indimmediate AND i.indisvalid
             AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnkeyatts = cardinality(%s::text[])
             AND array(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(num, pos)
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num
                       WHERE k.pos <= i.indnkeyatts ORDER BY k.pos)::text[] = %s::text[]
             AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indrelid
                             AND a.attnum = ANY(i.indkey::int2[]) AND NOT a.attnotnull)
           ORDER BY i.indisprimary DESC, c.relname LIMIT 1""",
        (table.ident.as_string(conn), columns, columns)).fetchone()
    return str(row[0]) if row else None


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


def identity_statement(conn: psycopg.Connection[Any], table: QualifiedName, columns: list[str],
                       logger: Any = None) -> sql.Composed:
    """``REPLICA IDENTITY USING INDEX`` on ``table``'s index with these key columns, or ``FULL`` where it has
    none (see the module's docstring for why FULL and not DEFAULT)."""
    index = identity_index(conn, table, columns)
    if index is not None:
        return sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(table.ident, sql.Identifier(index))
    if logger is not None and columns:
        logger.info("%s has no unique index on (%s) for REPLICA IDENTITY USING INDEX (yet): using REPLICA "
                    "IDENTITY FULL so subscribers keyed by those columns still apply every change",
                    table, ", ".join(columns))
    elif logger is not None:  # the new parent at prep: its indexes come later, the swap sets USING INDEX
        logger.info("%s: REPLICA IDENTITY FULL until the swap sets USING INDEX on its copy of the source's index",
                    table)
    return sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(table.ident)


def apply(ex: Executor, table: QualifiedName, settings: LeafSettings) -> None:
    """Run :func:`statements` (inside the caller's transaction and lock_timeout); ``USING INDEX`` on the table's
    matching index (FULL while it has none)."""
    for stmt in statements(table, settings):
        ex.run(stmt)
    if settings.replica_identity == "i":
        ex.run(identity_statement(ex.conn, table, settings.identity_index, ex.logger))
