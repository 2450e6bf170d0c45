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

from pg_partition.core.db.errors import StateError

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
    # 3: which DAG run is working on a table (runs of one DAG may overlap once max_active_runs > 1)
    """
    CREATE TABLE pgpartition.run_claims (
        table_name text PRIMARY KEY,
        run        text NOT NULL,
        claimed_at timestamptz NOT NULL DEFAULT now()
    );
    """,
]


_WRITE_PRIVILEGES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


def untrusted(conn: psycopg.Connection[Any]) -> list[str]:
    """Why the existing state schema cannot be trusted (empty when it is, or when it does not exist yet).

    Why this matters: the queue in this schema decides which tables are uploaded to which bucket and then
    dropped, and the jobs decide what a conversion builds on. A role that could create the schema first, or write
    to it, could have the owner's next archive run upload any table to its own bucket and drop it. So the schema
    and every relation in it must be owned by the role that runs the product, and no other role may create in
    the schema or write to its tables (superusers aside, who can do anything anyway)."""
    problems: list[str] = []
    row = conn.execute(
        """SELECT pg_get_userbyid(n.nspowner), n.nspowner = (SELECT oid FROM pg_roles WHERE rolname = current_user),
                  (SELECT string_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                   ELSE pg_get_userbyid(a.grantee) END, ', ')
                   FROM aclexplode(n.nspacl) a WHERE a.privilege_type = 'CREATE' AND a.grantee <> n.nspowner)
           FROM pg_namespace n WHERE n.nspname = %s""", (SCHEMA,)).fetchone()
    if row is None:
        return problems
    owner, mine, creators = row
    if not mine:
        problems.append(f"the state schema {SCHEMA} is owned by {owner}, not by the role running pg-partition")
    if creators:
        problems.append(f"role(s) {creators} may create objects in the state schema {SCHEMA}")
    for name, rel_owner, rel_mine, writers in conn.execute(
        """SELECT c.relname, pg_get_userbyid(c.relowner),
                  c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user),
                  (SELECT string_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                   ELSE pg_get_userbyid(a.grantee) END, ', ')
                   FROM aclexplode(c.relacl) a WHERE a.privilege_type = ANY(%s) AND a.grantee <> c.relowner)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'S') ORDER BY 1""",
            (list(_WRITE_PRIVILEGES), SCHEMA)).fetchall():
        if not rel_mine:
            problems.append(f"{SCHEMA}.{name} is owned by {rel_owner}, not by the role running pg-partition")
        if writers:
            problems.append(f"role(s) {writers} may write to {SCHEMA}.{name}")
    return problems


def check_trusted(conn: psycopg.Connection[Any]) -> None:
    """Refuse to use a state schema another role owns or can write (see :func:`untrusted`)."""
    problems = untrusted(conn)
    if problems:
        raise StateError(
            "refusing to use the state schema: " + "; ".join(problems), where=SCHEMA,
            fix=f"as a superuser, inspect {SCHEMA} (its jobs and archive_queue rows may have been forged), then "
            f"either DROP SCHEMA {SCHEMA} CASCADE so pg-partition recreates it, or ALTER SCHEMA {SCHEMA} OWNER TO "
            "<the role pg-partition connects as> plus the same for its tables, and REVOKE the extra privileges")


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create or upgrade the state schema. Safe to call concurrently from many tasks (advisory lock). Refuses a
    schema another role owns or can write (:func:`check_trusted`)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('pg_partition.state'))")
        check_trusted(conn)
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


# --- which run works on a table ---------------------------------------------------------------------------------


class RunSupersededError(StateError):
    """Another run has claimed the table since this run started; this run stops so two never interleave."""


def claim_run(conn: psycopg.Connection[Any], table: str, run: str) -> str | None:
    """Record that ``run`` (``dag_id/run_id``) now works on ``table``; returns the run it took over from, if any.

    Why: a task holds the per-table advisory lock only while it runs, so once ``max_active_runs`` > 1 two runs on
    one table could interleave their steps (run A's fill between run B's prep and B's plan). The first task that
    changes anything claims the table for its run; every later task of a run checks the claim
    (:func:`check_run`). The newest claim wins: a run left failed or abandoned never blocks the table, and an older
    run still going stops at its next task, naming the run that took over."""
    ensure_schema(conn)
    with conn.transaction():
        row = conn.execute(
            "SELECT run FROM pgpartition.run_claims WHERE table_name = %s FOR UPDATE", (table,)).fetchone()
        conn.execute(
            """INSERT INTO pgpartition.run_claims (table_name, run) VALUES (%s, %s)
               ON CONFLICT (table_name) DO UPDATE SET run = EXCLUDED.run, claimed_at = now()""", (table, run))
    previous = row[0] if row else None
    return previous if previous != run else None


def check_run(conn: psycopg.Connection[Any], table: str, run: str) -> None:
    """Raise :class:`RunSupersededError` when another run holds the table's claim (nothing claimed: no-op)."""
    if not ready(conn):
        return
    exists = conn.execute("SELECT to_regclass('pgpartition.run_claims') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return
    row = conn.execute("SELECT run, claimed_at::text FROM pgpartition.run_claims WHERE table_name = %s",
                       (table,)).fetchone()
    if row is not None and row[0] != run:
        raise RunSupersededError(
            f"run {row[0]} is working on {table} (claimed at {row[1]}); this run ({run}) stops so the two do not "
            "interleave their steps", where=table,
            fix="let that run finish; to continue with this one instead, trigger a new run (its first step claims "
            "the table and the other run stops at its next step)")
