"""Verification that a converted table holds exactly the rows of its source, partition by partition.

For each partition of the destination, the matching range of the source (rows whose partition column falls in
the partition's bounds; for a DEFAULT partition, rows in no other partition) and the partition itself are
compared by row count and an order-independent content hash: the exact sum (``sum(bigint)`` returns numeric and
accumulates in 128 bits, so it cannot overflow and is cheaper than summing numerics) of a 64-bit hash of each
row over every column, by name, in the source's column order (of its values where every type can be hashed, else
of its text: :func:`row_hash`). A sum, unlike XOR, also catches a row duplicated an even number of times. When
a partition differs and the key is an integer, the key space is bisected (16 buckets per level, same hash) down
to the exact differing keys, and the report names the partition and up to ``max_ranges`` differing key ranges.

Consistency while the application writes: the whole comparison is one REPEATABLE READ READ ONLY transaction
that reads the source once and the destination once (each grouped by partition: a CASE over the bounds on the
source, ``tableoid`` on the destination), so the source, the destination and the capture changelog are read from
the same short snapshot, and the time verify takes grows with the table, not with table x partitions (under
sustained writes a per-partition loop let the changelog grow faster than verify finished). Keys
with entries still in the changelog (changed but not yet replayed) are excluded from both sides: the replay and
the swap's final apply re-copy exactly those keys from the source, so they are checked by construction, and every
other key must already be equal (see ``capture``'s correctness argument). After the swap, the same function
compares ``<table>_retired`` (source) with the new table (dest); pass the keys written since the swap in
``exclude_keys`` (rows the application changed in the new table legitimately differ from the retired copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert import capture, catchup, prep, replay
from pg_partition.core.convert.capture import changelog_name
from pg_partition.core.convert.parallel import alongside
from pg_partition.core.convert.preflight import validate_where
from pg_partition.core.convert.spec import ConvertSpec, checkpoint
from pg_partition.core.db import catalog, partitions
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError, StateError, VerificationError
from pg_partition.core.db.execute import Executor, log
from pg_partition.core.db.locks import heavy_step, locks_table
from pg_partition.core.db.names import ColumnKind

INTEGER_TYPES = {"smallint", "integer", "bigint"}
FANOUT = 16


@dataclass
class RangeDiff:
    """Keys ``low..high`` (both inclusive) where source and destination disagree."""

    low: int
    high: int
    source_rows: int
    dest_rows: int

    def describe(self, key: str) -> str:
        span = f"{key} {self.low}" if self.low == self.high else f"{key} {self.low}..{self.high}"
        return f"{span} (source {self.source_rows} rows, destination {self.dest_rows})"


@dataclass
class PartitionCheck:
    partition: str
    range_from: str | None
    range_to: str | None
    source_rows: int
    dest_rows: int
    source_hash: str
    dest_hash: str
    excluded_keys: int = 0
    diffs: list[RangeDiff] = field(default_factory=list)
    diffs_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.source_rows == self.dest_rows and self.source_hash == self.dest_hash

    @property
    def bounds(self) -> str:
        if self.range_from is None:
            return "DEFAULT"
        return f"[{self.range_from}, {self.range_to})"


@dataclass
class VerifyReport:
    source: str
    dest: str
    key: str
    partitions: list[PartitionCheck] = field(default_factory=list)
    outside_rows: int = 0  # source rows that belong to no partition of dest
    seconds: float = 0.0
    source_scans: int = 0  # whole reads of each side (1 each: not once per partition)
    dest_scans: int = 0
    mode: str = ""  # "capture" or "append-only" when run by verify_conversion
    upto: int | None = None  # append-only: keys above this (written after the last catch-up) are not compared
    replayed: dict[str, Any] | None = None  # what verify_conversion replayed first
    caught_up: dict[str, Any] | None = None  # what verify_conversion copied first (append-only)
    analyzed: dict[str, Any] | None = None  # the ANALYZE verify_conversion ran alongside (analyze=True)

    @property
    def excluded_keys(self) -> int:
        return sum(p.excluded_keys for p in self.partitions)

    @property
    def ok(self) -> bool:
        return self.outside_rows == 0 and all(p.ok for p in self.partitions)

    @property
    def mismatches(self) -> list[PartitionCheck]:
        return [p for p in self.partitions if not p.ok]

    @property
    def rows(self) -> int:
        return sum(p.dest_rows for p in self.partitions)

    def lines(self) -> list[str]:
        out = []
        for p in self.mismatches:
            line = (f"partition {p.partition} {p.bounds}: source {p.source_rows} rows, destination "
                    f"{p.dest_rows} rows, content hash {'equal' if p.source_hash == p.dest_hash else 'differs'}")
            if p.diffs:
                line += "; differing key ranges: " + ", ".join(d.describe(self.key) for d in p.diffs)
                if p.diffs_truncated:
                    line += ", ... (more)"
            out.append(line)
        if self.outside_rows:
            out.append(f"{self.outside_rows} rows of {self.source} fall in no partition of {self.dest}")
        return out

    def summary(self) -> str:
        if self.ok:
            excluded = sum(p.excluded_keys for p in self.partitions)
            return (f"{self.dest} matches {self.source}: {len(self.partitions)} partitions, {self.rows} rows "
                    f"(count and content hash), {excluded} keys with pending changes left to replay/swap")
        return f"{self.dest} does not match {self.source}:\n" + "\n".join(self.lines())

    def raise_if_mismatch(self) -> None:
        if self.ok:
            return
        first = self.mismatches[0].partition if self.mismatches else self.dest
        raise VerificationError(
            self.summary(), where=first,
            fix="if change capture is on, run replay and verify again; otherwise re-fill the named key ranges "
            "(fill with start/stop) and verify again. Do not swap (or: do not drop the retired table) until it "
            "matches",
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        for p, check in zip(out["partitions"], self.partitions, strict=True):
            p["ok"] = check.ok
        return out


@dataclass(frozen=True)
class _Side:
    """One side's rows of one partition: table expression, condition, and the pending-key exclusion."""

    table: sql.Composable
    where: sql.Composable


def row_hash(conn: psycopg.Connection[Any], table: QualifiedName, columns: Sequence[str]) -> sql.Composable:
    """The 64-bit hash of one row (alias ``t``) that verify sums: ``hash_record_extended`` of the row where
    PostgreSQL has it (14+) and every column's type has an extended hash function, else ``hashtextextended`` of
    the row's text.

    Why two forms: turning a row into text (``record_out``: timestamps formatted, text quoted) is most of what a
    verify costs, and hashing the values themselves is about 40% cheaper on the users' table. The binary hash
    compares values by their type's equality (``1.0`` and ``1.00`` hash alike, as ``=`` says), the text hash by
    their output; a copy by ``INSERT ... SELECT`` between identical column types gives identical values either
    way. Both sides of a comparison always use the same form (chosen from the source's columns). Whether every
    type hashes is asked of PostgreSQL itself: the expression is evaluated once on a row of NULLs of the
    table's types (the type cache refuses a type without a hash function, json or point for example, even for a
    NULL), in its own transaction (a savepoint inside the caller's), so a refusal costs nothing but the choice."""
    cols = sql.SQL(", ").join(sql.Identifier("t", c) for c in columns)
    binary = sql.SQL("hash_record_extended(ROW({}), 0)").format(cols)
    if conn.info.server_version >= 140000:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SELECT {} FROM (SELECT 1) AS d LEFT JOIN {} AS t ON false").format(
                    binary, table.ident))
            return binary
        except psycopg.errors.UndefinedFunction:
            pass
    return sql.SQL("hashtextextended(ROW({})::text, 0)").format(cols)


class _Checker:
    def __init__(self, conn: psycopg.Connection[Any], source: QualifiedName, dest: QualifiedName,
                 exclude_keys: Sequence[Any] | None, exclude_pending: bool, upto: int | None = None,
                 source_filter: sql.Composable | None = None) -> None:
        self.conn = conn
        self.upto = upto
        # the rows of the source that the copy is meant to hold (a conversion with a ``where`` filter)
        self.source_table: sql.Composable = source.ident if source_filter is None else sql.SQL(
            "(SELECT * FROM {} WHERE {})").format(source.ident, source_filter)
        self.source = source
        self.dest = dest
        src_info = catalog.describe(conn, source)
        if src_info.is_partitioned:
            raise InvalidInputError(f"{source} is partitioned; verify compares a plain source with its copy",
                                    where=str(source), fix="pass the unpartitioned table as source")
        dest_info = catalog.describe(conn, dest)
        pk = src_info.primary_key or dest_info.primary_key
        key_cols: tuple[str, ...] = pk.columns if pk else ()
        if not key_cols and dest_info.is_partitioned:
            per_part = partitions.per_partition_key(conn, dest_info)
            key_cols = per_part or ()
        if not key_cols:
            raise InvalidInputError(f"{source} has no primary key", where=str(source),
                                    fix="verification needs the primary key to name differing rows")
        self.key_cols = key_cols
        self.key = key_cols[0]
        key_col = src_info.column(self.key)
        self.integer_key = key_col is not None and key_col.type in INTEGER_TYPES
        dest_cols = {c.name for c in dest_info.columns}
        missing = [c.name for c in src_info.columns if c.name not in dest_cols]
        if missing:
            raise StateError(f"{dest} lacks columns of {source}: {', '.join(missing)}", where=str(dest))
        self.row = row_hash(conn, source, [c.name for c in src_info.columns])
        self.dest_info = dest_info
        self.column = partitions.partition_column(dest_info) if dest_info.is_partitioned else None
        self.key_type = key_col.type if key_col is not None else "bigint"
        self.exclude_keys = list(exclude_keys or [])
        cl = changelog_name(source)
        self.changelog = cl if exclude_pending and catalog.exists(conn, cl) else None

    # -- conditions ---------------------------------------------------------------------------------------------
    def _range(self, lo: str, hi: str) -> sql.Composable:
        assert self.column is not None
        c = sql.Identifier("t", self.column)
        return sql.SQL("({c} >= {lo} AND {c} < {hi})").format(c=c, lo=sql.Literal(lo), hi=sql.Literal(hi))

    def _all_ranges(self) -> sql.Composable:
        parts = [self._range(p.range_from, p.range_to) for p in self.dest_info.partitions
                 if not p.is_default and p.range_from is not None and p.range_to is not None]
        return sql.SQL(" OR ").join(parts) if parts else sql.SQL("false")

    def _exclusion(self, *, pending: bool = True) -> sql.Composable:
        conds: list[sql.Composable] = []
        if self.changelog is not None and pending:
            conds.append(sql.SQL("NOT EXISTS (SELECT 1 FROM {cl} AS c WHERE {eq})").format(
                cl=self.changelog.ident,
                eq=sql.SQL(" AND ").join(sql.SQL("c.{k} = t.{k}").format(k=sql.Identifier(k))
                                         for k in self.key_cols)))
        if self.exclude_keys:
            conds.append(sql.SQL("NOT (t.{k} = ANY({arr}::{typ}[]))").format(
                k=sql.Identifier(self.key), arr=sql.Literal(self.exclude_keys), typ=sql.SQL(self.key_type)))
        if self.upto is not None:
            conds.append(sql.SQL("t.{k} <= {upto}").format(k=sql.Identifier(self.key), upto=sql.Literal(self.upto)))
        return sql.SQL(" AND ").join(conds) if conds else sql.SQL("true")

    def _pending_join(self) -> tuple[sql.Composable, sql.Composable]:
        """The exclusion as a join: ``LEFT JOIN`` the changelog's distinct pending keys (alias ``p``) and the
        condition that keeps a row (no pending entry, and :meth:`_exclusion`'s other terms)."""
        if self.changelog is None:
            return sql.SQL(""), self._exclusion()
        keys = [sql.Identifier(k) for k in self.key_cols]
        join = sql.SQL(" LEFT JOIN (SELECT DISTINCT {ks} FROM {cl}) AS p ON {eq}").format(
            ks=sql.SQL(", ").join(keys), cl=self.changelog.ident,
            eq=sql.SQL(" AND ").join(sql.SQL("p.{k} = t.{k}").format(k=k) for k in keys))
        keep = sql.SQL("p.{} IS NULL AND {}").format(keys[0], self._exclusion(pending=False))
        return join, keep

    # -- one read per side --------------------------------------------------------------------------------------
    def source_totals(self, parts: Sequence[catalog.Partition | None]) -> tuple[dict[int, tuple[int, str, int]],
                                                                                 int]:
        """One scan of the source grouped by the partition each row belongs to: {index in ``parts``: (rows,
        hash, excluded rows)}, and the rows (not excluded) that belong to no partition (-1)."""
        whens: list[sql.Composable] = []
        default_at = -1
        for i, part in enumerate(parts):
            if part is None:
                continue
            if part.is_default:
                default_at = i
            elif part.range_from is not None and part.range_to is not None:
                whens.append(sql.SQL("WHEN {} THEN {}").format(self._range(part.range_from, part.range_to),
                                                                sql.Literal(i)))
        targets: dict[int, int] | None = None  # width_bucket number -> index in ``parts`` (-2: not asked for)
        if parts and parts[0] is None:
            bucket: sql.Composable = sql.SQL("0")
        elif self.column is None:
            bucket = sql.SQL("-1")
        elif (by_bounds := self._bucket_by_bounds(parts)) is not None:
            bucket, targets = by_bounds
        else:
            # ranges of partitions not asked for (``only``) still claim their rows, so DEFAULT gets only the rest
            for part in self.dest_info.partitions:
                if part not in parts and not part.is_default and part.range_from is not None \
                        and part.range_to is not None:
                    whens.append(sql.SQL("WHEN {} THEN -2").format(self._range(part.range_from, part.range_to)))
            bucket = sql.SQL("CASE {} ELSE {} END").format(sql.SQL(" ").join(whens), sql.Literal(default_at)) \
                if whens else sql.Literal(default_at)
        # Keys pending in the changelog are excluded through a join with the changelog's distinct keys (a hash
        # join, computed once per row); written as a NOT EXISTS probe inside each of the three FILTERs it ran three
        # times per row. No OFFSET 0 fence (and no correlated subplan) is needed for that, so PostgreSQL may read
        # the source with parallel workers like the destination (2-3x faster on 2M rows, PostgreSQL 15); only an
        # explicit ``exclude_keys`` list (after the swap) keeps the fence, so its array is searched once per row.
        pending, excl = self._pending_join()
        fence = sql.SQL(" OFFSET 0") if self.exclude_keys else sql.SQL("")
        rows = self.conn.execute(sql.SQL(
            "SELECT b, count(*) FILTER (WHERE e), coalesce(sum(h) FILTER (WHERE e), 0)::text, "
            "count(*) FILTER (WHERE NOT coalesce(e, false)) FROM (SELECT {b} AS b, {excl} AS e, "
            "{row} AS h FROM {t} AS t{pending}{fence}) AS s GROUP BY 1"
        ).format(b=bucket, excl=excl, row=self.row, t=self.source_table, pending=pending,
                 fence=fence)).fetchall()
        if targets is None:
            out = {int(r[0]): (int(r[1]), str(r[2]), int(r[3])) for r in rows}
        else:  # several buckets (a gap between partitions, below the first, above the last, NULL) may go to one
            out = {}
            for b, n, h, excluded in rows:
                at = targets.get(b, default_at) if b is not None else default_at
                was = out.get(at, (0, "0", 0))
                out[at] = (was[0] + int(n), str(int(was[1]) + int(h)), was[2] + int(excluded))
        outside = out.pop(-1, (0, "0", 0))[0] if default_at == -1 else 0
        out.pop(-2, None)
        return out, outside

    def _bucket_by_bounds(self, parts: Sequence[catalog.Partition | None]
                          ) -> tuple[sql.Composable, dict[int, int]] | None:
        """The source rows' partition as ``width_bucket`` over every partition bound (sorted by the server, in
        the column's type), and which bucket is which partition; None when the column is not a date/timestamp.

        Why not a CASE over the ranges: PostgreSQL aggregates a grouping on ``width_bucket`` in its parallel
        workers (partial aggregation, one row per bucket and worker reaches the leader), while a CASE of 30
        ranges made it sort all rows in the workers and aggregate them in the leader; it is also one binary
        search per row instead of up to 30 comparisons."""
        assert self.column is not None
        col = self.dest_info.column(self.column)
        kind = ColumnKind.from_type(col.type) if col is not None else None
        ranged = [p for p in self.dest_info.partitions if not p.is_default and p.range_from is not None
                  and p.range_to is not None]
        if kind is None or not ranged or any(v.upper() in ("MINVALUE", "MAXVALUE") for p in ranged
                                             for v in (p.range_from or "", p.range_to or "")):
            return None
        typ = sql.SQL(kind.value)
        rows = self.conn.execute(sql.SQL(
            "WITH b AS (SELECT array_agg(DISTINCT v ORDER BY v) AS a FROM unnest({all}::{t}[]) AS v) "
            "SELECT b.a::text[], array_agg(width_bucket(lo, b.a) ORDER BY i) "
            "FROM b, unnest({los}::{t}[]) WITH ORDINALITY AS p(lo, i) GROUP BY b.a"
        ).format(all=sql.Literal([v for p in ranged for v in (p.range_from, p.range_to)]), t=typ,
                 los=sql.Literal([p.range_from for p in ranged]))).fetchone()
        assert rows is not None
        bounds, numbers = rows
        index = {p.name: i for i, p in enumerate(parts) if p is not None}
        targets = {int(n): index.get(p.name, -2) for p, n in zip(ranged, numbers, strict=True)}
        bucket = sql.SQL("width_bucket({c}, {a}::{t}[])").format(
            c=sql.Identifier("t", self.column), a=sql.Literal(list(bounds)), t=typ)
        return bucket, targets

    def dest_totals(self, parts: Sequence[catalog.Partition | None]) -> dict[int, tuple[int, str]]:
        """One scan of the destination grouped by ``tableoid``: {index in ``parts``: (rows, hash)}."""
        excl = self._exclusion()
        if parts and parts[0] is None:
            row = self.conn.execute(sql.SQL(
                "SELECT count(*), coalesce(sum({row}), 0)::text FROM {t} AS t "
                "WHERE {w}").format(row=self.row, t=self.dest.ident, w=excl)).fetchone()
            assert row is not None
            return {0: (int(row[0]), str(row[1]))}
        index = {catalog.table_oid(self.conn, p.name): i for i, p in enumerate(parts) if p is not None}
        oids = [o for o in index if o is not None]
        rows = self.conn.execute(sql.SQL(
            "SELECT t.tableoid::oid, count(*), coalesce(sum({row}), 0)::text "
            "FROM {t} AS t WHERE t.tableoid = ANY({oids}::oid[]) AND {w} GROUP BY 1"
        ).format(row=self.row, t=self.dest.ident, oids=sql.Literal(oids), w=excl)).fetchall()
        return {index[int(r[0])]: (int(r[1]), str(r[2])) for r in rows}

    def sides(self, part: catalog.Partition | None) -> tuple[_Side, _Side]:
        excl = self._exclusion()
        if part is None:  # dest not partitioned: whole tables
            return (_Side(self.source_table, excl), _Side(self.dest.ident, excl))
        if part.is_default:
            src_where = sql.SQL("NOT coalesce({}, false) AND {}").format(self._all_ranges(), excl)
        else:
            assert part.range_from is not None and part.range_to is not None
            src_where = sql.SQL("{} AND {}").format(self._range(part.range_from, part.range_to), excl)
        return (_Side(self.source_table, src_where),
                _Side(sql.SQL("ONLY {}").format(part.name.ident), excl))

    # -- queries -------------------------------------------------------------------------------------------------
    def totals(self, side: _Side) -> tuple[int, str]:
        row = self.conn.execute(sql.SQL(
            "SELECT count(*), coalesce(sum({row}), 0)::text FROM {t} AS t "
            "WHERE {w}").format(row=self.row, t=side.table, w=side.where)).fetchone()
        assert row is not None
        return int(row[0]), str(row[1])

    def buckets(self, side: _Side, lo: int, width: int, hi: int) -> dict[int, tuple[int, str]]:
        k = sql.Identifier("t", self.key)
        rows = self.conn.execute(sql.SQL(
            "SELECT div({k}::numeric - {lo}, {w})::bigint AS b, count(*), "
            "coalesce(sum({row}), 0)::text "
            "FROM {t} AS t WHERE {where} AND {k} >= {lo} AND {k} <= {hi} GROUP BY 1"
        ).format(k=k, lo=sql.Literal(lo), hi=sql.Literal(hi), w=sql.Literal(width), row=self.row,
                 t=side.table, where=side.where)).fetchall()
        return {int(r[0]): (int(r[1]), str(r[2])) for r in rows}

    def key_bounds(self, src: _Side, dst: _Side) -> tuple[int, int] | None:
        k = sql.Identifier("t", self.key)
        lows, highs = [], []
        for side in (src, dst):
            row = self.conn.execute(sql.SQL("SELECT min({k}), max({k}) FROM {t} AS t WHERE {w}").format(
                k=k, t=side.table, w=side.where)).fetchone()
            if row and row[0] is not None:
                lows.append(int(row[0]))
                highs.append(int(row[1]))
        return (min(lows), max(highs)) if lows else None

    def diff_ranges(self, src: _Side, dst: _Side, max_ranges: int) -> tuple[list[RangeDiff], bool]:
        """Bisect the key space (inclusive ``lo..hi``) down to single keys that differ; merge adjacent ones."""
        bounds = self.key_bounds(src, dst)
        if bounds is None:
            return [], False
        found: list[RangeDiff] = []
        truncated = False
        stack = [bounds]
        while stack:
            lo, hi = stack.pop()
            width = max(1, -(-(hi - lo + 1) // FANOUT))
            a = self.buckets(src, lo, width, hi)
            b = self.buckets(dst, lo, width, hi)
            differing = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            children = []
            for n in differing:
                blo = lo + n * width
                bhi = min(hi, blo + width - 1)
                if width == 1:
                    found.append(RangeDiff(blo, bhi, a.get(n, (0, ""))[0], b.get(n, (0, ""))[0]))
                else:
                    children.append((blo, bhi))
            stack.extend(reversed(children))  # depth first, lowest keys first
            if len(found) >= max_ranges:
                truncated = bool(stack) or len(found) > max_ranges
                break
        found.sort(key=lambda d: d.low)
        merged: list[RangeDiff] = []
        for d in found:
            if merged and merged[-1].high + 1 == d.low:
                last = merged[-1]
                merged[-1] = RangeDiff(last.low, d.high, last.source_rows + d.source_rows,
                                       last.dest_rows + d.dest_rows)
            else:
                merged.append(d)
        return merged[:max_ranges], truncated

    def excluded(self, side: _Side, part: catalog.Partition | None) -> int:
        if self.changelog is None and not self.exclude_keys:
            return 0
        where = side.where
        # the same rows without the exclusion, minus the rows with it
        if part is not None and not part.is_default:
            assert part.range_from is not None and part.range_to is not None
            base: sql.Composable = self._range(part.range_from, part.range_to)
        elif part is not None:
            base = sql.SQL("NOT coalesce({}, false)").format(self._all_ranges())
        else:
            base = sql.SQL("true")
        row = self.conn.execute(sql.SQL(
            "SELECT count(*) FILTER (WHERE {base}) - count(*) FILTER (WHERE {where}) FROM {t} AS t"
        ).format(base=base, where=where, t=side.table)).fetchone()
        return int(row[0]) if row else 0

    def outside(self) -> int:
        if self.column is None or self.dest_info.default_partition is not None:
            return 0
        row = self.conn.execute(sql.SQL(
            "SELECT count(*) FROM {t} AS t WHERE NOT coalesce({ranges}, false) AND {excl}"
        ).format(t=self.source.ident, ranges=self._all_ranges(), excl=self._exclusion())).fetchone()
        return int(row[0]) if row else 0


def verify(
    conn: psycopg.Connection[Any],
    source: QualifiedName,
    dest: QualifiedName,
    *,
    only: Sequence[str] | None = None,
    exclude_keys: Sequence[Any] | None = None,
    exclude_pending: bool = True,
    upto: int | None = None,
    source_filter: sql.Composable | None = None,
    max_ranges: int = 20,
    raise_on_mismatch: bool = False,
) -> VerifyReport:
    """Compare ``source`` with ``dest`` partition by partition (count + content hash); read-only.

    ``only``: names of dest partitions to check (default: all). ``exclude_keys``: first-key-column values to
    leave out on both sides (for example keys the application wrote after the swap). ``exclude_pending``: leave
    out keys still in the capture changelog of ``source`` (changed, replay pending). ``upto``: compare only keys
    up to this first-key value (append-only mode: rows above the last catch-up's high-water mark are not copied
    yet). With ``raise_on_mismatch``, a difference raises :class:`VerificationError` naming the partition and key
    ranges. Each side is read once, in one snapshot.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise InvalidInputError("verify needs a connection outside a transaction",
                                fix="pass an autocommit connection (the comparison is one read-only snapshot)")
    started = time.monotonic()
    checker = _Checker(conn, source, dest, exclude_keys, exclude_pending, upto, source_filter)
    report = VerifyReport(str(source), str(dest), checker.key, upto=upto)
    parts: list[catalog.Partition | None] = (
        list(checker.dest_info.partitions) if checker.dest_info.is_partitioned else [None])
    if only is not None:
        wanted = set(only)
        parts = [p for p in parts if p is not None and (p.name.name in wanted or str(p.name) in wanted)]
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        src_totals, outside = checker.source_totals(parts)
        report.source_scans += 1
        dst_totals = checker.dest_totals(parts)
        report.dest_scans += 1
        if only is None:
            report.outside_rows = outside
        for i, part in enumerate(parts):
            s_rows, s_hash, excluded = src_totals.get(i, (0, "0", 0))
            d_rows, d_hash = dst_totals.get(i, (0, "0"))
            check = PartitionCheck(
                partition=str(part.name) if part else str(dest),
                range_from=part.range_from if part else None, range_to=part.range_to if part else None,
                source_rows=s_rows, dest_rows=d_rows, source_hash=s_hash, dest_hash=d_hash,
                excluded_keys=excluded,
            )
            if not check.ok and checker.integer_key:
                src, dst = checker.sides(part)
                check.diffs, check.diffs_truncated = checker.diff_ranges(src, dst, max_ranges)
            report.partitions.append(check)
            log.info("verify %s: %s %s: %d/%d rows, %s", source, check.partition, check.bounds, s_rows, d_rows,
                     "ok" if check.ok else "MISMATCH")
    report.seconds = time.monotonic() - started
    log.info("%s", report.summary())
    if raise_on_mismatch:
        report.raise_if_mismatch()
    return report


@locks_table()  # the per-table lock, also for a direct caller of the engine
@heavy_step  # counts against the database's heavy-step slots
def verify_conversion(
    ex: Executor,
    spec: ConvertSpec,
    *,
    batch_size: int = 5000,
    replay_until_backlog_below: int = 1000,
    max_ranges: int = 20,
    raise_on_mismatch: bool = False,
    throttle: Callable[[], None] | None = None,
    analyze: bool = False,
    connect: Callable[[], psycopg.Connection[Any]] | None = None,
) -> VerifyReport:
    """The pre-swap gate, in either mode: bring the copy up to date, then compare ``<table>`` with its
    intermediate in one snapshot.

    With change capture, replay runs first until fewer than ``replay_until_backlog_below`` changes wait (the
    backlog grew while indexes were built; verify excludes pending keys, so a large backlog would leave them
    unchecked), then keys still pending are excluded. Append-only mode (no capture): catch-up copies the rows
    written since the fill, then every key up to its high-water mark is compared; a row updated or deleted after
    it was copied shows up as a difference, which is exactly what this mode would lose.

    ``throttle`` paces the replay / catch-up batches as in the replay task (replication-lag gate, application
    latency): the backlog verify replays can be the largest of the run (it grew during the index builds).

    ``analyze``: run the intermediate's ANALYZE (:func:`prep.analyze_unlocked`) on a second session meanwhile
    (``connect`` opens it; default: the same parameters as ``ex.conn``). Before PostgreSQL 18 ANALYZE is one
    statement on one core and verify reads on others, so the two take about the time of the longer one instead
    of the sum (the statistics must exist before the swap, and neither step needs the other's result). This
    session already holds the table's lock and heavy-step slot for both.
    """
    conn = ex.conn
    stats_work = (lambda wex: prep.analyze_unlocked(wex, spec, connect=connect)) if analyze else None
    with alongside(ex, stats_work, connect=connect) as analyzed:
        if capture.is_installed(conn, spec.table):
            stats = replay.replay(ex, spec.table, spec.intermediate, batch_size=batch_size,
                                  until_backlog_below=replay_until_backlog_below, throttle=throttle)
            report = verify(conn, spec.table, spec.intermediate, max_ranges=max_ranges)
            report.mode, report.replayed = "capture", stats.as_dict()
        else:
            caught = catchup.catch_up(ex, spec, batch_size=batch_size, throttle=throttle)
            cp = checkpoint(conn, spec, "catch_up") or {}
            upto = cp.get("high_water", caught.get("high_water"))
            plan = checkpoint(conn, spec, "plan") or {}
            report = verify(conn, spec.table, spec.intermediate, exclude_pending=False,
                            upto=None if upto is None else int(upto), max_ranges=max_ranges,
                            source_filter=validate_where(conn, spec.table, plan.get("where")))
            report.mode, report.caught_up = "append-only", {k: caught.get(k) for k in ("rows", "outside_rows",
                                                                                         "high_water")}
        if analyzed is not None:
            report.analyzed = analyzed.result()
    if raise_on_mismatch:
        report.raise_if_mismatch()
    return report
