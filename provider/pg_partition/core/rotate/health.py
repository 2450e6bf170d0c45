"""Health of a rotated table (DEFAULT rows, detach pending, missing future partitions, overdue retention) and the
whole rotation of one table."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.db.errors import PartitionError
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import locks_table
from pg_partition.core.db.names import Period, Range
from pg_partition.core.rotate.plan import (
    DEFAULT_ROWS_SCAN_LIMIT,
    RotationSpec,
    covered,
    describe_managed,
    desired_ranges,
    older,
    plan,
    queue_status,
    retention_cutoff,
)
from pg_partition.core.rotate.premake import premake
from pg_partition.core.rotate.retention import detach_expired

log = logging.getLogger("pg_partition")



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


def health(conn: psycopg.Connection[Any], cfg: RotationSpec, today: date) -> Health:
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
            if not covered(rng, attached, str(info.name)):
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
    overdue = [str(p.name) for p in attached if older(p, cutoff)
               and queue_status(conn, cfg.archive_schema, p.name.name) != "restored"]
    if overdue:
        out.problems.append(f"{len(overdue)} partitions older than retention={cfg.retention} are still attached "
                            f"({', '.join(overdue[:5])}{'...' if len(overdue) > 5 else ''})")
    return out


@locks_table()  # the per-table lock, also for a direct caller of the engine
def rotate(ex: Executor, cfg: RotationSpec, today: date) -> dict[str, Any]:
    """Premake then retention for one table (the whole rotation, e.g. for a dry run or the CLI)."""
    the_plan = plan(ex.conn, cfg, today)
    for line in the_plan.lines():
        ex.logger.info("%s", line)
    made = premake(ex, cfg, today)
    gone = detach_expired(ex, cfg, today)
    return {"plan": the_plan.as_dict(), "premake": made.as_dict(), "detach": gone.as_dict()}
