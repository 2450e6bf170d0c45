"""Shared setup for the archive tests: a partitioned ``activities`` table, one month detached and queued.

This is what rotation leaves behind (a detached partition in an archive schema plus a pending queue row); it is
built here with plain SQL and the engine's own ``create_partition`` so the archive tests do not depend on the
rotation code that another change builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core import archive
from pg_partition.core.db import partitions
from pg_partition.core.db.catalog import QualifiedName, describe
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.names import Period, covering
from tools.seed import seed_activities

PARENT = QualifiedName("public", "activities")
ARCHIVE_SCHEMA = "pgpartition_archive"
DETACHED = QualifiedName(ARCHIVE_SCHEMA, "activities_202401")


def row_hash(conn: psycopg.Connection[Any], table: QualifiedName | str) -> str | None:
    """Order-independent of physical layout, exact to the row: md5 over every row's text, ordered by id."""
    name = QualifiedName.parse(table) if isinstance(table, str) else table
    return conn.execute(sql.SQL("SELECT md5(string_agg(md5(t::text), '' ORDER BY id)) FROM {} t").format(
        name.ident)).fetchone()[0]


def count(conn: psycopg.Connection[Any], table: QualifiedName) -> int:
    return int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()[0])


@dataclass
class Setup:
    queue_id: int
    hash: str
    rows: int
    parent_hash: str


def partitioned_activities(conn: psycopg.Connection[Any], *, rows: int = 12_000, policy: dict[str, Any],
                           detach: bool = True) -> Setup:
    """``public.activities`` partitioned by month (Dec 2023 .. Apr 2024), PK (id, created_at), January detached
    into ``pgpartition_archive`` and queued for archiving with ``policy``."""
    src = seed_activities(conn, "public.activities_src", rows=rows, months=3, end=datetime(2024, 4, 1),
                          timestamptz=True, indexes=False)
    conn.execute("""CREATE TABLE public.activities (LIKE public.activities_src INCLUDING DEFAULTS)
                    PARTITION BY RANGE (created_at)""")
    conn.execute("ALTER TABLE public.activities ADD PRIMARY KEY (id, created_at)")
    conn.execute("CREATE INDEX ON public.activities (created_at)")
    conn.execute("CREATE INDEX ON public.activities (owner_type, owner_id)")
    parent = describe(conn, PARENT)
    ex = Executor(conn)
    for rng in covering(datetime(2023, 12, 1), datetime(2024, 4, 1), Period.MONTH):
        partitions.create_partition(ex, parent, "created_at", rng, Period.MONTH)
    conn.execute("INSERT INTO public.activities SELECT * FROM public.activities_src")
    conn.execute("ALTER SEQUENCE public.activities_src_id_seq OWNED BY public.activities.id")
    conn.execute(sql.SQL("DROP TABLE {}").format(src.ident))
    conn.execute("ANALYZE public.activities")
    parent_hash = row_hash(conn, PARENT)
    part = PARENT.sibling("activities_202401")
    setup_hash = row_hash(conn, part)
    n = count(conn, part)
    assert n > 1000
    queue_id = 0
    if detach:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ARCHIVE_SCHEMA}")
        conn.execute("ALTER TABLE public.activities DETACH PARTITION public.activities_202401")
        conn.execute(f"ALTER TABLE public.activities_202401 SET SCHEMA {ARCHIVE_SCHEMA}")
        queue_id = archive.enqueue(conn, DETACHED, parent=PARENT, range_from="2024-01-01",
                                   range_to="2024-02-01", period="month", policy=policy)
    assert setup_hash is not None and parent_hash is not None
    return Setup(queue_id, setup_hash, n, parent_hash)


def queue(conn: psycopg.Connection[Any], queue_id: int) -> archive.QueueRow:
    return archive.queue_row(conn, queue_id)


def open_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) or [])


def catalog_snapshot(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Every user relation with its kind, partition bound, comment and constraints: 'nothing changed' checks."""
    return conn.execute(
        """SELECT n.nspname, c.relname, c.relkind, pg_get_expr(c.relpartbound, c.oid),
                  obj_description(c.oid, 'pg_class'),
                  (SELECT array_agg(conname ORDER BY conname) FROM pg_constraint WHERE conrelid = c.oid)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
           ORDER BY 1, 2""").fetchall()
