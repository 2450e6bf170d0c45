"""What this server version can do, asked of the server itself (not of a table in our code): each probe runs the
statement as the non-superuser owner in a scratch database and records whether the server accepted it. The
expected answers are the documented version rules; a probe that disagrees fails the test, and the recorded answers
feed the README support table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.support import matrix

Probe = Callable[[psycopg.Connection[Any]], object]


def _setup(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE probe_src (id bigint PRIMARY KEY, body text COMPRESSION pglz)"
                 if _major(conn) >= 14 else "CREATE TABLE probe_src (id bigint PRIMARY KEY, body text)")
    conn.execute("CREATE TABLE probe_parent (id bigint NOT NULL, at date NOT NULL) PARTITION BY RANGE (at)")
    conn.execute("CREATE TABLE probe_p1 PARTITION OF probe_parent FOR VALUES FROM ('2024-01-01') TO ('2024-02-01')")
    conn.execute("CREATE TABLE probe_p2 PARTITION OF probe_parent FOR VALUES FROM ('2024-02-01') TO ('2024-03-01')")


def _major(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()
    assert row is not None
    return int(row[0])


# feature label -> (first major that has it, the statement that uses it)
PROBES: dict[str, tuple[int, str]] = {
    "pg_attribute.attcompression": (14, "SELECT attcompression FROM pg_attribute LIMIT 1"),
    "LIKE ... INCLUDING COMPRESSION": (14, "CREATE TABLE probe_like (LIKE probe_src INCLUDING COMPRESSION)"),
    "pg_inherits.inhdetachpending": (14, "SELECT inhdetachpending FROM pg_inherits LIMIT 1"),
    "DETACH PARTITION ... CONCURRENTLY": (14, "ALTER TABLE probe_parent DETACH PARTITION probe_p1 CONCURRENTLY"),
    "publication row filter (prqual)": (15, "CREATE PUBLICATION probe_rows FOR TABLE probe_src WHERE (id > 0)"),
    "publication column list (prattrs)": (15, "CREATE PUBLICATION probe_cols FOR TABLE probe_src (id)"),
    "ANALYZE ONLY": (18, "ANALYZE ONLY probe_parent"),
}


@pytest.mark.parametrize("feature", list(PROBES))
def test_server_feature_matches_the_version_rule(owner_db, owner_conn, cluster, feature: str) -> None:
    since, statement = PROBES[feature]
    _setup(owner_conn)
    major = _major(owner_conn)
    assert major == cluster.primary.major
    version = owner_conn.execute("SELECT split_part(current_setting('server_version'), ' ', 1)").fetchone()
    assert version is not None
    matrix.record(major, "server", "version", version[0])
    try:
        owner_conn.execute(statement)
        works, why = True, ""
    except psycopg.Error as exc:
        works, why = False, f"{type(exc).__name__}: {exc.diag.message_primary}"
    matrix.record(major, "features", feature, {"works": works, "why": why})
    assert works == (major >= since), f"{feature} on PostgreSQL {version[0]}: server says {why or 'ok'}"
