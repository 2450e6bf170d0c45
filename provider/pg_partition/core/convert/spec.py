"""What one conversion is (table, column, period, key layout, ...) and where its state lives.

Shared by ``preflight``, ``convert`` and ``fill`` (kept apart so those modules do not import each other). The
conversion is recorded as one job in the ``pg_partition`` state schema, keyed by the table, with the options that
shape the intermediate table as its config: a later conversion of the same table with different options finds the
record and refuses to build on leftovers that are not its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core.db import state
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.names import Period, derived_name, partition_name

PRIMARY_KEY_MODES = ("per_partition", "composite")
JOB_KIND = "convert"

# Job status values written by the steps (<state schema>.jobs.status).
PREPPED = "prepped"
SWAPPED = "swapped"


@dataclass(frozen=True)
class ConvertSpec:
    """The options that decide the shape of the partitioned table. Everything else (batch size, filter, sleep)
    may change between runs of the same conversion; these may not."""

    table: QualifiedName
    column: str
    period: Period = Period.MONTH
    primary_key: str = "per_partition"
    default_partition: bool = False
    tablespace: str | None = None
    defer_indexes: bool = False

    @classmethod
    def create(
        cls,
        table: str | QualifiedName,
        column: str,
        *,
        period: str | Period = Period.MONTH,
        primary_key: str = "per_partition",
        default_partition: bool = False,
        tablespace: str | None = None,
        defer_indexes: bool = False,
    ) -> ConvertSpec:
        """Validate user input (types and enumerations only; the catalog is checked by preflight)."""
        name = table if isinstance(table, QualifiedName) else QualifiedName.parse(str(table))
        if not isinstance(column, str) or not column.strip():
            raise InvalidInputError("the partition column is empty", fix="pass the name of a timestamp/date column")
        if primary_key not in PRIMARY_KEY_MODES:
            raise InvalidInputError(
                f"unknown primary_key mode {primary_key!r}",
                fix="use 'per_partition' (a primary key on each partition, pgslice's way) or 'composite' "
                "(primary key plus the partition column on the parent table)",
            )
        return cls(
            table=name,
            column=column,
            period=Period.parse(period),
            primary_key=primary_key,
            default_partition=bool(default_partition),
            tablespace=tablespace or None,
            defer_indexes=bool(defer_indexes),
        )

    @property
    def intermediate(self) -> QualifiedName:
        return self.table.sibling(derived_name(self.table.name, "intermediate"))

    @property
    def retired(self) -> QualifiedName:
        return self.table.sibling(derived_name(self.table.name, "retired"))

    @property
    def default_name(self) -> QualifiedName:
        return self.table.sibling(derived_name(self.table.name, "default"))

    def partition(self, start: date) -> QualifiedName:
        """Partitions are named after the final table from the start, so the swap never renames them."""
        return self.table.sibling(partition_name(self.table.name, start, self.period))

    @property
    def job_id(self) -> str:
        return f"{JOB_KIND}:" + json.dumps([self.table.schema, self.table.name])

    def config(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "period": self.period.value,
            "primary_key": self.primary_key,
            "default_partition": self.default_partition,
            "tablespace": self.tablespace,
            "defer_indexes": self.defer_indexes,
        }

    @classmethod
    def from_config(cls, table: QualifiedName, config: dict[str, Any]) -> ConvertSpec:
        return cls.create(
            table, config["column"], period=config["period"], primary_key=config["primary_key"],
            default_partition=config["default_partition"], tablespace=config.get("tablespace"),
            defer_indexes=config.get("defer_indexes", False),
        )


# --- state helpers -------------------------------------------------------------------------------------------


def state_table(name: str) -> sql.Identifier:
    """A table of the state schema (``state.SCHEMA``), e.g. ``jobs`` or ``checkpoints``."""
    return sql.Identifier(state.SCHEMA, name)


def forget(conn: psycopg.Connection[Any], spec: ConvertSpec, steps: tuple[str, ...] | None = None) -> None:
    """Delete the job (and, by cascade, its checkpoints), or only the checkpoints of ``steps``."""
    if steps is None:
        conn.execute(sql.SQL("DELETE FROM {} WHERE job_id = %s").format(state_table("jobs")), (spec.job_id,))
    else:
        conn.execute(sql.SQL("DELETE FROM {} WHERE job_id = %s AND step = ANY(%s)").format(
            state_table("checkpoints")), (spec.job_id, list(steps)))


@dataclass(frozen=True)
class JobRecord:
    config: dict[str, Any]
    status: str


def recorded_job(conn: psycopg.Connection[Any], table: QualifiedName) -> JobRecord | None:
    """The recorded conversion of ``table``, if any (read-only)."""
    if not state.ready(conn):
        return None
    job_id = ConvertSpec(table, "-").job_id
    row = conn.execute(sql.SQL("SELECT config, status FROM {} WHERE job_id = %s").format(state_table("jobs")),
                       (job_id,)).fetchone()
    return None if row is None else JobRecord(dict(row[0]), str(row[1]))


def load_spec(conn: psycopg.Connection[Any], table: str | QualifiedName) -> ConvertSpec:
    """The spec of the conversion recorded for ``table`` (for unswap/unprep/report called with a table only)."""
    name = table if isinstance(table, QualifiedName) else QualifiedName.parse(str(table))
    job = recorded_job(conn, name)
    if job is None:
        from pg_partition.core.db.errors import StateError

        raise StateError(f"no conversion of {name} is recorded in the state schema",
                         fix="pass the conversion's column and options explicitly, or run prep first")
    return ConvertSpec.from_config(name, job.config)


def checkpoint(conn: psycopg.Connection[Any], spec: ConvertSpec, step: str, part: str = "") -> Any:
    if not state.ready(conn):
        return None
    return state.get_checkpoint(conn, spec.job_id, step, part)


def put(ex: Executor, spec: ConvertSpec, step: str, value: Any, part: str = "") -> None:
    """Record a checkpoint unless this is a dry run (a dry run leaves no trace in the database)."""
    if not ex.dry_run:
        state.put_checkpoint(ex.conn, spec.job_id, step, value, part)


def set_status(ex: Executor, spec: ConvertSpec, status: str) -> None:
    if not ex.dry_run:
        state.set_status(ex.conn, spec.job_id, status)


@contextmanager
def timed(ex: Executor, spec: ConvertSpec, step: str, extra: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Time a step and record its duration under checkpoint ``timing/<step>`` (read by the report)."""
    info: dict[str, Any] = dict(extra or {})
    started = time.monotonic()
    yield info
    info["seconds"] = round(time.monotonic() - started, 3)
    if not ex.dry_run and recorded_job(ex.conn, spec.table) is not None:
        with ex.conn.transaction():
            state.put_checkpoint(ex.conn, spec.job_id, "timing", info, step)
