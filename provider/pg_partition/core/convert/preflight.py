"""Preflight: read the catalog, refuse what cannot be converted safely, and report what the conversion faces.

Nothing here writes to the database (not even the state schema), so a refused preflight leaves the database
exactly as it was. Every refusal says what is wrong, where, and what to do about it; all problems found are
reported together so the user can fix them in one pass.

Also home of :func:`validate_where`, the gate every user-supplied row filter passes before it is ever placed in
a statement (parsed by :mod:`pg_partition.core.convert.where`, re-checked on the server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.convert.spec import SWAPPED, ConvertSpec, recorded_job
from pg_partition.core.db import catalog, state
from pg_partition.core.db.capabilities import capabilities, require_privileges
from pg_partition.core.db.catalog import QualifiedName, TableInfo
from pg_partition.core.db.errors import InvalidInputError, PreflightError
from pg_partition.core.db.execute import read_only as read_only  # re-exported: fill imports it here
from pg_partition.core.db.names import ColumnKind

INTEGER_KEY_TYPES = ("smallint", "integer", "bigint")
CAPTURE_TRIGGER_PREFIX = "pg_partition_capture"


# --- the row filter ------------------------------------------------------------------------------------------


def _table_columns(conn: psycopg.Connection[Any], table: QualifiedName) -> list[str]:
    rows = conn.execute(
        """SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped""",
        (table.schema, table.name)).fetchall()
    return [r[0] for r in rows]


def ensure_conforming_strings(conn: psycopg.Connection[Any]) -> None:
    """The validated filter is printed with standard string syntax (a backslash is an ordinary character); a
    session with ``standard_conforming_strings = off`` would read it differently, so ours never runs that way."""
    if conn.info.parameter_status("standard_conforming_strings") != "on":
        conn.execute("SET standard_conforming_strings = on")


def validate_where(conn: psycopg.Connection[Any], table: QualifiedName, where: str | None) -> sql.Composable | None:
    """Check that ``where`` is a row filter over ``table``'s own columns and return pglast's re-deparse of it,
    ready to embed (never the user's text).

    Three gates: :func:`pg_partition.core.convert.where.parse` (PostgreSQL's grammar, an allowlist of node types,
    functions and casts); the server's ``pg_proc`` (every function used must be immutable or stable and return
    one row); and ``EXPLAIN SELECT 1 FROM t WHERE (<filter>)`` inside a READ ONLY transaction that is always
    rolled back, which type-checks it without executing anything. A refusal is an InvalidInputError and the
    database is unchanged.
    """
    if where is None or not str(where).strip():
        return None
    # imported here: pglast (PostgreSQL's parser) costs ~0.07 s to import in every task process, and most
    # conversions have no filter
    from pg_partition.core.convert import where as where_filter

    text = str(where).strip()
    checked = where_filter.parse(text, table=(table.schema, table.name), columns=_table_columns(conn, table))
    if checked.functions:
        bad = conn.execute(
            """SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace
               AND proname = ANY(%s) AND (provolatile = 'v' OR proretset) ORDER BY 1""",
            (sorted(checked.functions),)).fetchall()
        if bad:
            raise InvalidInputError(
                f"the where filter {text!r} was refused: {', '.join(r[0] for r in bad)} is volatile or returns a "
                "set on this server (pg_proc); nothing was run", fix=where_filter.FIX)
    ensure_conforming_strings(conn)
    fragment = sql.SQL("(" + checked.sql + ")")  # safe: pglast's print of a tree checked against the allowlist
    where_filter.check_on_server(conn, table, checked, fragment)  # user-defined operators, types, casts
    probe = sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE {}").format(table.ident, fragment)
    outer_tx = conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    try:
        if outer_tx:
            with conn.transaction():  # a savepoint inside the caller's transaction, rolled back below
                conn.execute(probe)
                raise _Rollback
        else:
            with conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute("SET LOCAL statement_timeout = '10s'")
                conn.execute(probe)
                raise _Rollback
    except _Rollback:
        pass
    except psycopg.Error as exc:
        raise InvalidInputError(
            f"the where filter {text!r} is not a valid boolean expression on {table}: "
            f"{(exc.diag.message_primary or str(exc)).strip()}",
            fix="pass one boolean expression over the table's columns, e.g. where=\"account_id = 123\"",
        ) from None
    return fragment


class _Rollback(Exception):
    """Raised inside ``conn.transaction()`` to roll the probe back on purpose."""


# --- preflight -----------------------------------------------------------------------------------------------

RELKINDS = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence", "i": "an index",
            "I": "a partitioned index", "c": "a composite type", "t": "a TOAST table"}


def check_owner(conn: psycopg.Connection[Any], table: QualifiedName, problems: _Problems) -> None:
    """The running role must own the table (or be a superuser): every step creates, renames or drops things only
    the owner may; refusing up front beats failing halfway on "must be owner"."""
    row = conn.execute(
        """SELECT pg_get_userbyid(c.relowner), current_user,
                  c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)
                  OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s""", (table.schema, table.name)).fetchone()
    if row is not None and not row[2]:
        problems.add(f"{table} is owned by {row[0]}; pg-partition connects as {row[1]}, which does not own it",
                     f"connect as {row[0]} (the Airflow connection's login), or have the owner run the conversion")


def check_tablespace(conn: psycopg.Connection[Any], tablespace: str | None, problems: _Problems) -> None:
    """The tablespace must exist and the running role must be allowed to create in it (pg_default always is)."""
    if not tablespace:
        return
    row = conn.execute("SELECT spcname FROM pg_tablespace WHERE spcname = %s", (tablespace,)).fetchone()
    if row is None:
        names = [r[0] for r in conn.execute("SELECT spcname FROM pg_tablespace ORDER BY 1").fetchall()]
        problems.add(f"tablespace={tablespace!r} does not exist", "use one of: " + ", ".join(names)
                     + " (or leave tablespace empty for the database's default)")
        return
    if tablespace == "pg_default":
        return
    ok = conn.execute("SELECT has_tablespace_privilege(%s, 'CREATE')", (tablespace,)).fetchone()
    if not (ok and ok[0]):
        problems.add(f"tablespace={tablespace!r}: the running role has no CREATE privilege on it",
                     f"GRANT CREATE ON TABLESPACE {sql.Identifier(tablespace).as_string(conn)} TO <the role>, "
                     "or choose another tablespace")


@dataclass
class _Problems:
    items: list[tuple[str, str]]

    def add(self, what: str, fix: str) -> None:
        self.items.append((what, fix))

    def raise_if_any(self, table: QualifiedName) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise PreflightError(self.items[0][0], where=str(table), fix=self.items[0][1])
        raise PreflightError(
            "refusing to convert, nothing was changed:\n" + "\n".join(f"  - {w}" for w, _ in self.items),
            where=str(table),
            fix="\n" + "\n".join(f"  - {f}" for _, f in self.items),
        )


def _quote(conn: psycopg.Connection[Any], name: QualifiedName) -> str:
    return name.ident.as_string(conn)


def check(conn: psycopg.Connection[Any], spec: ConvertSpec) -> tuple[TableInfo, list[str], bool]:
    """The refusals only (cheap catalog reads plus a NULL probe). Returns the source's TableInfo, warnings, and
    whether an intermediate table of this same conversion already exists (a resumed conversion)."""
    table = spec.table
    capabilities(conn).require_supported("conversion")
    if not catalog.exists(conn, table):
        kind = conn.execute(
            """SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = %s AND c.relname = %s""", (table.schema, table.name)).fetchone()
        if kind is not None:
            what = RELKINDS.get(kind[0], f"not a table (relkind {kind[0]})")
            raise PreflightError(f"{table} is {what}; only an ordinary table can be converted",
                                 fix="convert the table it reads from, or materialize it into a table first")
        raise PreflightError(f"table {table} does not exist",
                             fix="check the schema and table name (quote mixed-case names: \"Sales\".\"Orders\")")
    problems = _Problems([])
    check_owner(conn, table, problems)
    check_tablespace(conn, spec.tablespace, problems)
    for why in state.untrusted(conn):
        problems.add(why, f"as a superuser, inspect the {state.SCHEMA} schema (its rows may be forged), then drop it "
                     f"(DROP SCHEMA {state.SCHEMA} CASCADE) or give it and its tables to the role running "
                     "pg-partition and revoke the other roles' privileges")
    problems.raise_if_any(table)
    require_privileges(conn, f"the conversion of {table}", table_schema=table.schema, table=table.name)
    info = catalog.describe(conn, table)
    job = recorded_job(conn, table)
    if info.is_partitioned:
        if job is not None and job.status == SWAPPED:
            raise PreflightError(
                f"{table} is already partitioned: this conversion was swapped in already",
                fix="nothing to do; run catch-up/report, or unswap to roll back to the original table")
        raise PreflightError(f"{table} is already partitioned ({info.partition_key})",
                             fix="manage its partitions with the rotation DAG instead of converting it")
    col = info.column(spec.column)
    if col is None:
        raise PreflightError(
            f"column {spec.column!r} does not exist in {table}",
            fix="pass one of its timestamp/date columns: " + (", ".join(
                c.name for c in info.columns if ColumnKind.from_type(c.type)) or "(it has none)"))
    if ColumnKind.from_type(col.type) is None:
        raise PreflightError(
            f"column {spec.column!r} has type {col.type}; RANGE partitioning by time needs timestamp, "
            "timestamp with time zone or date",
            fix="choose a timestamp/timestamptz/date column")

    problems = _Problems([])
    warnings: list[str] = []
    persistence = conn.execute("SELECT relpersistence FROM pg_class WHERE oid = %s", (info.oid,)).fetchone()
    if persistence and persistence[0] == "u":
        problems.add(
            f"{table} is UNLOGGED: a partitioned table cannot be UNLOGGED, so the converted table would be "
            "LOGGED (every row written to WAL and replicated to standbys), unlike the original",
            f"choose: make it logged first (ALTER TABLE {_quote(conn, table)} SET LOGGED; rewrites the table into "
            "WAL) and convert that, or leave this table unconverted")
    if col.generated:
        problems.add(f"column {spec.column!r} is a generated column, which cannot be a partition key",
                     "partition on a stored timestamp column instead")
    pk = info.primary_key
    if pk is None:
        problems.add(
            f"{table} has no primary key; the fill copies in batches of primary-key ranges",
            f"add a primary key whose first column is an integer ({', '.join(INTEGER_KEY_TYPES)}), e.g. "
            f"ALTER TABLE {_quote(conn, table)} ADD COLUMN id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    else:
        first = info.column(pk.columns[0]) if pk.columns else None
        if first is None or first.type not in INTEGER_KEY_TYPES:
            problems.add(
                f"the primary key of {table} starts with {pk.columns[0] if pk.columns else 'an expression'!r} "
                f"of type {first.type if first else 'unknown'}; only integer keys can be copied in ranges",
                f"supported first key column types: {', '.join(INTEGER_KEY_TYPES)}; add an integer surrogate "
                "key or convert this table with another tool")
    if not col.not_null and not spec.default_partition:
        nulls = read_only(conn, sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(
            table.ident, sql.Identifier(spec.column)))[0]
        if nulls and nulls[0]:
            problems.add(
                f"{nulls[0]:,} rows have NULL in {spec.column!r}; a RANGE partition cannot hold them",
                f"give those rows a {spec.column} value, "
                "or pass default_partition=true so they land in the DEFAULT partition")
    if info.foreign_keys_in:
        listed = "; ".join(f"{fk.table}.{fk.name} ({fk.definition})" for fk in info.foreign_keys_in)
        problems.add(
            f"{len(info.foreign_keys_in)} foreign key(s) reference {table}: {listed}. A partitioned table "
            "cannot be referenced by its id alone (unique keys must include the partition column)",
            "options: (1) drop those foreign keys (ALTER TABLE <referencing> DROP CONSTRAINT <name>) and enforce "
            "the rule in the application or a trigger; (2) add the partition column to the referencing tables, "
            "convert with primary_key=composite, then reference (id, " + spec.column + ")")
    for idx in info.indexes:
        if idx.is_primary:
            continue
        if idx.is_unique and spec.column not in idx.columns:
            problems.add(
                f"unique index {idx.name} on {idx.columns or 'an expression'} does not include {spec.column!r}; "
                "on a partitioned table uniqueness can only be enforced with the partition column",
                f"add {spec.column} to the index (CREATE UNIQUE INDEX ... ({', '.join(idx.columns)}, "
                f"{spec.column})) and drop the old one, or make it a non-unique index")
    excl = conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = %s AND contype = 'x'",
                        (info.oid,)).fetchall()
    for (name,) in excl:
        problems.add(f"exclusion constraint {name} cannot be carried to a partitioned table (PostgreSQL < 17)",
                     "drop it, or enforce it per partition after the conversion")
    inh = conn.execute("SELECT count(*) FILTER (WHERE inhparent = %s), count(*) FILTER (WHERE inhrelid = %s) "
                       "FROM pg_inherits", (info.oid, info.oid)).fetchone()
    if inh and (inh[0] or inh[1]):
        problems.add(f"{table} takes part in table inheritance (legacy partitioning)",
                     "detach the inheritance children/parent first (ALTER TABLE ... NO INHERIT ...)")

    resuming = False
    if catalog.exists(conn, spec.intermediate):
        if job is None:
            problems.add(
                f"{spec.intermediate} exists but no conversion of {table} is recorded: a leftover of another "
                "tool or of an unrecorded attempt",
                f"inspect it and drop it (DROP TABLE {_quote(conn, spec.intermediate)}) if it is not needed")
        elif job.config != spec.config():
            problems.add(
                f"{spec.intermediate} was left by a different conversion (recorded options {job.config}, "
                f"asked {spec.config()})",
                "re-run with the recorded options to resume it, or run unprep for it (drops the intermediate "
                "table and its state) and start again")
        else:
            resuming = True
    if catalog.exists(conn, spec.retired):
        problems.add(f"{spec.retired} already exists (a retired table from an earlier conversion?)",
                     "archive and drop it, or rename it, before converting again")
    default_oid = catalog.table_oid(conn, spec.default_name)
    if spec.default_partition and default_oid is not None and not resuming:
        problems.add(f"{spec.default_name} already exists; the DEFAULT partition would need that name",
                     "rename or drop that table")
    problems.raise_if_any(table)

    warnings += _warnings(conn, info, spec)
    return info, warnings, resuming


def _warnings(conn: psycopg.Connection[Any], info: TableInfo, spec: ConvertSpec) -> list[str]:
    out: list[str] = []
    if not info.looks_append_only:
        out.append(
            f"{info.name} is not append-only (pg_stat_user_tables: {info.stats.get('n_tup_upd', 0):,} updates, "
            f"{info.stats.get('n_tup_del', 0):,} deletes since statistics were reset): rows updated or deleted "
            "after they were copied are not carried over by fill/catch-up alone; install change capture "
            "(pg_partition capture) or run in a quiet window")
    triggers = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal AND tgname NOT LIKE %s ORDER BY 1",
        (info.oid, CAPTURE_TRIGGER_PREFIX + "%"),
    ).fetchall()
    if triggers:
        out.append("triggers are not copied to the partitioned table: " + ", ".join(r[0] for r in triggers)
                   + "; recreate them on the new table after the swap")
    views = conn.execute(
        """SELECT DISTINCT format('%%I.%%I', vn.nspname, v.relname)
           FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
           JOIN pg_namespace vn ON vn.oid = v.relnamespace
           WHERE d.refobjid = %s AND d.classid = 'pg_rewrite'::regclass AND v.oid <> %s ORDER BY 1""",
        (info.oid, info.oid),
    ).fetchall()
    if views:
        out.append("views reference the table by identity and will keep reading the retired table after the "
                   "swap: " + ", ".join(r[0] for r in views) + "; recreate them after the swap")
    policies = conn.execute("SELECT count(*) FROM pg_policy WHERE polrelid = %s", (info.oid,)).fetchone()
    if policies and policies[0]:
        out.append("row-level security policies are not copied; recreate them on the new table")
    pk = info.primary_key
    if pk is not None:
        seq = info.sequences.get(pk.columns[0])
        if seq is None:
            out.append(f"{pk.columns[0]} is not fed by a sequence: catch-up can only find rows above the fill's "
                       "high-water mark; run catch_up(full=True) if the application inserts lower ids")
        else:
            cache = conn.execute("SELECT seqcache FROM pg_sequence WHERE seqrelid = %s::regclass",
                                 (_quote(conn, seq),)).fetchone()
            if cache and cache[0] > 1:
                out.append(f"sequence {seq} has CACHE {cache[0]}: sessions may insert ids below the fill's "
                           "high-water mark late; run catch_up(full=True) after the swap")
    return out


def replica_identity_notes(spec: ConvertSpec, publications: list[str]) -> list[str]:
    """How subscribers will identify rows of the new parent (issue 15, case 10), and what it costs."""
    if not publications:
        return []
    names = ", ".join(publications)
    if spec.primary_key == "composite":
        return [f"replica identity: {spec.table} is published ({names}); the new parent's primary key (its key "
                f"columns plus {spec.column}) is its replica identity, so subscribers keyed by the old key apply "
                "UPDATE/DELETE as before (no extra WAL)"]
    return [f"replica identity: {spec.table} is published ({names}) and the new parent will have no primary key "
            "(primary_key=per_partition), so UPDATE/DELETE would reach subscribers without a key and their apply "
            "would stop; the swap sets REPLICA IDENTITY FULL on the parent (every column is marked as key; the "
            "partitions keep logging only their primary key, so no extra WAL; a subscriber table without a "
            "primary key needs REPLICA IDENTITY FULL on the partitions too, which logs the whole old row of "
            "every UPDATE/DELETE). Alternative: primary_key=composite gives the parent a real key "
            f"(key columns + {spec.column})"]


def preflight(
    conn: psycopg.Connection[Any],
    spec: ConvertSpec,
    *,
    where: str | None = None,
    exact_below: int = 2_000_000,
    sample_rows: int = 200_000,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Refuse unsafe conversions (PreflightError) or report what the conversion faces.

    Rows per period are counted exactly for tables estimated below ``exact_below`` rows, and estimated from a
    block sample of about ``sample_rows`` rows above that (``rows_exact`` says which), so a preflight of a
    billion-row table stays a read of a few thousand pages.
    """
    info, warnings, resuming = check(conn, spec)
    where_sql = validate_where(conn, spec.table, where)
    col = info.column(spec.column)
    assert col is not None
    kind = ColumnKind.from_type(col.type)
    assert kind is not None
    c = sql.Identifier(spec.column)
    utc = {
        ColumnKind.TIMESTAMPTZ: sql.SQL("({} AT TIME ZONE 'UTC')").format(c),
        ColumnKind.TIMESTAMP: c,
        ColumnKind.DATE: sql.SQL("({}::timestamp)").format(c),
    }[kind]
    exact = info.row_estimate < exact_below
    pct = 100.0 if exact else max(min(100.0 * sample_rows / max(info.row_estimate, 1), 100.0), 0.01)
    sample = sql.SQL("") if exact else sql.SQL(" TABLESAMPLE SYSTEM ({}) REPEATABLE (42)").format(sql.Literal(pct))
    # A dry run validates the filter (parse, pg_proc, EXPLAIN) but executes nothing the user wrote.
    filt = sql.SQL(" WHERE {}").format(where_sql) if where_sql is not None and not dry_run else sql.SQL("")
    rows = read_only(conn, sql.SQL(
        "SELECT date_trunc({unit}, {utc})::date AS p, count(*) FROM {t}{sample}{filt} GROUP BY 1 ORDER BY 1"
    ).format(unit=sql.Literal(spec.period.value), utc=utc, t=spec.table.ident, sample=sample, filt=filt))
    scale = 100.0 / pct
    per_period = [{"period": str(p) if p is not None else None, "rows": round(n * scale)} for p, n in rows]
    total = sum(r["rows"] for r in per_period)
    pubs = conn.execute(
        """SELECT p.pubname, p.puballtables, p.pubviaroot FROM pg_publication p
           WHERE EXISTS (SELECT 1 FROM pg_publication_tables pt WHERE pt.pubname = p.pubname
                         AND pt.schemaname = %s AND pt.tablename = %s) ORDER BY 1""",
        (spec.table.schema, spec.table.name),
    ).fetchall()
    slots = catalog.replication_slots(conn)
    publications = [{"name": r[0], "all_tables": r[1], "publish_via_partition_root": r[2]} for r in pubs]
    for pub in publications:
        if not pub["publish_via_partition_root"]:
            warnings.append(f"publication {pub['name']} will be switched to publish_via_partition_root = true at "
                            "the swap so subscribers keep receiving one table")
    warnings += replica_identity_notes(spec, [p["name"] for p in publications])
    return {
        "table": str(spec.table),
        "column": spec.column,
        "column_type": col.type,
        "period": spec.period.value,
        "resuming": resuming,
        "rows": total if where_sql is None else info.row_estimate,
        "rows_matching_where": total if where_sql is not None and not dry_run else None,
        "rows_exact": exact,
        "row_estimate": info.row_estimate,
        "size": {"table": info.sizes.table, "indexes": info.sizes.indexes, "toast": info.sizes.toast,
                 "total": info.sizes.total},
        "rows_per_period": per_period,
        "null_rows": next((r["rows"] for r in per_period if r["period"] is None), 0),
        "append_only": info.looks_append_only,
        "stats": info.stats,
        "primary_key": list(info.primary_key.columns) if info.primary_key else None,
        "indexes": [i.name for i in info.indexes],
        "publications": publications,
        "replication_slots": [{k: v for k, v in s.items()} for s in slots],
        "warnings": warnings,
    }
