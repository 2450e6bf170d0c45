"""What the connected PostgreSQL server can do, decided once from ``server_version_num``.

Why one place: catalog columns, DDL grammar and features differ between 13 and 18 (``attcompression`` and
``DETACH ... CONCURRENTLY`` arrived in 14, publication row filters in 15, ``ANALYZE ONLY`` in 18). Code asks
``capabilities(conn).detach_concurrently`` instead of comparing version numbers inline, so the version rules are
read, tested and changed here alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from pg_partition.core.db.errors import PreflightError

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

    def require_supported(self) -> None:
        if not self.supported:
            raise PreflightError(
                f"PostgreSQL {self.major} is older than the oldest supported version (13)",
                fix="upgrade the server to PostgreSQL 13 or newer; declarative partitioning features this tool "
                "relies on (partitioned-table publications, DETACH/ATTACH semantics) arrived in 13",
            )


def capabilities(conn: psycopg.Connection[Any]) -> Capabilities:
    """The server's capabilities (psycopg caches ``server_version`` on the connection: no query)."""
    return Capabilities(int(conn.info.server_version))
