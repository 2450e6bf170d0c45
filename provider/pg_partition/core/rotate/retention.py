"""Retention: DETACH (CONCURRENTLY where possible, FINALIZE when interrupted), move to the archive schema, queue."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pg_partition.core.db import catalog, state
from pg_partition.core.db.capabilities import capabilities
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError, PartitionError
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import locks_table
from pg_partition.core.db.names import Period
from pg_partition.core.rotate.plan import PlannedDetach, RotationSpec, job_id, plan

log = logging.getLogger("pg_partition")



# --------------------------------------------------------------------------------------------------- retention


@dataclass
class DetachResult:
    detached: list[str] = field(default_factory=list)  # archive-schema names queued for archive
    finalized: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # why a plain DETACH was used
    pending_archive: int = 0  # rows 'pending' in archive_queue after this run
    statements: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@locks_table()  # the per-table lock, also for a direct caller of the engine
def detach_expired(ex: Executor, cfg: RotationSpec, today: date) -> DetachResult:
    """Detach partitions older than the retention window, finish interrupted detaches, queue them for archive."""
    conn = ex.conn
    the_plan = plan(conn, cfg, today)
    result = DetachResult()
    if the_plan.detach and not ex.dry_run:
        if not conn.autocommit:
            raise InvalidInputError(
                "DETACH PARTITION ... CONCURRENTLY needs an autocommit connection",
                fix="open the connection with autocommit=True (PartitionHook.open() does)")
        state.ensure_schema(conn)
        state.start_job(conn, job_id(the_plan.table), "rotate", str(the_plan.table), {"conn_id": cfg.conn_id})
    for item in the_plan.detach:
        if item.mode in ("concurrently", "plain"):
            _record(ex, the_plan.table, item, "detaching")
        if item.mode == "concurrently":
            _detach_concurrently(ex, cfg, the_plan.table, item, result)
        elif item.mode == "plain":
            result.fallbacks.append(f"{item.name}: {item.reason}")
            ex.logger.warning("detaching %s with a plain DETACH under lock_timeout=%s: %s",
                              item.name, cfg.lock_timeout, item.reason)
            _detach_plain(ex, cfg, the_plan.table, item.name)
        elif item.mode == "finalize":
            _finalize(ex, cfg, the_plan.table, item.name)
            result.finalized.append(str(item.name))
        if item.archive:
            queued = _archive(ex, cfg, the_plan.table, item)
            if queued:
                result.detached.append(queued)
    if not ex.dry_run and state.ready(conn):
        row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE status = 'pending'").format(state.QUEUE)).fetchone()
        result.pending_archive = int(row[0]) if row else 0
    result.statements = list(ex.statements)
    return result


def _record(ex: Executor, table: QualifiedName, item: PlannedDetach, status: str) -> None:
    if ex.dry_run:
        return
    rng = item.range
    state.put_checkpoint(ex.conn, job_id(table), "detach", {
        "status": status, "schema": item.name.schema,
        "from": rng.start.isoformat() if rng else None, "to": rng.end.isoformat() if rng else None,
    }, part=item.name.name)


def _detach_concurrently(ex: Executor, cfg: RotationSpec, parent: QualifiedName, item: PlannedDetach,
                         result: DetachResult) -> None:
    """``DETACH ... CONCURRENTLY`` with bounded retries; a try that stopped in phase 2 is completed by FINALIZE.

    Its waits (for SHARE UPDATE EXCLUSIVE, then for older transactions to finish) block no reader or writer, so
    they are bounded by ``detach_timeout``, not by the short ``lock_timeout`` used for blocking DDL.
    """

    def finalize_if_pending() -> bool:
        if not _is_detach_pending(ex.conn, parent, item.name):
            return False
        ex.logger.info("%s is detach pending after the interrupted attempt; completing it with FINALIZE", item.name)
        _finalize(ex, cfg, parent, item.name)
        result.finalized.append(str(item.name))
        return True

    try:
        ex.outside_transaction_with_lock_timeout(
            sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(parent.ident, item.name.ident),
            lock_timeout=cfg.detach_timeout, retries=cfg.lock_retries, what=f"DETACH CONCURRENTLY of {item.name}",
            after_timeout=finalize_if_pending, where=f"{cfg.conn_id}: {parent}",
            fix="a long transaction is still using the table (see pg_stat_activity); the next run retries, or "
            "raise detach_timeout")
    except psycopg.errors.ObjectNotInPrerequisiteState as exc:
        # A DEFAULT partition was added since the plan: say so and fall back.
        why = f"PostgreSQL refused DETACH CONCURRENTLY ({exc.diag.message_primary})"
        ex.logger.warning("falling back to a plain DETACH of %s: %s", item.name, why)
        result.fallbacks.append(f"{item.name}: {why}")
        _detach_plain(ex, cfg, parent, item.name)


def _is_detach_pending(conn: psycopg.Connection[Any], parent: QualifiedName, child: QualifiedName) -> bool:
    if not capabilities(conn).detach_concurrently:
        return False  # no DETACH CONCURRENTLY before 14, so nothing can be left pending
    row = conn.execute(
        "SELECT i.inhdetachpending FROM pg_inherits i WHERE i.inhrelid = to_regclass(%s) "
        "AND i.inhparent = to_regclass(%s)",
        (sql.Identifier(child.schema, child.name).as_string(conn), parent.ident.as_string(conn)),
    ).fetchone()
    return bool(row and row[0])


def _detach_plain(ex: Executor, cfg: RotationSpec, parent: QualifiedName, child: QualifiedName) -> None:
    ex.with_lock_timeout(
        lambda: ex.run(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent.ident, child.ident)),
        lock_timeout=cfg.lock_timeout, retries=cfg.lock_retries, what=f"detach partition {child}")


def _finalize(ex: Executor, cfg: RotationSpec, parent: QualifiedName, child: QualifiedName) -> None:
    ex.outside_transaction_with_lock_timeout(
        sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent.ident, child.ident),
        lock_timeout=cfg.detach_timeout, retries=cfg.lock_retries, what=f"DETACH FINALIZE of {child}",
        where=f"{cfg.conn_id}: {parent}",
        fix="a long transaction is still using the table (see pg_stat_activity); the next run retries")


def _archive(ex: Executor, cfg: RotationSpec, parent: QualifiedName, item: PlannedDetach) -> str | None:
    """Move a detached table to the archive schema and queue it, in one transaction. Idempotent."""
    target = QualifiedName(cfg.archive_schema, item.name.name)
    conn = ex.conn
    in_place = not ex.dry_run and catalog.exists(conn, item.name) and item.name.schema != cfg.archive_schema
    moved = not ex.dry_run and catalog.exists(conn, target)
    if not ex.dry_run and not in_place and not moved:
        ex.logger.warning("%s was detached but is gone (dropped by hand?); nothing to archive", item.name)
        _record(ex, parent, item, "queued")
        return None
    if in_place and moved:
        raise PartitionError(
            f"cannot move {item.name} to {cfg.archive_schema}: a table {target} already exists there",
            where=f"{cfg.conn_id}: {parent}",
            fix=f"archive or drop {target} first, or set archive_schema for this entry to another schema")
    rng = item.range
    label = rng.label(Period(cfg.period)) if rng else None

    def body() -> None:
        ex.run(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(cfg.archive_schema)))
        if in_place or ex.dry_run:
            ex.run(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(item.name.ident,
                                                                  sql.Identifier(cfg.archive_schema)))
        ex.run(sql.SQL(
            "INSERT INTO {} (schema_name, table_name, parent_schema, parent_table, "
            "range_from, range_to, period, label, status, archive) "
            "VALUES ({}, {}, {}, {}, {}, {}, {}, {}, 'pending', {}) "
            "ON CONFLICT (schema_name, table_name) DO NOTHING"
        ).format(state.QUEUE, *(sql.Literal(v) for v in (
            target.schema, target.name, parent.schema, parent.name,
            rng.start.isoformat() if rng else None, rng.end.isoformat() if rng else None,
            cfg.period, label)), sql.Literal(Jsonb(cfg.archive_row()))))
        _record(ex, parent, item, "queued")

    ex.with_lock_timeout(body, lock_timeout=cfg.lock_timeout, retries=cfg.lock_retries,
                         what=f"move {item.name} to {cfg.archive_schema}")
    ex.logger.info("%s %s to %s and queued it for archive", "would move" if ex.dry_run else "moved",
                   item.name, target)
    return str(target)
