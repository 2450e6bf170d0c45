"""Rotation of a partitioned table: premake future partitions, keep the DEFAULT partition empty, detach old ones.

One call of each function handles one table in one database (one config entry); the DAG maps over the fleet.
Everything here is idempotent and resumable: a killed run leaves the catalog in a state the next run recognises
(a standalone table not yet attached, a partition "detach pending", a detached table not yet queued), and the
intent of every detach is recorded in the state schema's ``checkpoints`` before it starts.

Choices, and why:

* **Premake** goes through :func:`pg_partition.core.partitions.create_partition` (standalone CREATE + CHECK +
  ``ATTACH PARTITION`` under ``lock_timeout``): SHARE UPDATE EXCLUSIVE on the parent, never ACCESS EXCLUSIVE.
  The per-partition primary key of a pgslice-style layout and the parent's grants are carried over; indexes come
  from the parent's partitioned indexes, which PostgreSQL attaches automatically.
* **Rows in the DEFAULT partition** that belong to a range being created make its ATTACH fail (pg_partman's most
  reported problem), so they are moved first. The final step is one short transaction under ``lock_timeout``
  with retries: ``LOCK TABLE ONLY parent IN SHARE ROW EXCLUSIVE MODE`` (readers go on; inserts through the
  parent wait), ACCESS EXCLUSIVE on the DEFAULT partition (which ATTACH takes anyway, to scan it), then what is
  left of the range moves into a temporary table, the empty new partition is attached and the rows are
  re-inserted through the parent. Readers and logical-replication subscribers see the rows move atomically, and
  no insert can slip into the DEFAULT partition between the sweep and the ATTACH. Why the parent lock: without
  it, an insert that routed its row to the DEFAULT partition just before the ATTACH commits (and then waited for
  the DEFAULT's lock) fails with "violates partition constraint"; with it, inserts pause for the few
  milliseconds of the final step and then route to the new partition. (That step scans the DEFAULT partition,
  so it is short only while the DEFAULT stays small, which the health check enforces.)
  When more than ``batch_size`` rows must move (and the table is not published) they are first moved in
  committed batches straight into the standalone new table, to keep the locked step short; those rows are
  invisible through the parent until the ATTACH a few statements later (the trade-off against holding the
  locks for the whole move). Tables referenced by foreign keys are refused: deleting rows from the DEFAULT
  partition would cascade or fail.
* **Retention** detaches partitions wholly older than the window with ``DETACH PARTITION ... CONCURRENTLY``
  (PostgreSQL 14+, outside any transaction), which never blocks readers or writers. PostgreSQL refuses it when a
  DEFAULT partition exists; then, and on PostgreSQL 13, a plain ``DETACH`` runs under ``lock_timeout`` with
  retries, and the log says so. A concurrent detach interrupted in its second phase leaves the partition "detach
  pending"; the next run completes it with ``FINALIZE``. The detached table is moved to the archive schema and a
  ``pending`` row is inserted in the state schema's ``archive_queue`` in one transaction.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any, Literal, NoReturn

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pg_partition.config import TableConfig
from pg_partition.core import catalog, state
from pg_partition.core.catalog import Partition, QualifiedName, TableInfo
from pg_partition.core.errors import InvalidInputError, PartitionError, PreflightError
from pg_partition.core.execute import Executor, Progress
from pg_partition.core.names import Period, Range, floor, partition_name, ranges, shift
from pg_partition.core.partitions import (
    bounds_condition,
    check_constraint_name,
    column_kind,
    copy_grants,
    create_partition,
    partition_column,
    per_partition_key,
)

log = logging.getLogger("pg_partition")

DetachMode = Literal["concurrently", "plain", "finalize", "finish"]
DEFAULT_ROWS_SCAN_LIMIT = 1_000_000
QUEUE = sql.Identifier(state.SCHEMA, "archive_queue")


# ------------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class PlannedCreate:
    name: QualifiedName
    range: Range
    default_rows: int  # rows now in the DEFAULT partition that belong to this range (moved first)


@dataclass(frozen=True)
class PlannedDetach:
    name: QualifiedName
    range: Range | None
    mode: DetachMode
    reason: str
    archive: bool = True  # move to the archive schema and queue it (False: someone else's pending detach)


@dataclass
class Plan:
    """What a rotation of one table would do. ``lines()`` is the dry-run listing."""

    conn_id: str
    table: QualifiedName
    today: date
    create: list[PlannedCreate] = field(default_factory=list)
    detach: list[PlannedDetach] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rows_to_move(self) -> int:
        return sum(c.default_rows for c in self.create)

    def lines(self) -> list[str]:
        out = [f"rotation plan for {self.table} on {self.conn_id} (today {self.today}):"]
        for c in self.create:
            move = f", first moving {c.default_rows:,} rows out of the DEFAULT partition" if c.default_rows else ""
            out.append(f"  create {c.name} for [{c.range.start}, {c.range.end}){move}")
        for d in self.detach:
            rng = f" [{d.range.start}, {d.range.end})" if d.range else ""
            out.append(f"  detach {d.name}{rng} ({d.mode}: {d.reason})")
        out += [f"  note: {n}" for n in self.notes]
        if not self.create and not self.detach:
            out.append("  nothing to do")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id, "table": str(self.table), "today": self.today.isoformat(),
            "create": [{"name": str(c.name), "from": c.range.start.isoformat(), "to": c.range.end.isoformat(),
                        "default_rows": c.default_rows} for c in self.create],
            "detach": [{"name": str(d.name), "mode": d.mode, "reason": d.reason,
                        "from": d.range.start.isoformat() if d.range else None,
                        "to": d.range.end.isoformat() if d.range else None} for d in self.detach],
            "rows_to_move": self.rows_to_move,
            "notes": list(self.notes),
        }


def job_id(table: QualifiedName) -> str:
    """The state-schema job of a table's rotation (state lives in the table's own database)."""
    return f"rotate:{table}"


def describe_managed(conn: psycopg.Connection[Any], cfg: TableConfig) -> TableInfo:
    """The table, checked to be what the config says: RANGE partitioned on ``cfg.column`` of a time type."""
    name = cfg.qualified
    info = catalog.describe(conn, name)
    where = f"{cfg.conn_id}: {name}"
    if not info.is_partitioned:
        raise PreflightError(
            f"{name} is not a partitioned table", where=where,
            fix="convert it first with the pg_partition_convert DAG, or remove it from the config")
    key = partition_column(info)
    if key != cfg.column:
        raise InvalidInputError(
            f"{name} is partitioned on {key!r} but the config says column: {cfg.column!r}", where=where,
            fix=f"set column: {key} for this entry in the config")
    column_kind(info, cfg.column)
    return info


def desired_ranges(cfg: TableConfig, today: date) -> list[Range]:
    """The current period's range and ``premake`` future ones."""
    period = Period(cfg.period)
    return ranges(floor(today, period), period, cfg.premake + 1)


def retention_cutoff(cfg: TableConfig, today: date) -> date | None:
    """Partitions ending on or before this day are detached: the current period plus ``retention`` full ones
    before it are kept (retention 24 on 2025-06-15, monthly: everything before 2023-06-01 goes)."""
    if cfg.retention is None:
        return None
    period = Period(cfg.period)
    return shift(floor(today, period), period, -cfg.retention)


def _covered(rng: Range, parts: list[Partition], where: str) -> bool:
    """True if attached partitions cover ``rng`` entirely; error if they cover part of it (period mismatch)."""
    overlapping = sorted(
        (p for p in parts if not p.is_default and p.start_day < rng.end and p.end_day > rng.start),
        key=lambda p: p.start_day)
    if not overlapping:
        return False
    cursor = rng.start
    for p in overlapping:
        if p.start_day > cursor:
            break
        cursor = max(cursor, p.end_day)
    if cursor >= rng.end:
        return True
    names = ", ".join(str(p.name) for p in overlapping)
    raise PreflightError(
        f"the range [{rng.start}, {rng.end}) overlaps existing partitions ({names}) without being covered by them",
        where=where,
        fix="the config's period probably differs from the table's partitions: set period to the one the "
        "existing partitions use")


def count_default_rows(conn: psycopg.Connection[Any], info: TableInfo, column: str, rng: Range,
                       limit: int | None = None) -> int:
    """Rows of the DEFAULT partition inside ``rng`` (``limit`` caps the scan for health checks)."""
    default = info.default_partition
    if default is None:
        return 0
    cond = bounds_condition(column, rng, column_kind(info, column))
    inner = sql.SQL("SELECT 1 FROM {} WHERE {}").format(default.name.ident, cond)
    if limit is not None:
        inner = sql.SQL("{} LIMIT {}").format(inner, sql.Literal(limit))
    row = conn.execute(sql.SQL("SELECT count(*) FROM ({}) s").format(inner)).fetchone()
    return int(row[0]) if row else 0


def state_ready(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                       (sql.Identifier(state.SCHEMA, "archive_queue").as_string(conn),)).fetchone()
    return bool(row and row[0])


def unfinished_detaches(conn: psycopg.Connection[Any], table: QualifiedName) -> dict[str, dict[str, Any]]:
    """Detaches whose intent was recorded but whose table is not yet queued for archive."""
    if not state_ready(conn):
        return {}
    return {k: v for k, v in state.checkpoints(conn, job_id(table), "detach").items()
            if v.get("status") != "queued"}


def queue_status(conn: psycopg.Connection[Any], schema: str, name: str) -> str | None:
    if not state_ready(conn):
        return None
    row = conn.execute(sql.SQL("SELECT status FROM {} WHERE schema_name = %s AND table_name = %s").format(
        QUEUE), (schema, name)).fetchone()
    return None if row is None else str(row[0])


def concurrent_detach_possible(server_version: int, has_default: bool) -> tuple[bool, str]:
    """Whether ``DETACH ... CONCURRENTLY`` can run, and why not."""
    if server_version < 140000:
        return False, f"PostgreSQL {server_version // 10000} has no DETACH CONCURRENTLY (14+)"
    if has_default:
        return False, "PostgreSQL refuses DETACH CONCURRENTLY when the table has a DEFAULT partition"
    return True, "no DEFAULT partition, PostgreSQL 14+"


def plan(conn: psycopg.Connection[Any], cfg: TableConfig, today: date) -> Plan:
    """Read-only: what premake and retention would create, move and detach today."""
    info = describe_managed(conn, cfg)
    where = f"{cfg.conn_id}: {info.name}"
    period = Period(cfg.period)
    result = Plan(cfg.conn_id, info.name, today)
    attached = [p for p in info.partitions if not p.detach_pending]

    for rng in desired_ranges(cfg, today):
        if _covered(rng, attached, where):
            continue
        name = info.name.sibling(partition_name(info.name.name, rng.start, period))
        rows = count_default_rows(conn, info, cfg.column, rng)
        result.create.append(PlannedCreate(name, rng, rows))
    if result.rows_to_move and cfg.default_partition != "move_rows":
        result.notes.append(
            f"{result.rows_to_move:,} rows in the DEFAULT partition belong to partitions to create, and "
            f"default_partition is {cfg.default_partition!r}: premake will refuse until they are moved")

    unfinished = unfinished_detaches(conn, info.name)
    for p in info.partitions:
        if p.detach_pending:
            ours = p.name.name in unfinished or _older(p, retention_cutoff(cfg, today))
            result.detach.append(PlannedDetach(
                p.name, _range(p), "finalize",
                "an earlier DETACH ... CONCURRENTLY was interrupted; complete it", archive=ours))

    cutoff = retention_cutoff(cfg, today)
    if cutoff is not None:
        ok, why = concurrent_detach_possible(catalog.server_version_num(conn), info.default_partition is not None)
        for p in attached:
            if p.is_default or not _older(p, cutoff):
                continue
            status = queue_status(conn, cfg.archive_schema, p.name.name)
            if status == "restored":
                result.notes.append(f"{p.name} is older than the retention window but was restored from the "
                                    "archive on request; it is left attached")
                continue
            mode: DetachMode = "concurrently" if ok else "plain"
            reason = f"ends {p.end_day}, on or before the retention cutoff {cutoff}; " + (
                why if ok else f"falling back to plain DETACH under lock_timeout: {why}")
            result.detach.append(PlannedDetach(p.name, _range(p), mode, reason))

    attached_names = {p.name.name for p in info.partitions}
    for part_name, value in sorted(unfinished.items()):
        if part_name in attached_names:
            continue  # still a partition: handled above (pending) or it was never detached (planned again)
        done_range = (Range(date.fromisoformat(value["from"]), date.fromisoformat(value["to"]))
                      if value.get("from") else None)
        result.detach.append(PlannedDetach(
            QualifiedName(str(value.get("schema", info.name.schema)), part_name), done_range, "finish",
            "detached by an earlier run that stopped before queueing it for archive"))
    return result


def _older(p: Partition, cutoff: date | None) -> bool:
    return cutoff is not None and not p.is_default and p.end_day is not None and p.end_day <= cutoff


def _range(p: Partition) -> Range | None:
    return None if p.is_default else Range(p.start_day, p.end_day)


# --------------------------------------------------------------------------------------------------- premake


@dataclass
class PremakeResult:
    created: list[str] = field(default_factory=list)
    moved_rows: int = 0
    statements: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def premake(ex: Executor, cfg: TableConfig, today: date) -> PremakeResult:
    """Create the current and ``premake`` future partitions that are missing. Idempotent.

    Rows already in the DEFAULT partition for a range are moved into the new partition first (policy
    ``move_rows``); with another policy such a range is refused with a clear error and nothing changes.
    """
    conn = ex.conn
    the_plan = plan(conn, cfg, today)
    result = PremakeResult()
    period = Period(cfg.period)
    for item in the_plan.create:
        info = describe_managed(conn, cfg)  # fresh: the previous iteration attached a partition
        pk = per_partition_key(conn, info)
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
        result.created.append(str(item.name))
        ex.logger.info("%s partition %s for [%s, %s)", "would create" if ex.dry_run else "created",
                       item.name, item.range.start, item.range.end)
    result.statements = list(ex.statements)
    return result


def _refuse_default_rows(cfg: TableConfig, info: TableInfo, item: PlannedCreate, rows: int) -> NoReturn:
    raise PreflightError(
        f"{rows:,} rows in the DEFAULT partition {info.default_partition.name if info.default_partition else ''} "
        f"belong to [{item.range.start}, {item.range.end}), so {item.name} cannot be attached",
        where=f"{cfg.conn_id}: {info.name}",
        fix="set default_partition: move_rows for this entry to move them into the new partition, or move or "
        "delete them yourself")


def _insertable_columns(info: TableInfo) -> list[str]:
    return [c.name for c in info.columns if not c.generated]


def move_default_rows_and_attach(ex: Executor, cfg: TableConfig, info: TableInfo, rng: Range,
                                 child: QualifiedName, primary_key: tuple[str, ...] | None) -> int:
    """Move the DEFAULT partition's rows of ``rng`` into a new partition ``child`` and attach it.

    Returns the number of rows moved. Safe to rerun after a crash at any point: the standalone table keeps the
    rows moved by committed batches, and the next run continues from there.
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

    # 2. Large moves: committed batches straight into the standalone table (keeps the locked step short).
    if total > cfg.batch_size and not info.publications:
        progress = Progress(f"moving DEFAULT rows into {child}", total, logger=ex.logger)
        batch = sql.SQL(
            "WITH moved AS (DELETE FROM {d} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {d} WHERE {cond} LIMIT {n})) "
            "RETURNING {cols}) INSERT INTO {child} ({cols}) SELECT {cols} FROM moved"
        ).format(d=default.name.ident, cond=cond, n=sql.Literal(cfg.batch_size), cols=cols, child=child.ident)
        while True:
            with ex.transaction():
                cur = ex.run(batch)
            n = cur.rowcount if cur is not None else 0
            moved += n
            progress.add(n)
            if ex.dry_run or n < cfg.batch_size:
                break
        progress.add(0, force=True)
    elif total > cfg.batch_size:
        ex.logger.warning(
            "%s is published (%s): moving %d rows in one transaction so subscribers see them move atomically; "
            "the DEFAULT partition is locked meanwhile", info.name, ", ".join(info.publications), total)

    # 3. The locked sweep: what is left (and whatever arrived meanwhile) moves through a temporary table, the
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


def _create_standalone(ex: Executor, cfg: TableConfig, info: TableInfo, rng: Range, child: QualifiedName,
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
            "INCLUDING COMPRESSION INCLUDING GENERATED INCLUDING STATISTICS)"
        ).format(child=child.ident, parent=info.name.ident))
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


def detach_expired(ex: Executor, cfg: TableConfig, today: date) -> DetachResult:
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
    if not ex.dry_run and state_ready(conn):
        row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE status = 'pending'").format(QUEUE)).fetchone()
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


def _detach_concurrently(ex: Executor, cfg: TableConfig, parent: QualifiedName, item: PlannedDetach,
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
    row = conn.execute(
        "SELECT i.inhdetachpending FROM pg_inherits i WHERE i.inhrelid = to_regclass(%s) "
        "AND i.inhparent = to_regclass(%s)",
        (sql.Identifier(child.schema, child.name).as_string(conn), parent.ident.as_string(conn)),
    ).fetchone()
    return bool(row and row[0])


def _detach_plain(ex: Executor, cfg: TableConfig, parent: QualifiedName, child: QualifiedName) -> None:
    ex.with_lock_timeout(
        lambda: ex.run(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent.ident, child.ident)),
        lock_timeout=cfg.lock_timeout, retries=cfg.lock_retries, what=f"detach partition {child}")


def _finalize(ex: Executor, cfg: TableConfig, parent: QualifiedName, child: QualifiedName) -> None:
    ex.outside_transaction_with_lock_timeout(
        sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent.ident, child.ident),
        lock_timeout=cfg.detach_timeout, retries=cfg.lock_retries, what=f"DETACH FINALIZE of {child}",
        where=f"{cfg.conn_id}: {parent}",
        fix="a long transaction is still using the table (see pg_stat_activity); the next run retries")


def _archive(ex: Executor, cfg: TableConfig, parent: QualifiedName, item: PlannedDetach) -> str | None:
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
        ).format(QUEUE, *(sql.Literal(v) for v in (
            target.schema, target.name, parent.schema, parent.name,
            rng.start.isoformat() if rng else None, rng.end.isoformat() if rng else None,
            cfg.period, label)), sql.Literal(Jsonb(cfg.archive_row()))))
        _record(ex, parent, item, "queued")

    ex.with_lock_timeout(body, lock_timeout=cfg.lock_timeout, retries=cfg.lock_retries,
                         what=f"move {item.name} to {cfg.archive_schema}")
    ex.logger.info("%s %s to %s and queued it for archive", "would move" if ex.dry_run else "moved",
                   item.name, target)
    return str(target)


# ------------------------------------------------------------------------------------------------------ health


@dataclass
class Health:
    conn_id: str
    table: str
    problems: list[str] = field(default_factory=list)
    future_partitions: int = 0
    default_rows: int = 0
    detach_pending: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def health(conn: psycopg.Connection[Any], cfg: TableConfig, today: date) -> Health:
    """Problems that need a person: missing future partitions, rows in DEFAULT, detach pending, overdue detach."""
    out = Health(cfg.conn_id, str(cfg.qualified))
    try:
        info = describe_managed(conn, cfg)
    except PartitionError as exc:
        out.problems.append(str(exc))
        return out
    period = Period(cfg.period)
    attached = [p for p in info.partitions if not p.detach_pending and not p.is_default]
    wanted = desired_ranges(cfg, today)
    missing: list[Range] = []
    for rng in wanted:
        try:
            if not _covered(rng, attached, str(info.name)):
                missing.append(rng)
        except PartitionError as exc:
            out.problems.append(str(exc))
    current, future = wanted[0], wanted[1:]
    out.future_partitions = len([r for r in future if r not in missing])
    if current in missing:
        out.problems.append(
            f"no partition for the current {period.value} [{current.start}, {current.end}): inserts "
            + ("go to the DEFAULT partition" if info.default_partition else "fail"))
    if out.future_partitions < cfg.premake:
        names = ", ".join(f"[{r.start}, {r.end})" for r in future if r in missing)
        out.problems.append(
            f"only {out.future_partitions} of premake={cfg.premake} future partitions exist (missing {names}); "
            "run the premake task, and check why it did not create them")
    default = info.default_partition
    if default is not None:
        row = conn.execute(sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT {}) s").format(
            default.name.ident, sql.Literal(DEFAULT_ROWS_SCAN_LIMIT))).fetchone()
        out.default_rows = int(row[0]) if row else 0
        if out.default_rows:
            more = "+" if out.default_rows >= DEFAULT_ROWS_SCAN_LIMIT else ""
            out.problems.append(
                f"{out.default_rows:,}{more} rows sit in the DEFAULT partition {default.name}: they slow every "
                "query that cannot prune it and block creating partitions for their range; premake moves those "
                "of upcoming ranges (default_partition: move_rows), the rest need a decision (a partition for "
                "their range, or delete)")
        if cfg.default_partition == "none":
            out.problems.append(f"{info.name} has a DEFAULT partition {default.name} but the config says "
                                "default_partition: none")
    out.detach_pending = [str(p.name) for p in info.partitions if p.detach_pending]
    if out.detach_pending:
        out.problems.append(
            f"partitions stuck 'detach pending' ({', '.join(out.detach_pending)}): an interrupted DETACH "
            "CONCURRENTLY; the retention task completes it with FINALIZE on its next run")
    cutoff = retention_cutoff(cfg, today)
    overdue = [str(p.name) for p in attached if _older(p, cutoff)
               and queue_status(conn, cfg.archive_schema, p.name.name) != "restored"]
    if overdue:
        out.problems.append(f"{len(overdue)} partitions older than retention={cfg.retention} are still attached "
                            f"({', '.join(overdue[:5])}{'...' if len(overdue) > 5 else ''})")
    return out


def rotate(ex: Executor, cfg: TableConfig, today: date) -> dict[str, Any]:
    """Premake then retention for one table (the whole rotation, e.g. for a dry run or the CLI)."""
    the_plan = plan(ex.conn, cfg, today)
    for line in the_plan.lines():
        ex.logger.info("%s", line)
    made = premake(ex, cfg, today)
    gone = detach_expired(ex, cfg, today)
    return {"plan": the_plan.as_dict(), "premake": made.as_dict(), "detach": gone.as_dict()}
