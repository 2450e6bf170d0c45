"""Read-only introspection of a table: everything a conversion, rotation or archive must know before acting.

One query per concern, all against ``pg_catalog`` so that they work on RDS/Aurora (no superuser, no extensions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.db.names import parse_bound, parse_bound_day


@dataclass(frozen=True)
class QualifiedName:
    schema: str
    name: str

    @classmethod
    def parse(cls, text: str, default_schema: str = "public") -> QualifiedName:
        """``schema.table`` or ``table``; double quotes keep dots and case (``"My.Schema"."Tbl"``).

        The result is only ever used through ``sql.Identifier``, so odd names are safe; this only rejects
        text that cannot be a table name at all.
        """
        parts = _split_ident(text)
        if len(parts) == 1:
            return cls(default_schema, parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise InvalidInputError(
            f"{text!r} is not a table name",
            fix='write it as table or schema.table; quote parts with dots or capitals: "My Schema"."MyTable"',
        )

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def sibling(self, name: str) -> QualifiedName:
        return QualifiedName(self.schema, name)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


def split_quoted(text: str, sep: str) -> list[str]:
    """Split a list of SQL identifiers on ``sep`` (``.`` or ``,``) the way PostgreSQL reads them: double quotes
    keep case, separators and doubled quotes (``"we""ird"``); unquoted text is folded to lower case."""
    parts: list[str] = []
    cur, quoted, i = "", False, 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == '"' and text[i + 1:i + 2] == '"':
                cur += '"'
                i += 1
            elif ch == '"':
                quoted = False
            else:
                cur += ch
        elif ch == '"':
            quoted = True
        elif ch == sep:
            parts.append(cur)
            cur = ""
        elif not ch.isspace():
            cur += ch.lower()
        i += 1
    if quoted:
        raise InvalidInputError(f"unbalanced double quote in {text!r}", fix="close every quoted name")
    parts.append(cur)
    return parts


def _split_ident(text: str) -> list[str]:
    parts = split_quoted(text.strip(), ".")
    if any(p == "" for p in parts):
        raise InvalidInputError(f"{text!r} is not a valid table name", fix="check quotes and dots")
    return parts


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool
    default: str | None
    identity: str  # '' | 'a' (ALWAYS) | 'd' (BY DEFAULT)
    generated: str  # '' | 's' (STORED)
    storage: str
    compression: str
    stats_target: int | None
    collation: str | None
    comment: str | None


@dataclass(frozen=True)
class Index:
    name: str
    definition: str
    is_unique: bool
    is_primary: bool
    columns: tuple[str, ...]
    constraint: str | None  # name of the PRIMARY KEY / UNIQUE / EXCLUDE constraint backed by it
    is_valid: bool


@dataclass(frozen=True)
class ForeignKey:
    name: str
    table: QualifiedName  # the referencing table
    references: QualifiedName
    definition: str


@dataclass(frozen=True)
class Partition:
    name: QualifiedName
    bound: str
    is_default: bool
    detach_pending: bool
    range_from: str | None = None
    range_to: str | None = None

    @property
    def start_day(self) -> Any:
        return None if self.range_from is None else parse_bound_day(self.range_from)

    @property
    def end_day(self) -> Any:
        return None if self.range_to is None else parse_bound_day(self.range_to)


@dataclass(frozen=True)
class Sizes:
    table: int
    indexes: int
    toast: int
    total: int


@dataclass
class TableInfo:
    name: QualifiedName
    oid: int
    relkind: str  # 'r' table, 'p' partitioned
    owner: str
    comment: str | None
    columns: list[Column]
    primary_key: Index | None
    indexes: list[Index]
    checks: list[tuple[str, str]]  # (name, definition)
    sequences: dict[str, QualifiedName]  # column -> owned sequence (serial or identity)
    foreign_keys_out: list[ForeignKey]
    foreign_keys_in: list[ForeignKey]
    grants: list[str]  # aclitem text
    publications: list[str]
    sizes: Sizes
    row_estimate: int
    partition_key: str | None
    partitions: list[Partition] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    tablespace: str | None = None
    persistence: str = "p"

    @property
    def is_partitioned(self) -> bool:
        return self.relkind == "p"

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def looks_append_only(self) -> bool:
        return self.stats.get("n_tup_upd", 0) == 0 and self.stats.get("n_tup_del", 0) == 0

    @property
    def default_partition(self) -> Partition | None:
        return next((p for p in self.partitions if p.is_default), None)


def table_oid(conn: psycopg.Connection[Any], name: QualifiedName) -> int | None:
    row = conn.execute(
        """SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')""",
        (name.schema, name.name),
    ).fetchone()
    return None if row is None else int(row[0])


def exists(conn: psycopg.Connection[Any], name: QualifiedName) -> bool:
    return table_oid(conn, name) is not None


def describe(conn: psycopg.Connection[Any], name: QualifiedName) -> TableInfo:
    """Everything about one table. Raises InvalidInputError if it does not exist."""
    oid = table_oid(conn, name)
    if oid is None:
        raise InvalidInputError(
            f"table {name} does not exist",
            fix="check the schema and table name (names are case-sensitive when quoted)",
        )
    cur = conn.cursor(row_factory=dict_row)
    rel = cur.execute(
        """SELECT c.relkind, pg_get_userbyid(c.relowner) AS owner, obj_description(c.oid, 'pg_class') AS comment,
                  c.reltuples::bigint AS reltuples, ts.spcname AS tablespace, c.relpersistence,
                  CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partkey,
                  coalesce(c.relacl::text[], '{}') AS acl
           FROM pg_class c LEFT JOIN pg_tablespace ts ON ts.oid = c.reltablespace WHERE c.oid = %s""",
        (oid,),
    ).fetchone()
    assert rel is not None
    partitions = list_partitions(conn, oid) if rel["relkind"] == "p" else []
    info = TableInfo(
        name=name,
        oid=oid,
        relkind=rel["relkind"],
        owner=rel["owner"],
        comment=rel["comment"],
        columns=columns(conn, oid),
        primary_key=None,
        indexes=indexes(conn, oid),
        checks=[(r[0], r[1]) for r in conn.execute(
            """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
               WHERE conrelid = %s AND contype = 'c' ORDER BY conname""", (oid,))],
        sequences=owned_sequences(conn, oid),
        foreign_keys_out=foreign_keys(conn, oid, incoming=False),
        foreign_keys_in=foreign_keys(conn, oid, incoming=True),
        grants=list(rel["acl"]),
        publications=publications(conn, oid),
        sizes=sizes(conn, oid, partitioned=rel["relkind"] == "p"),
        row_estimate=row_estimate(conn, oid, partitions) if rel["relkind"] == "p" else max(int(rel["reltuples"]), 0),
        partition_key=rel["partkey"],
        partitions=partitions,
        stats=table_stats(conn, oid),
        tablespace=rel["tablespace"],
        persistence=rel["relpersistence"],
    )
    info.primary_key = next((i for i in info.indexes if i.is_primary), None)
    return info


def columns(conn: psycopg.Connection[Any], oid: int) -> list[Column]:
    rows = conn.execute(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                  CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
                  a.attidentity, a.attgenerated,
                  CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END,
                  a.attstorage, a.attcompression, nullif(a.attstattarget, -1),
                  CASE WHEN a.attcollation <> t.typcollation THEN co.collname END,
                  col_description(a.attrelid, a.attnum)
           FROM pg_attribute a
           JOIN pg_type t ON t.oid = a.atttypid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
           LEFT JOIN pg_collation co ON co.oid = a.attcollation
           WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
           ORDER BY a.attnum""",
        (oid,),
    ).fetchall()
    return [
        Column(
            name=r[0], type=r[1], not_null=r[2], default=r[3] if r[5] == "" else r[6], identity=r[4],
            generated=r[5], storage=r[7], compression=r[8] or "", stats_target=r[9], collation=r[10],
            comment=r[11],
        )
        for r in rows
    ]


def indexes(conn: psycopg.Connection[Any], oid: int) -> list[Index]:
    rows = conn.execute(
        """SELECT ic.relname, pg_get_indexdef(i.indexrelid), i.indisunique, i.indisprimary,
                  array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                        ORDER BY k.ord)::text[],
                  con.conname, i.indisvalid
           FROM pg_index i
           JOIN pg_class ic ON ic.oid = i.indexrelid
           LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
           WHERE i.indrelid = %s
           ORDER BY i.indisprimary DESC, ic.relname""",
        (oid,),
    ).fetchall()
    return [Index(r[0], r[1], r[2], r[3], tuple(r[4]), r[5], r[6]) for r in rows]


def owned_sequences(conn: psycopg.Connection[Any], oid: int) -> dict[str, QualifiedName]:
    rows = conn.execute(
        """SELECT a.attname, sn.nspname, s.relname
           FROM pg_depend d
           JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
           JOIN pg_namespace sn ON sn.oid = s.relnamespace
           JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
           WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
             AND d.refobjid = %s AND d.deptype IN ('a', 'i')""",
        (oid,),
    ).fetchall()
    return {r[0]: QualifiedName(r[1], r[2]) for r in rows}


def foreign_keys(conn: psycopg.Connection[Any], oid: int, *, incoming: bool) -> list[ForeignKey]:
    side = "confrelid" if incoming else "conrelid"
    rows = conn.execute(
        sql.SQL(
            """SELECT con.conname, sn.nspname, s.relname, tn.nspname, t.relname, pg_get_constraintdef(con.oid)
               FROM pg_constraint con
               JOIN pg_class s ON s.oid = con.conrelid JOIN pg_namespace sn ON sn.oid = s.relnamespace
               JOIN pg_class t ON t.oid = con.confrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace
               WHERE con.contype = 'f' AND con.{} = %s AND con.conparentid = 0
               ORDER BY con.conname"""
        ).format(sql.Identifier(side)),
        (oid,),
    ).fetchall()
    return [ForeignKey(r[0], QualifiedName(r[1], r[2]), QualifiedName(r[3], r[4]), r[5]) for r in rows]


def publications(conn: psycopg.Connection[Any], oid: int) -> list[str]:
    """Publications that name the table explicitly (FOR ALL TABLES publications follow renames by themselves)."""
    rows = conn.execute(
        "SELECT p.pubname FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid "
        "WHERE pr.prrelid = %s ORDER BY 1",
        (oid,),
    ).fetchall()
    return [r[0] for r in rows]


def sizes(conn: psycopg.Connection[Any], oid: int, *, partitioned: bool = False) -> Sizes:
    """Heap, index and TOAST bytes; for a partitioned table, summed over every leaf partition."""
    row = conn.execute(
        """SELECT coalesce(sum(pg_relation_size(r)), 0)::bigint, coalesce(sum(pg_indexes_size(r)), 0)::bigint,
                  coalesce(sum(pg_total_relation_size(r) - pg_relation_size(r) - pg_indexes_size(r)), 0)::bigint,
                  coalesce(sum(pg_total_relation_size(r)), 0)::bigint
           FROM (SELECT relid AS r FROM pg_partition_tree(%(oid)s::regclass) WHERE isleaf AND %(p)s
                 UNION ALL SELECT %(oid)s::regclass WHERE NOT %(p)s) t""",
        {"oid": oid, "p": partitioned},
    ).fetchone()
    assert row is not None
    return Sizes(*(int(v) for v in row))


def row_estimate(conn: psycopg.Connection[Any], oid: int, partitions: list[Partition] | None = None) -> int:
    row = conn.execute(
        """SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint FROM pg_partition_tree(%s::regclass) t
           JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf""",
        (oid,),
    ).fetchone()
    return int(row[0]) if row else 0


def table_stats(conn: psycopg.Connection[Any], oid: int) -> dict[str, int]:
    row = conn.execute(
        """SELECT n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd, n_live_tup, n_dead_tup, seq_scan,
                  coalesce(idx_scan, 0)
           FROM pg_stat_user_tables WHERE relid = %s""",
        (oid,),
    ).fetchone()
    keys = ("n_tup_ins", "n_tup_upd", "n_tup_del", "n_tup_hot_upd", "n_live_tup", "n_dead_tup", "seq_scan",
            "idx_scan")
    return dict(zip(keys, (int(v or 0) for v in row), strict=True)) if row else {}


def list_partitions(conn: psycopg.Connection[Any], parent_oid: int) -> list[Partition]:
    """Direct partitions of a partitioned table, ordered by range start (DEFAULT last).

    ``timestamptz`` bounds are rendered in the session's TimeZone; ``start_day``/``end_day`` convert them back
    to UTC days, so callers never depend on the session setting.
    """
    rows = conn.execute(
        """SELECT n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid), i.inhdetachpending
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE i.inhparent = %s""",
        (parent_oid,),
    ).fetchall()
    out = []
    for schema, name, bound, pending in rows:
        parsed = parse_bound(bound)
        out.append(Partition(
            name=QualifiedName(schema, name), bound=bound, is_default=parsed is None, detach_pending=pending,
            range_from=parsed[0] if parsed else None, range_to=parsed[1] if parsed else None,
        ))
    out.sort(key=lambda p: (p.is_default, p.start_day or 0))
    return out


def replication_slots(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute(
        """SELECT slot_name, slot_type, plugin, database, active,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained_bytes
           FROM pg_replication_slots ORDER BY slot_name"""
    ).fetchall()


def server_version_num(conn: psycopg.Connection[Any]) -> int:
    return int(conn.info.server_version)
