"""Premake future partitions; rows in the DEFAULT partition that belong to a new range are moved into it."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import date
from functools import partial
from typing import Any, NoReturn

import psycopg
from psycopg import sql

from pg_partition.core.db import catalog, leaf
from pg_partition.core.db.capabilities import capabilities
from pg_partition.core.db.catalog import QualifiedName, TableInfo
from pg_partition.core.db.errors import PreflightError
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import locks_table
from pg_partition.core.db.names import Period, Range
from pg_partition.core.db.partitions import (
    bounds_condition,
    check_constraint_name,
    column_kind,
    copy_grants,
    create_partition,
    per_partition_key,
)
from pg_partition.core.rotate.plan import PlannedCreate, RotationSpec, count_default_rows, describe_managed, plan

log = logging.getLogger("pg_partition")



# --------------------------------------------------------------------------------------------------- premake


@dataclass
class PremakeResult:
    created: list[str] = field(default_factory=list)
    moved_rows: int = 0
    statements: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@locks_table()  # the per-table lock, also for a direct caller of the engine
def premake(ex: Executor, cfg: RotationSpec, today: date) -> PremakeResult:
    """Create the current and ``premake`` future partitions that are missing. Idempotent.

    Rows already in the DEFAULT partition for a range are moved into the new partition first (policy
    ``move_rows``); with another policy such a range is refused with a clear error and nothing changes. Each new
    partition gets the storage options and replica identity of the newest existing one (``LIKE`` copies
    neither, and PostgreSQL keeps them per leaf), so a table tuned at conversion stays tuned.
    """
    conn = ex.conn
    the_plan = plan(conn, cfg, today)
    result = PremakeResult()
    period = Period(cfg.period)
    for item in the_plan.create:
        info = describe_managed(conn, cfg)  # fresh: the previous iteration attached a partition
        pk = per_partition_key(conn, info)
        settings = leaf.newest_leaf(conn, info)  # fillfactor, autovacuum_*, replica identity of the newest one
        rows = count_default_rows(conn, info, cfg.column, item.range)
        if rows and cfg.default_partition != "move_rows":
            _refuse_default_rows(cfg, info, item, rows)
        if rows:
            result.moved_rows += move_default_rows_and_attach(ex, cfg, info, item.range, item.name, pk)
        else:
            try:
                create_partition(ex, info, cfg.column, item.range, period, name=item.name, primary_key=pk,
                                 lock_timeout=cfg.lock_timeout, retries=cfg.lock_retries)
            except psycopg.errors.CheckViolation:
                # A row for this range landed in the DEFAULT partition after we counted: move it and retry.
                if cfg.default_partition != "move_rows":
                    _refuse_default_rows(cfg, info, item, count_default_rows(conn, info, cfg.column, item.range))
                ex.logger.warning("rows for %s arrived in the DEFAULT partition meanwhile; moving them", item.name)
                result.moved_rows += move_default_rows_and_attach(ex, cfg, info, item.range, item.name, pk)
        if not settings.empty:  # storage options and replica identity live on leaves only
            ex.with_lock_timeout(partial(leaf.apply, ex, item.name, settings), lock_timeout=cfg.lock_timeout,
                                 retries=cfg.lock_retries, what=f"storage options of {item.name}")
        result.created.append(str(item.name))
        ex.logger.info("%s partition %s for [%s, %s)", "would create" if ex.dry_run else "created",
                       item.name, item.range.start, item.range.end)
    result.statements = list(ex.statements)
    return result


def _refuse_default_rows(cfg: RotationSpec, info: TableInfo, item: PlannedCreate, rows: int) -> NoReturn:
    raise PreflightError(
        f"{rows:,} rows in the DEFAULT partition {info.default_partition.name if info.default_partition else ''} "
        f"belong to [{item.range.start}, {item.range.end}), so {item.name} cannot be attached",
        where=f"{cfg.conn_id}: {info.name}",
        fix="set default_partition: move_rows for this entry to move them into the new partition, or move or "
        "delete them yourself")


def _insertable_columns(info: TableInfo) -> list[str]:
    return [c.name for c in info.columns if not c.generated]


def move_default_rows_and_attach(ex: Executor, cfg: RotationSpec, info: TableInfo, rng: Range,
                                 child: QualifiedName, primary_key: tuple[str, ...] | None) -> int:
    """Move the DEFAULT partition's rows of ``rng`` into a new partition ``child`` and attach it.

    Returns the number of rows moved. The move is one transaction (DELETE from the DEFAULT partition, ATTACH,
    re-INSERT through the parent), so a row is visible through the parent at every instant: a reader either
    waits for the lock or sees the row. Safe to rerun: a standalone table left by an interrupted run (or by an
    older version that committed batches into it) is attached with its rows by the same transaction.
    """
    default = info.default_partition
    assert default is not None
    where = f"{cfg.conn_id}: {info.name}"
    if info.foreign_keys_in:
        raise PreflightError(
            f"rows must move out of the DEFAULT partition but {info.name} is referenced by foreign keys "
            f"({', '.join(fk.name for fk in info.foreign_keys_in)}): deleting them from the DEFAULT partition "
            "would cascade or fail", where=where,
            fix="move the rows by hand (drop and re-create the foreign keys around it), or delete them")
    kind = column_kind(info, cfg.column)
    cond = bounds_condition(cfg.column, rng, kind)
    cols = sql.SQL(", ").join(map(sql.Identifier, _insertable_columns(info)))
    total = count_default_rows(ex.conn, info, cfg.column, rng)
    moved = 0

    # 1. The standalone table, with the CHECK that later lets ATTACH skip its scan (create_partition's DDL).
    if ex.dry_run or not catalog.exists(ex.conn, child):
        _create_standalone(ex, cfg, info, rng, child, primary_key)

    # 2. No committed batches: a row committed into a table that is not yet attached is invisible through the
    #    parent (readers miss it, application UPDATEs and DELETEs hit nothing), so every row moves in the one
    #    transaction below. Readers of the parent wait on its lock instead of seeing rows vanish.
    if total > cfg.batch_size:
        ex.logger.info("moving %d rows of %s in one transaction (readers of %s wait for it rather than miss rows)",
                       total, default.name, info.name)
        if info.publications:
            ex.logger.info("%s is published (%s): subscribers see the rows move in that one transaction",
                           info.name, ", ".join(info.publications))

    # 3. The locked sweep: every row of the range (and whatever arrived meanwhile) moves through a temporary table, the
    #    empty partition is attached, and the rows go back in through the parent, all in one transaction.
    overriding = sql.SQL(" OVERRIDING SYSTEM VALUE" if any(c.identity == "a" for c in info.columns) else "")
    counted: list[int] = []
    tmp = sql.Identifier("pg_temp", "pg_partition_move")

    def sweep() -> None:
        ex.run(sql.SQL("LOCK TABLE ONLY {} IN SHARE ROW EXCLUSIVE MODE").format(info.name.ident))
        ex.run(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(default.name.ident))
        ex.run(sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {}) ON COMMIT DROP").format(tmp, info.name.ident))
        cur = ex.run(sql.SQL(
            "WITH moved AS (DELETE FROM {d} WHERE {cond} RETURNING {cols}) "
            "INSERT INTO {tmp} ({cols}) SELECT {cols} FROM moved"
        ).format(d=default.name.ident, cond=cond, cols=cols, tmp=tmp))
        create_partition(ex, info, cfg.column, rng, Period(cfg.period), name=child, primary_key=primary_key,
                         lock_timeout=cfg.lock_timeout, retries=1)
        ex.run(sql.SQL("INSERT INTO {} ({}){} SELECT {} FROM {}").format(
            info.name.ident, cols, overriding, cols, tmp))
        counted.append(cur.rowcount if cur is not None else 0)

    ex.with_lock_timeout(sweep, lock_timeout=cfg.lock_timeout, retries=cfg.lock_retries,
                         what=f"move DEFAULT rows into {child} and attach it")
    moved += counted[-1] if counted else 0
    ex.logger.info("moved %d rows of [%s, %s) from %s into %s", moved, rng.start, rng.end, default.name, child)
    return moved


def _create_standalone(ex: Executor, cfg: RotationSpec, info: TableInfo, rng: Range, child: QualifiedName,
                       primary_key: tuple[str, ...] | None) -> None:
    """The same standalone table create_partition builds (LIKE + bounds CHECK + key + grants), not attached.

    ``LIKE`` takes only ACCESS SHARE on the parent, but even that must not queue behind a pending ACCESS
    EXCLUSIVE for long, hence lock_timeout here too.
    """
    column = cfg.column
    kind = column_kind(info, column)

    def body() -> None:
        ex.run(sql.SQL(
            "CREATE TABLE {child} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE "
            "{compression}INCLUDING GENERATED INCLUDING STATISTICS)"
        ).format(child=child.ident, parent=info.name.ident,
                 compression=capabilities(ex.conn).like_compression(ex.logger)))
        if info.tablespace:
            ex.run(sql.SQL("ALTER TABLE {} SET TABLESPACE {}").format(child.ident, sql.Identifier(info.tablespace)))
        ex.run(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(
            child.ident, sql.Identifier(check_constraint_name(child)), bounds_condition(column, rng, kind)))
        if primary_key:
            ex.run(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                child.ident, sql.SQL(", ").join(map(sql.Identifier, primary_key))))
        copy_grants(ex, info.grants, child)

    ex.with_lock_timeout(body, lock_timeout=cfg.lock_timeout, retries=cfg.lock_retries,
                         what=f"create {child} for rows of the DEFAULT partition")
