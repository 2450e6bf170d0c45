"""What the connected PostgreSQL server can do, decided once from ``server_version_num``.

Why one place: catalog columns, DDL grammar and features differ between 13 and 18 (``attcompression`` and
``DETACH ... CONCURRENTLY`` arrived in 14, publication row filters in 15, ``ANALYZE ONLY`` in 18). Code asks
``capabilities(conn).detach_concurrently`` instead of comparing version numbers inline, so the version rules are
read, tested and changed here alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.db.errors import PreflightError

log = logging.getLogger("pg_partition")

OLDEST_SUPPORTED = 130000


@dataclass(frozen=True)
class Capabilities:
    """Features of one server version (``version_num`` as in ``SHOW server_version_num``, e.g. 150004)."""

    version_num: int

    @property
    def major(self) -> int:
        return self.version_num // 10000

    @property
    def supported(self) -> bool:
        return self.version_num >= OLDEST_SUPPORTED

    @property
    def column_compression(self) -> bool:
        """``pg_attribute.attcompression`` and ``LIKE ... INCLUDING COMPRESSION`` (14+)."""
        return self.version_num >= 140000

    @property
    def detach_concurrently(self) -> bool:
        """``ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY`` / ``FINALIZE`` and ``inhdetachpending`` (14+)."""
        return self.version_num >= 140000

    @property
    def publication_row_filters(self) -> bool:
        """``pg_publication_rel.prqual`` / ``prattrs``: row filters and column lists (15+)."""
        return self.version_num >= 150000

    @property
    def analyze_only(self) -> bool:
        """``ANALYZE ONLY parent`` (18+): statistics of the parent without recursing into partitions."""
        return self.version_num >= 180000

    @property
    def detach_pending_column(self) -> sql.Composable:
        """``pg_inherits.inhdetachpending`` where it exists (14+), else ``false``: no detach can be pending on 13."""
        return sql.SQL("i.inhdetachpending" if self.detach_concurrently else "false")

    @property
    def compression_column(self) -> sql.Composable:
        """``pg_attribute.attcompression`` where it exists (14+), else NULL (13 compresses with pglz only)."""
        return sql.SQL("a.attcompression" if self.column_compression else 'NULL::"char"')

    def like_compression(self, logger: logging.Logger | None = None) -> sql.Composable:
        """``INCLUDING COMPRESSION `` for ``CREATE TABLE ... (LIKE ...)`` on 14+; nothing on 13, where the clause
        does not parse and there is no per-column compression to copy (the fallback is logged)."""
        if self.column_compression:
            return sql.SQL("INCLUDING COMPRESSION ")
        (logger or log).info("PostgreSQL %s: LIKE without INCLUDING COMPRESSION (per-column compression is 14+)",
                             self.major)
        return sql.SQL("")

    def require_supported(self, feature: str = "pg-partition") -> None:
        """Refuse a server older than 13 before anything is changed: the version, what is missing, what to do."""
        if not self.supported:
            raise PreflightError(
                f"PostgreSQL {self.major} is older than the oldest version {feature} supports (13): it lacks what "
                "conversion and rotation rely on (BEFORE row triggers on partitioned tables for change capture, "
                "publish_via_partition_root, the 13 catalog)",
                where=f"server version {self.version_num}",
                fix="upgrade the server to PostgreSQL 13 or newer (pg_upgrade or your cloud's major version "
                "upgrade); until then partition this server's tables by hand or with pg_partman",
            )


def capabilities(conn: psycopg.Connection[Any]) -> Capabilities:
    """The server's capabilities (psycopg caches ``server_version`` on the connection: no query)."""
    return Capabilities(int(conn.info.server_version))


# --- least privilege ---------------------------------------------------------------------------------------------


def missing_privileges(conn: psycopg.Connection[Any], *, table_schema: str, table: str | None = None,
                       schemas: tuple[str, ...] = ("pgpartition",)) -> list[str]:
    """The GRANTs (or ownership changes) the connected role lacks for a run, as statements a DBA can paste.

    Why up front: on a managed service (RDS, Aurora, Cloud SQL) the role is an owner with ``pg_monitor``, never a
    superuser; a privilege error halfway through a conversion leaves work to clean up, one before it costs
    nothing. Checked: ownership of ``table`` (triggers, renames and DDL need it), CREATE on its schema (the new
    table and partitions go there), and for each of ``schemas`` (the state schema, the archive schema) CREATE on
    the database if it does not exist yet, else USAGE and CREATE on it.
    """
    row = conn.execute("SELECT current_user, current_database(), rolsuper FROM pg_roles WHERE rolname = current_user"
                       ).fetchone()
    assert row is not None
    role, database, superuser = str(row[0]), str(row[1]), bool(row[2])
    if superuser:
        return []
    ident = sql.Identifier(role).as_string(conn)
    needed: list[str] = []
    if table is not None:
        owner = conn.execute(
            "SELECT pg_get_userbyid(c.relowner), pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (table_schema, table)).fetchone()
        if owner is not None and not owner[1]:
            needed.append(f"GRANT {sql.Identifier(str(owner[0])).as_string(conn)} TO {ident};  -- "
                          f"or ALTER TABLE {sql.Identifier(table_schema, table).as_string(conn)} OWNER TO {ident}")
    if not _true(conn, "SELECT has_schema_privilege(%s, 'USAGE, CREATE')", table_schema):
        needed.append(f"GRANT USAGE, CREATE ON SCHEMA {sql.Identifier(table_schema).as_string(conn)} TO {ident};")
    for schema in schemas:
        if not _true(conn, "SELECT to_regnamespace(%s) IS NOT NULL", sql.Identifier(schema).as_string(conn)):
            if not _true(conn, "SELECT has_database_privilege(current_database(), 'CREATE')"):
                grant = f"GRANT CREATE ON DATABASE {sql.Identifier(database).as_string(conn)} TO {ident};"
                if grant not in needed:
                    needed.append(grant)
        elif not _true(conn, "SELECT has_schema_privilege(%s, 'USAGE, CREATE')", schema):
            needed.append(f"GRANT USAGE, CREATE ON SCHEMA {sql.Identifier(schema).as_string(conn)} TO {ident};")
    return needed


def _true(conn: psycopg.Connection[Any], query: str, *params: str) -> bool:
    row = conn.execute(query, params or None).fetchone()
    return bool(row and row[0])


def require_privileges(conn: psycopg.Connection[Any], what: str, **kwargs: Any) -> None:
    """:func:`missing_privileges`, raised as one preflight error listing every GRANT (nothing changed yet)."""
    needed = missing_privileges(conn, **kwargs)
    if needed:
        raise PreflightError(
            f"the role lacks privileges {what} needs (it runs as an owner with pg_monitor, never as superuser)",
            where="privileges",
            fix="have an administrator run:\n  " + "\n  ".join(needed),
        )

