"""Rotation operators: premake, retention (detach) and health for one table of the fleet config.

Thin on purpose: each parses one config entry, opens the connection, calls :mod:`pg_partition.core.rotate`, logs
and returns a JSON-able dict for XCom. They work standalone (``conn_id=..., table=..., entry={...}``) or inside
the ``pg_partition_rotate`` DAG, where ``entry`` is one mapped element of the config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime, timezone
from typing import Any

from airflow.sdk import Context
from pydantic import ValidationError

from pg_partition.config import TableConfig
from pg_partition.core import rotate
from pg_partition.core.db.errors import InvalidInputError, PartitionError
from pg_partition.core.rotate import RotationSpec
from pg_partition.operators.base import PartitionBaseOperator


class PartitionHealthError(PartitionError):
    """A managed table needs attention (missing future partitions, rows in DEFAULT, detach pending...)."""


class _RotateOperator(PartitionBaseOperator):
    """One config entry (a :class:`~pg_partition.config.TableConfig` as a mapping) and the day to rotate for."""

    template_fields: Sequence[str] = (*PartitionBaseOperator.template_fields, "entry", "today")
    map_index_template = "{{ pg_partition_target }}"

    def __init__(self, *, entry: Mapping[str, Any] | None = None, conn_id: str = "", table: str = "",
                 today: str | date | None = None, **kwargs: Any) -> None:
        super().__init__(conn_id=conn_id, table=table, **kwargs)
        self.entry = entry
        self.today = today

    def table_config(self) -> TableConfig:
        """The entry, with explicit ``conn_id``/``table`` arguments taking precedence, validated."""
        data = dict(self.entry or {})
        if self.conn_id:
            data["conn_id"] = self.conn_id
        if self.table:
            data["table"] = self.table
        try:
            cfg = TableConfig.model_validate(data)
        except ValidationError as exc:
            raise InvalidInputError(f"invalid rotation entry for task {self.task_id}: {exc}",
                                    fix="check the entry against pg_partition.config.TableConfig") from None
        self.conn_id, self.table = cfg.conn_id, cfg.table
        self.lock_timeout, self.lock_retries = cfg.lock_timeout, cfg.lock_retries
        return cfg

    def rotation_day(self) -> date:
        """``today`` when given (ISO date, for reruns and tests), else the current UTC date."""
        if isinstance(self.today, date):
            return self.today
        if self.today and str(self.today).strip() not in ("", "None"):
            try:
                return date.fromisoformat(str(self.today).strip()[:10])
            except ValueError:
                raise InvalidInputError(f"today={self.today!r} is not a date",
                                        fix="use YYYY-MM-DD, or leave it empty for the current date") from None
        return datetime.now(timezone.utc).date()

    def prepare(self, context: Context) -> tuple[RotationSpec, date]:
        cfg = self.table_config()
        context["pg_partition_target"] = cfg.key  # type: ignore[typeddict-unknown-key]  # map index label
        return cfg.rotation(), self.rotation_day()


class PremakePartitionsOperator(_RotateOperator):
    """Create the current and ``premake`` future partitions that are missing; moves DEFAULT rows first."""

    ui_color = "#cfe8cf"

    def execute(self, context: Context) -> dict[str, Any]:
        cfg, today = self.prepare(context)
        with self.connection() as conn:
            plan = rotate.plan(conn, cfg, today)
            for line in plan.lines():
                self.log.info("%s", line)
            result = rotate.premake(self.sql_executor(conn), cfg, today)
        self.log.info("%s %d partitions, moved %d rows out of the DEFAULT partition",
                      "would create" if self.is_dry_run else "created", len(result.created), result.moved_rows)
        return {"conn_id": cfg.conn_id, "table": str(cfg.table), "dry_run": self.is_dry_run, "plan": plan.as_dict(),
                **result.as_dict()}


class DetachExpiredPartitionsOperator(_RotateOperator):
    """Detach partitions older than ``retention`` (CONCURRENTLY when possible), finish interrupted detaches,
    move them to the archive schema and queue them for the archive DAG."""

    ui_color = "#f3dfc1"

    def execute(self, context: Context) -> dict[str, Any]:
        cfg, today = self.prepare(context)
        with self.connection(autocommit=True) as conn:  # DETACH ... CONCURRENTLY cannot run in a transaction
            result = rotate.detach_expired(self.sql_executor(conn), cfg, today)
        if cfg.retention is None and not result.finalized and not result.detached:
            self.log.info("retention is null for %s: nothing is detached", cfg.key)
        for why in result.fallbacks:
            self.log.warning("plain DETACH used: %s", why)
        self.log.info("%s %d partitions for archive (%d pending in %s's archive queue)",
                      "would queue" if self.is_dry_run else "queued", len(result.detached),
                      result.pending_archive, cfg.conn_id)
        return {"conn_id": cfg.conn_id, "table": str(cfg.table), "dry_run": self.is_dry_run, **result.as_dict()}


class PartitionHealthOperator(_RotateOperator):
    """Fail loudly when a managed table needs a person; set ``on_failure_callback`` to page someone.

    In dry-run mode the problems are logged as warnings and the task succeeds (nothing was fixed, so the usual
    problems of a table not yet rotated are expected).
    """

    ui_color = "#f7d4d4"

    def execute(self, context: Context) -> dict[str, Any]:
        cfg, today = self.prepare(context)
        with self.connection() as conn:
            report = rotate.health(conn, cfg, today)
        if report.ok:
            self.log.info("%s is healthy: %d future partitions, DEFAULT partition empty", cfg.key,
                          report.future_partitions)
            return report.as_dict()
        for problem in report.problems:
            self.log.error("%s: %s", cfg.key, problem)
        if self.is_dry_run:
            self.log.warning("dry run: %d problems reported, not failing", len(report.problems))
            return report.as_dict()
        raise PartitionHealthError(
            f"{len(report.problems)} problem(s):\n  - " + "\n  - ".join(report.problems),
            where=f"partition health of {cfg.table} on {cfg.conn_id}",
            fix="see each problem; the premake and detach tasks of this run show what they did")
