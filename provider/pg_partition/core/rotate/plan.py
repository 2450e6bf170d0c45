"""Rotation plan: which partitions to create (premake) and which to detach (retention), read from the catalog."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

import psycopg
from psycopg import sql

from pg_partition.core.db import catalog, state
from pg_partition.core.db.catalog import Partition, QualifiedName, TableInfo
from pg_partition.core.db.errors import InvalidInputError, PreflightError
from pg_partition.core.db.names import Period, Range, floor, partition_name, ranges, shift
from pg_partition.core.db.partitions import (
    bounds_condition,
    column_kind,
    partition_column,
)

log = logging.getLogger("pg_partition")



DetachMode = Literal["concurrently", "plain", "finalize", "finish"]
DEFAULT_ROWS_SCAN_LIMIT = 1_000_000


DefaultPolicy = Literal["none", "keep_empty", "move_rows"]


@dataclass(frozen=True)
class RotationSpec:
    """What the engine needs to rotate one table in one database: built by the fleet config
    (:meth:`pg_partition.config.RotationSpec.rotation`) or by any other caller, so the engine does not depend on
    the config layer."""

    conn_id: str
    table: QualifiedName
    column: str = "created_at"
    period: str = "month"
    premake: int = 3
    retention: int | None = None
    default_partition: DefaultPolicy = "move_rows"
    archive_schema: str = "pgpartition_archive"
    lock_timeout: str = "2s"
    lock_retries: int = 5
    detach_timeout: str = "10min"
    batch_size: int = 10_000
    archive_policy: dict[str, Any] | None = None

    @property
    def qualified(self) -> QualifiedName:
        return self.table

    @property
    def key(self) -> str:
        """A readable id for logs and map indexes: ``conn_id:schema.table``."""
        return f"{self.conn_id}:{self.table}"

    def archive_row(self) -> dict[str, Any]:
        """What goes into ``archive_queue.archive`` for a partition detached from this table."""
        return {"policy": self.archive_policy, "conn_id": self.conn_id}


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


def describe_managed(conn: psycopg.Connection[Any], cfg: RotationSpec) -> TableInfo:
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


def desired_ranges(cfg: RotationSpec, today: date) -> list[Range]:
    """The current period's range and ``premake`` future ones."""
    period = Period(cfg.period)
    return ranges(floor(today, period), period, cfg.premake + 1)


def retention_cutoff(cfg: RotationSpec, today: date) -> date | None:
    """Partitions ending on or before this day are detached: the current period plus ``retention`` full ones
    before it are kept (retention 24 on 2025-06-15, monthly: everything before 2023-06-01 goes)."""
    if cfg.retention is None:
        return None
    period = Period(cfg.period)
    return shift(floor(today, period), period, -cfg.retention)


def covered(rng: Range, parts: list[Partition], where: str) -> bool:
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


def unfinished_detaches(conn: psycopg.Connection[Any], table: QualifiedName) -> dict[str, dict[str, Any]]:
    """Detaches whose intent was recorded but whose table is not yet queued for archive."""
    if not state.ready(conn):
        return {}
    return {k: v for k, v in state.checkpoints(conn, job_id(table), "detach").items()
            if v.get("status") != "queued"}


def queue_status(conn: psycopg.Connection[Any], schema: str, name: str) -> str | None:
    if not state.ready(conn):
        return None
    row = conn.execute(sql.SQL("SELECT status FROM {} WHERE schema_name = %s AND table_name = %s").format(
        state.QUEUE), (schema, name)).fetchone()
    return None if row is None else str(row[0])


def concurrent_detach_possible(server_version: int, has_default: bool) -> tuple[bool, str]:
    """Whether ``DETACH ... CONCURRENTLY`` can run, and why not."""
    if server_version < 140000:
        return False, f"PostgreSQL {server_version // 10000} has no DETACH CONCURRENTLY (14+)"
    if has_default:
        return False, "PostgreSQL refuses DETACH CONCURRENTLY when the table has a DEFAULT partition"
    return True, "no DEFAULT partition, PostgreSQL 14+"


def plan(conn: psycopg.Connection[Any], cfg: RotationSpec, today: date) -> Plan:
    """Read-only: what premake and retention would create, move and detach today."""
    info = describe_managed(conn, cfg)
    where = f"{cfg.conn_id}: {info.name}"
    period = Period(cfg.period)
    result = Plan(cfg.conn_id, info.name, today)
    attached = [p for p in info.partitions if not p.detach_pending]

    for rng in desired_ranges(cfg, today):
        if covered(rng, attached, where):
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
            ours = p.name.name in unfinished or older(p, retention_cutoff(cfg, today))
            result.detach.append(PlannedDetach(
                p.name, _range(p), "finalize",
                "an earlier DETACH ... CONCURRENTLY was interrupted; complete it", archive=ours))

    cutoff = retention_cutoff(cfg, today)
    if cutoff is not None:
        ok, why = concurrent_detach_possible(catalog.server_version_num(conn), info.default_partition is not None)
        for p in attached:
            if p.is_default or not older(p, cutoff):
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


def older(p: Partition, cutoff: date | None) -> bool:
    return cutoff is not None and not p.is_default and p.end_day is not None and p.end_day <= cutoff


def _range(p: Partition) -> Range | None:
    return None if p.is_default else Range(p.start_day, p.end_day)
