"""The small state schema that makes every step resumable on any worker.

Why in the target database: a retried task may run on another Celery worker or Kubernetes pod, so progress
cannot live in local files; and keeping it next to the data means a checkpoint commits in the same transaction
as the batch it describes, so a killed worker never leaves the two disagreeing.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

SCHEMA = "pgpartition"  # not "pg_partition": PostgreSQL reserves the "pg_" prefix for system schemas

# Append-only list of migrations; each runs once, in order, recorded in pgpartition.migrations.
MIGRATIONS: list[str] = [
    # 1: jobs and checkpoints (conversion, rotation and archive steps all record progress here)
    """
    CREATE TABLE pgpartition.jobs (
        job_id     text PRIMARY KEY,
        kind       text NOT NULL,
        target     text NOT NULL,
        config     jsonb NOT NULL DEFAULT '{}',
        status     text NOT NULL DEFAULT 'running',
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE pgpartition.checkpoints (
        job_id     text NOT NULL REFERENCES pgpartition.jobs ON DELETE CASCADE,
        step       text NOT NULL,
        part       text NOT NULL DEFAULT '',
        value      jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (job_id, step, part)
    );
    """,
    # 2: tables waiting to be archived (detached partitions, retired tables) and what happened to them
    """
    CREATE TABLE pgpartition.archive_queue (
        id            bigserial PRIMARY KEY,
        schema_name   text NOT NULL,
        table_name    text NOT NULL,
        parent_schema text,
        parent_table  text,
        range_from    text,
        range_to      text,
        period        text,
        label         text,
        status        text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'uploading', 'uploaded', 'verified', 'dropped', 'kept',
                                        'failed', 'restored')),
        attempts      integer NOT NULL DEFAULT 0,
        last_error    text,
        archive       jsonb NOT NULL DEFAULT '{}',
        created_at    timestamptz NOT NULL DEFAULT now(),
        updated_at    timestamptz NOT NULL DEFAULT now(),
        UNIQUE (schema_name, table_name)
    );
    """,
]


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create or upgrade the state schema. Safe to call concurrently from many tasks (advisory lock)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('pg_partition.state'))")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS pgpartition.migrations "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {r[0] for r in conn.execute("SELECT version FROM pgpartition.migrations")}
        for version, ddl in enumerate(MIGRATIONS, start=1):
            if version not in applied:
                conn.execute(ddl)
                conn.execute("INSERT INTO pgpartition.migrations (version) VALUES (%s)", (version,))


def start_job(conn: psycopg.Connection[Any], job_id: str, kind: str, target: str,
              config: dict[str, Any]) -> dict[str, Any]:
    """Record a job, or return the existing one's config (a retried task must continue the same job)."""
    ensure_schema(conn)
    row = conn.execute(
        """INSERT INTO pgpartition.jobs (job_id, kind, target, config) VALUES (%s, %s, %s, %s)
           ON CONFLICT (job_id) DO UPDATE SET updated_at = now() RETURNING config""",
        (job_id, kind, target, Jsonb(config)),
    ).fetchone()
    assert row is not None
    return dict(row[0])


def set_status(conn: psycopg.Connection[Any], job_id: str, status: str) -> None:
    conn.execute("UPDATE pgpartition.jobs SET status = %s, updated_at = now() WHERE job_id = %s",
                 (status, job_id))


def get_checkpoint(conn: psycopg.Connection[Any], job_id: str, step: str, part: str = "") -> Any:
    row = conn.execute(
        "SELECT value FROM pgpartition.checkpoints WHERE job_id = %s AND step = %s AND part = %s",
        (job_id, step, part),
    ).fetchone()
    return None if row is None else row[0]


def put_checkpoint(conn: psycopg.Connection[Any], job_id: str, step: str, value: Any, part: str = "") -> None:
    """Upsert a checkpoint. Call it inside the transaction of the work it records."""
    conn.execute(
        """INSERT INTO pgpartition.checkpoints (job_id, step, part, value) VALUES (%s, %s, %s, %s)
           ON CONFLICT (job_id, step, part) DO UPDATE SET value = excluded.value, updated_at = now()""",
        (job_id, step, part, Jsonb(value)),
    )


def checkpoints(conn: psycopg.Connection[Any], job_id: str, step: str) -> dict[str, Any]:
    rows = conn.execute(
        "SELECT part, value FROM pgpartition.checkpoints WHERE job_id = %s AND step = %s", (job_id, step)
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


QUEUE = sql.Identifier(SCHEMA, "archive_queue")


def ready(conn: psycopg.Connection[Any]) -> bool:
    """Whether the state schema exists with all its tables (read-only: preflight must not create it)."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
                       (sql.Identifier(SCHEMA, "checkpoints").as_string(conn), QUEUE.as_string(conn))).fetchone()
    return bool(row and row[0])
