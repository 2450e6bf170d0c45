"""Change-capture operators for the conversion DAG: install, replay, verify, remove.

Thin on purpose: each parses its arguments, opens a connection, calls :mod:`pg_partition.core.convert.capture` or
:mod:`pg_partition.core.convert.verify`, logs, and returns a JSON-able dict for XCom. The destination is always the
conversion's ``<table>_intermediate`` (before the swap) and the source ``<table>_retired`` after it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowSkipException

from pg_partition.core import convert
from pg_partition.core.convert import capture, replay, verify
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.convert.throttle import chain
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.db.names import derived_name
from pg_partition.core.lag import LagPauseTooLong
from pg_partition.core.params import BATCH_SIZE, SLEEP_SECONDS, bounded_float, bounded_int, parse_bool
from pg_partition.operators.base import PartitionBaseOperator
from pg_partition.operators.pacing import PACE_FIELDS, LatencyPaced
from pg_partition.sensors.lag import LAG_FIELDS, LagGated


def _sibling(table: QualifiedName, role: str) -> QualifiedName:
    return table.sibling(derived_name(table.name, role))


class ReplayChangesOperator(LatencyPaced, LagGated, PartitionBaseOperator):
    """Apply the captured changes to the intermediate until fewer than ``until_backlog_below`` are waiting.

    A no-op (with a log line) when capture is not installed, so the DAG can always run it; with
    ``skip_without_capture`` the task is skipped instead (the conversion DAG's append-only path).
    ``sleep_seconds`` pauses between batches to leave room for the application; ``max_lag_bytes`` /
    ``max_lag_seconds`` (and ``watch_slots``) gate every batch on replication lag, and a pause longer than
    ``max_pause_seconds`` defers to the replication-lag trigger, then replays on (the changelog is the
    checkpoint: entries are removed only with the batch that applied them). ``throttle_ratio`` /
    ``throttle_target_ms`` pace the batches by the application's latency (a canary query).
    """

    template_fields: Sequence[str] = (*PartitionBaseOperator.template_fields, "batch_size", "until_backlog_below",
                                      "sleep_seconds", *LAG_FIELDS, *PACE_FIELDS)
    ui_color = "#f3e2c7"

    def __init__(self, *, batch_size: int | str = 5000, until_backlog_below: int | str = 1000,
                 sleep_seconds: float | str = 0.0, skip_without_capture: bool = False, max_lag_bytes: Any = None,
                 max_lag_seconds: Any = None, watch_slots: Any = None, max_pause_seconds: Any = 600,
                 lag_poll_seconds: float = 30.0, throttle_ratio: Any = None, throttle_target_ms: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_pace(throttle_ratio=throttle_ratio, throttle_target_ms=throttle_target_ms)
        self.batch_size = batch_size
        self.until_backlog_below = until_backlog_below
        self.sleep_seconds = sleep_seconds
        self.skip_without_capture = skip_without_capture
        self.init_lag(max_lag_bytes=max_lag_bytes, max_lag_seconds=max_lag_seconds, watch_slots=watch_slots,
                      max_pause_seconds=max_pause_seconds, lag_poll_seconds=lag_poll_seconds)

    def execute(self, context: Context) -> dict[str, Any]:
        table = self.qualified_table
        batch = bounded_int(self.batch_size, what="batch_size", bounds=BATCH_SIZE, fix="pass e.g. batch_size=5000")
        below = bounded_int(self.until_backlog_below, what="until_backlog_below", bounds=(0, 10**9))
        pause = bounded_float(self.sleep_seconds, what="sleep_seconds", bounds=SLEEP_SECONDS)
        with self.connection() as conn:
            if not capture.is_installed(conn, table):
                self.log.info("no change capture on %s: nothing to replay", table)
                if self.skip_without_capture:
                    raise AirflowSkipException(f"no change capture on {table}: nothing to replay")
                return {"skipped": True, "reason": "capture not installed"}
            ex = self.sql_executor(conn)
            with self.throttle() as gate, self.paced(ex, ConvertSpec(table, "-")) as pace:
                def sleep() -> None:
                    time.sleep(pause)

                step = chain(gate, pace, sleep if pause > 0 else None)
                try:
                    stats = replay.replay(ex, table, _sibling(table, "intermediate"),
                                           batch_size=batch, until_backlog_below=below, throttle=step)
                except LagPauseTooLong as exc:
                    self.defer_for_lag(exc)
                    raise  # pragma: no cover - defer raises TaskDeferred
            return stats.as_dict()

    def resume_after_lag(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Lag is back within limits: replay on (what was applied before the deferral is out of the changelog)."""
        self.check_lag_event(event, str(self.conn_id))
        return self.execute(context)


class VerifyConversionOperator(LatencyPaced, LagGated, PartitionBaseOperator):
    """Compare per partition (row count + content hash) and fail naming the partition and key ranges.

    ``against="intermediate"`` (before the swap): ``<table>`` vs ``<table>_intermediate``, keys with pending
    captured changes excluded. ``against="retired"`` (after): ``<table>_retired`` vs ``<table>``; pass
    ``exclude_keys`` for keys the application changed since the swap. The replay (or catch-up) that verify runs
    first is gated like the replay task: replication lag (``max_lag_*``; a long pause defers to the trigger and
    verify starts over) and the application-latency throttle. ``analyze`` (before the swap only): ANALYZE the
    intermediate on a second session while verify reads (the convert DAG's statistics step; see
    ``verify_conversion``).
    """

    template_fields: Sequence[str] = (*PartitionBaseOperator.template_fields, "against", "exclude_keys",
                                      "fail_on_mismatch", "analyze", *LAG_FIELDS, *PACE_FIELDS)
    ui_color = "#d5f0e3"

    def __init__(self, *, against: str = "intermediate", exclude_keys: Sequence[Any] | None = None,
                 max_ranges: int = 20, fail_on_mismatch: bool | str = True, skip_without_capture: bool = False,
                 analyze: bool | str = False,
                 max_lag_bytes: Any = None, max_lag_seconds: Any = None, watch_slots: Any = None,
                 max_pause_seconds: Any = 600, lag_poll_seconds: float = 30.0, throttle_ratio: Any = None,
                 throttle_target_ms: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_lag(max_lag_bytes=max_lag_bytes, max_lag_seconds=max_lag_seconds, watch_slots=watch_slots,
                      max_pause_seconds=max_pause_seconds, lag_poll_seconds=lag_poll_seconds)
        self.init_pace(throttle_ratio=throttle_ratio, throttle_target_ms=throttle_target_ms)
        self.against = against
        self.exclude_keys = exclude_keys
        self.max_ranges = max_ranges
        self.fail_on_mismatch = fail_on_mismatch
        self.skip_without_capture = skip_without_capture
        self.analyze = analyze

    def pair(self) -> tuple[QualifiedName, QualifiedName]:
        table = self.qualified_table
        if self.against == "intermediate":
            return table, _sibling(table, "intermediate")
        if self.against == "retired":
            return _sibling(table, "retired"), table
        raise InvalidInputError(f"against={self.against!r}", fix="use 'intermediate' (before swap) or 'retired'")

    def execute(self, context: Context) -> dict[str, Any]:
        source, dest = self.pair()
        analyze = parse_bool(self.analyze, what="analyze") and self.against == "intermediate"
        with self.connection() as conn:
            if self.skip_without_capture and not convert.capture_on(conn, self.qualified_table):
                # append-only mode: the live table keeps taking rows the copy only gets from catch-up, so a
                # whole-table comparison would report those as differences
                raise AirflowSkipException(f"the conversion of {self.table} runs without change capture")
            if self.is_dry_run and analyze:  # rehearse the statistics statements too
                convert.analyze(self.sql_executor(conn), ConvertSpec(self.qualified_table, "-"))
            if self.is_dry_run and not (catalog.exists(conn, source) and catalog.exists(conn, dest)):
                self.log.info("[dry run] would verify %s against %s", dest, source)
                return {"dry_run": True, "source": str(source), "dest": str(dest)}
            if self.against == "intermediate" and not self.is_dry_run and not self.exclude_keys:
                # the pre-swap gate, in both modes: replay (capture) or catch-up (append-only) first, paced
                ex, spec = self.sql_executor(conn), ConvertSpec(self.qualified_table, "-")
                with self.throttle() as gate, self.paced(ex, spec) as pace:
                    try:
                        report = verify.verify_conversion(ex, spec, max_ranges=self.max_ranges,
                                                          throttle=chain(gate, pace), analyze=analyze)
                    except LagPauseTooLong as exc:
                        self.defer_for_lag(exc)
                        raise  # pragma: no cover - defer raises TaskDeferred
            else:
                report = verify.verify(conn, source, dest, exclude_keys=list(self.exclude_keys or []) or None,
                                       max_ranges=self.max_ranges)
        if parse_bool(self.fail_on_mismatch, what="fail_on_mismatch"):
            report.raise_if_mismatch()
        elif not report.ok:
            self.log.warning("verification found differences (not failing: fail_on_mismatch is off). After the "
                             "swap, rows the application changed or deleted since then legitimately differ from "
                             "%s:\n%s", source, report.summary())
        return report.as_dict()

    def resume_after_lag(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Lag is back within limits: verify again (what was replayed before the deferral stays applied)."""
        self.check_lag_event(event, str(self.conn_id))
        return self.execute(context)


class RemoveCaptureOperator(PartitionBaseOperator):
    """Remove capture triggers, function and changelog (unprep/unswap cleanup). Idempotent."""

    ui_color = "#f3e2c7"

    def execute(self, context: Context) -> dict[str, Any]:
        table = self.qualified_table
        with self.connection() as conn:
            removed = capture.uninstall(self.sql_executor(conn), table, **self.lock_kwargs())
            return {"removed": removed, "dry_run": self.is_dry_run, **capture.status(conn, table)}
