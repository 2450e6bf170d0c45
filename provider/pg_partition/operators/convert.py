"""Thin operators over :mod:`pg_partition.core.convert`: one per conversion step, each idempotent and retryable.

Every argument a user fills is a templated field (DAG params arrive as strings: they are parsed here), every
statement is logged by the engine's Executor, and ``dry_run`` makes every step log its SQL and change nothing.
Each operator returns its step's result as a JSON-able dict for XCom; :class:`ConvertPlanFillOperator` returns
the work groups that :class:`ConvertFillOperator` is mapped over (a few tasks, each filling neighbouring
partitions in sequence). The operators that write a lot of WAL (fill, indexes, swap) check replication lag once
at their start (:meth:`~pg_partition.sensors.lag.LagGated.lag_gate`) and defer to the triggerer only when it is
over the limit, instead of a sensor task in front of each that costs a task process in every run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowSkipException

from pg_partition.core import convert
from pg_partition.core.convert import capture
from pg_partition.core.convert.fill import (
    DEFAULT_FILL_SESSIONS,
    DEFAULT_FILL_TASKS,
    DEFAULT_ROWS_PER_TASK,
    FILL_SESSIONS,
    pack_items,
)
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.convert.throttle import chain
from pg_partition.core.lag import LagPauseTooLong
from pg_partition.core.params import bounded_int, parse_bool, parse_float, parse_int, parse_text
from pg_partition.operators import progress
from pg_partition.operators.base import PartitionBaseOperator
from pg_partition.operators.pacing import PACE_FIELDS, LatencyPaced
from pg_partition.sensors.lag import LAG_FIELDS, LagGated

SPEC_FIELDS = ("column", "period", "primary_key", "default_partition", "tablespace", "defer_indexes")


class ConvertBaseOperator(PartitionBaseOperator):
    """Shared arguments: the options that shape the conversion (they must be the same on every step)."""

    template_fields: Sequence[str] = (*PartitionBaseOperator.template_fields, *SPEC_FIELDS)
    ui_color = "#d7e9f7"
    run_claim: str | None = "check"  # a later step of a run stops when another run has claimed the table since

    def __init__(self, *, column: str, period: str = "month", primary_key: str = "per_partition",
                 default_partition: bool | str = False, tablespace: str | None = None,
                 defer_indexes: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.column = column
        self.period = period
        self.primary_key = primary_key
        self.default_partition = default_partition
        self.tablespace = tablespace
        self.defer_indexes = defer_indexes

    def spec(self) -> ConvertSpec:
        return ConvertSpec.create(
            self.qualified_table, str(self.column), period=str(self.period), primary_key=str(self.primary_key),
            default_partition=parse_bool(self.default_partition, what="default_partition"),
            tablespace=parse_text(self.tablespace),
            defer_indexes=parse_bool(self.defer_indexes, what="defer_indexes"),
        )

    @contextmanager
    def run_step(self) -> Iterator[tuple[Any, ConvertSpec]]:
        """A connection's executor and the spec; logs whether this is a rehearsal."""
        spec = self.spec()
        with self.connection() as conn:
            ex = self.sql_executor(conn)
            if ex.dry_run:
                self.log.info("DRY RUN: statements are logged, nothing is changed")
            yield ex, spec


class ConvertPreflightOperator(ConvertBaseOperator):
    """Refuse unsafe conversions (the task fails with what/where/how to fix) or report rows, size, rows per
    period, append-only, publications and replication slots. Reads only."""

    run_claim = None  # reads only, writes no claim: a run after an abandoned one must get past it

    template_fields: Sequence[str] = (*ConvertBaseOperator.template_fields, "where", "capture_changes")

    def __init__(self, *, where: str | None = None, capture_changes: bool | str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = where
        self.capture_changes = capture_changes

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_step() as (ex, spec):
            report = convert.preflight(ex.conn, spec, where=parse_text(self.where), dry_run=ex.dry_run)
            if self.capture_changes is not None:  # refuse capture + where here, before anything changes
                report["capture"] = convert.decide_capture(ex.conn, spec, self.capture_changes,
                                                           where=parse_text(self.where))
                self.log.info("change capture: %s (%s)", "on" if report["capture"]["capture"] else "off",
                              report["capture"]["reason"])
        self.log.info("preflight of %s: %s rows, %.1f MiB, append-only: %s, %d period(s), resuming: %s",
                      report["table"], f"{report['rows']:,}", report["size"]["total"] / 2**20,
                      report["append_only"], len(report["rows_per_period"]), report["resuming"])
        for warning in report["warnings"]:
            self.log.warning("%s", warning)
        return report


class ConvertPrepOperator(ConvertBaseOperator):
    """Create (or complete) ``<table>_intermediate``, mirroring the source."""

    run_claim = "claim"  # the convert run's first change: this run now works on the table

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_step() as (ex, spec):
            return convert.prep(ex, spec, **self.lock_kwargs())


class ConvertAddPartitionsOperator(ConvertBaseOperator):
    """Partitions for ``past``/``future`` periods and (``cover_data``) every period holding data."""

    template_fields: Sequence[str] = (*ConvertBaseOperator.template_fields, "past", "future", "cover_data",
                                      "where", "target")

    def __init__(self, *, past: int | str = 0, future: int | str = 0, cover_data: bool | str = False,
                 where: str | None = None, target: str = "intermediate", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.past = past
        self.future = future
        self.cover_data = cover_data
        self.where = where
        self.target = target

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_step() as (ex, spec):
            return convert.add_partitions(
                ex, spec, past=parse_int(self.past, 0) or 0, future=parse_int(self.future, 0) or 0,
                cover_data=parse_bool(self.cover_data, what="cover_data"), where=parse_text(self.where),
                target=str(self.target),
                **self.lock_kwargs())


class ConvertInstallCaptureOperator(ConvertBaseOperator):
    """Decide ``capture_changes`` (auto: on when pg_stat_user_tables shows UPDATE/DELETE) and install change
    capture before the fill; the decision is recorded with the conversion. When capture is off the task is
    skipped (the append-only path: fill + catch-up)."""

    template_fields: Sequence[str] = (*ConvertBaseOperator.template_fields, "capture_changes", "where")
    ui_color = "#f3e2c7"

    def __init__(self, *, capture_changes: bool | str = "auto", where: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capture_changes = capture_changes
        self.where = where

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_step() as (ex, spec):
            result = convert.install_capture(ex, spec, self.capture_changes, where=parse_text(self.where),
                                             **self.lock_kwargs())
            result.update(capture.status(ex.conn, spec.table), dry_run=ex.dry_run, statements=ex.statements)
        if not result["capture"]:
            raise AirflowSkipException(f"change capture off: {result['reason']}")
        return result


class ConvertPlanFillOperator(LatencyPaced, ConvertBaseOperator):
    """Plan the fill (safe high-water mark, one item per partition) and return the work groups to map over:
    at most ``fill_tasks`` groups of neighbouring partitions balanced by rows, one per ``rows_per_fill_task``
    rows (a small table gets one task; :func:`pg_partition.core.convert.fill.pack_items`). With
    ``throttle_ratio`` it also records the canary's baseline latency, before any row is copied."""

    template_fields: Sequence[str] = (*ConvertBaseOperator.template_fields, "where", "batch_size", "start",
                                      "stop", "replan", "wait_timeout", "fill_tasks", "rows_per_fill_task",
                                      *PACE_FIELDS)

    def __init__(self, *, where: str | None = None, batch_size: int | str = 10_000, start: int | str | None = None,
                 stop: int | str | None = None, replan: bool | str = False, wait_timeout: float | str = 3600,
                 fill_tasks: int | str = DEFAULT_FILL_TASKS, rows_per_fill_task: int | str = DEFAULT_ROWS_PER_TASK,
                 throttle_ratio: Any = None, throttle_target_ms: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_pace(throttle_ratio=throttle_ratio, throttle_target_ms=throttle_target_ms)
        self.where = where
        self.batch_size = batch_size
        self.start = start
        self.stop = stop
        self.replan = replan
        self.wait_timeout = wait_timeout
        self.fill_tasks = fill_tasks
        self.rows_per_fill_task = rows_per_fill_task

    def execute(self, context: Context) -> list[dict[str, Any]]:
        tasks = bounded_int(self.fill_tasks, what="fill_tasks", bounds=(1, 64), default=DEFAULT_FILL_TASKS)
        per_task = bounded_int(self.rows_per_fill_task, what="rows_per_fill_task", bounds=(1, 10**12),
                               default=DEFAULT_ROWS_PER_TASK)
        with self.run_step() as (ex, spec):
            plan = convert.plan_fill(
                ex, spec, where=parse_text(self.where), batch_size=parse_int(self.batch_size, 10_000) or 10_000,
                start=parse_int(self.start), stop=parse_int(self.stop), replan=parse_bool(self.replan, what="replan"),
                wait_timeout=parse_float(self.wait_timeout, 3600.0))
            self.measure_pace_baseline(ex, spec)
        groups = pack_items(list(plan["items"]), max_tasks=tasks, rows_per_task=per_task)
        self.log.info("fill plan: %s strategy, %d items in %d fill task(s), %s rows, %s outside every partition, "
                      "high-water id %s", plan["strategy"], len(plan["items"]), len(groups), f"{plan['rows']:,}",
                      f"{plan['outside_rows']:,}", plan["high_water"])
        for group in groups:
            self.log.info("  fill task %s: %s rows", group["key"], f"{group['rows']:,}")
        return groups


class ConvertFillOperator(LatencyPaced, LagGated, ConvertBaseOperator):
    """Fill one work group of planned items (mapped: a few tasks per conversion), or one item, resuming from the
    per-item checkpoints.

    ``max_lag_bytes`` / ``max_lag_seconds`` (for the standbys and the ``watch_slots``, default every slot) are
    checked once at the start (over the limit: the task defers at once, no worker waits) and then make the fill
    pause before a batch while replication lags (``pg_partition.core.lag.LagGate``); a pause longer than
    ``max_pause_seconds`` defers the task to the replication-lag trigger (the worker slot is freed) and, once
    lag is back within limits, ``resume_after_lag`` continues from the checkpoint.
    """

    template_fields: Sequence[str] = (*ConvertBaseOperator.template_fields, "batch_size", "sleep_seconds",
                                      "sessions", *LAG_FIELDS, *PACE_FIELDS)

    def __init__(self, *, item: dict[str, Any] | str | None = None, batch_size: int | str | None = None,
                 sleep_seconds: float | str = 0, sessions: int | str = DEFAULT_FILL_SESSIONS,
                 max_lag_bytes: Any = None, max_lag_seconds: Any = None,
                 watch_slots: Any = None, max_pause_seconds: Any = 600, lag_poll_seconds: float = 30.0,
                 throttle_ratio: Any = None, throttle_target_ms: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_pace(throttle_ratio=throttle_ratio, throttle_target_ms=throttle_target_ms)
        self.item = item
        self.batch_size = batch_size
        self.sleep_seconds = sleep_seconds
        self.sessions = sessions
        self.init_lag(max_lag_bytes=max_lag_bytes, max_lag_seconds=max_lag_seconds, watch_slots=watch_slots,
                      max_pause_seconds=max_pause_seconds, lag_poll_seconds=lag_poll_seconds)

    def table_lock_mode(self) -> tuple[bool, str | None]:
        """Mapped fill tasks of one run share the table's lock; each item (or group) is locked on its own."""
        item = self.item if isinstance(self.item, dict) else {}
        return True, str(item.get("key") or self.item)

    def execute(self, context: Context) -> dict[str, Any]:
        return self._fill(self.lag_gate())

    def resume_after_lag(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Called by Airflow when the trigger fired: lag is within limits again; continue from the checkpoint."""
        self.check_lag_event(event, str(self.conn_id))
        self.log.info("replication lag back within limits (%s); resuming the fill from its checkpoint",
                      (event or {}).get("summary"))
        return self._fill((event or {}).get("result"))

    def _fill(self, gate: dict[str, Any] | None) -> dict[str, Any]:
        sessions = bounded_int(self.sessions, what="fill_sessions", bounds=FILL_SESSIONS, default=DEFAULT_FILL_SESSIONS)
        with self.run_step() as (ex, spec), self.throttle() as throttle, self.paced(ex, spec) as pace:
            try:
                result = convert.fill(ex, spec, self.item, batch_size=parse_int(self.batch_size),
                                      sleep_seconds=parse_float(self.sleep_seconds), throttle=chain(throttle, pace),
                                      sessions=sessions)
            except LagPauseTooLong as exc:
                self.defer_for_lag(exc)
                raise  # pragma: no cover - defer raises TaskDeferred
            if gate is not None:
                result["lag_gate"] = gate
            if not ex.dry_run:  # the whole conversion, not just this task's partitions
                overall = progress.overall_fill(ex.conn, spec, parallel=self.max_active_tis_per_dag or 1)
                if overall is not None:
                    self.log.info("%s", progress.overall_line(overall))
                    result["overall"] = overall
            return result


class ConvertIndexesOperator(LatencyPaced, LagGated, ConvertBaseOperator):
    """Build deferred indexes per partition and attach them (nothing to build without ``defer_indexes``), then
    ANALYZE (``analyze``, default on; the convert DAG turns it off here and runs ANALYZE alongside verify).

    Replication lag is checked once at the start (over the limit: defer at once) and before each partition's
    index build, and paced between partitions by the latency throttle when one is set; a pause longer than
    ``max_pause_seconds`` defers, and the retry attaches what was built and builds the rest (each CREATE INDEX is
    all or nothing).
    """

    template_fields: Sequence[str] = (*ConvertBaseOperator.template_fields, "analyze", *LAG_FIELDS, *PACE_FIELDS)

    def __init__(self, *, analyze: bool | str = True, max_lag_bytes: Any = None, max_lag_seconds: Any = None,
                 watch_slots: Any = None, max_pause_seconds: Any = 600, lag_poll_seconds: float = 30.0,
                 throttle_ratio: Any = None, throttle_target_ms: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_pace(throttle_ratio=throttle_ratio, throttle_target_ms=throttle_target_ms)
        self.analyze = analyze
        self.init_lag(max_lag_bytes=max_lag_bytes, max_lag_seconds=max_lag_seconds, watch_slots=watch_slots,
                      max_pause_seconds=max_pause_seconds, lag_poll_seconds=lag_poll_seconds)

    def execute(self, context: Context) -> dict[str, Any]:
        return self._build(self.lag_gate())

    def resume_after_lag(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        self.check_lag_event(event, str(self.conn_id))
        return self._build((event or {}).get("result"))

    def _build(self, gate: dict[str, Any] | None) -> dict[str, Any]:
        with self.run_step() as (ex, spec), self.throttle() as throttle, self.paced(ex, spec) as pace:
            try:
                result = convert.build_indexes(ex, spec, throttle=chain(throttle, pace))
                if parse_bool(self.analyze, what="analyze"):
                    result["analyze"] = convert.analyze(ex, spec)
            except LagPauseTooLong as exc:
                self.defer_for_lag(exc)
                raise  # pragma: no cover - defer raises TaskDeferred
        if gate is not None:
            result["lag_gate"] = gate
        return result


class ConvertAnalyzeOperator(ConvertBaseOperator):
    """ANALYZE every partition and the parent."""

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_step() as (ex, spec):
            return convert.analyze(ex, spec)


class ConvertCatchUpOperator(ConvertBaseOperator):
    """Copy rows the fill could not see (before the swap: into the intermediate; after: from the retired
    table). Safe to repeat."""

    template_fields: Sequence[str] = (*ConvertBaseOperator.template_fields, "batch_size", "full", "wait_timeout")

    def __init__(self, *, batch_size: int | str = 10_000, full: bool | str = False,
                 wait_timeout: float | str = 3600, skip_with_capture: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = batch_size
        self.full = full
        self.wait_timeout = wait_timeout
        self.skip_with_capture = skip_with_capture

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_step() as (ex, spec):
            if self.skip_with_capture and convert.capture_on(ex.conn, spec.table):
                raise AirflowSkipException("the conversion ran with change capture: the swap applied every "
                                           "captured change, so no catch-up pass is needed")
            return convert.catch_up(ex, spec, batch_size=parse_int(self.batch_size, 10_000) or 10_000,
                                    full=parse_bool(self.full, what="full"),
                                    wait_timeout=parse_float(self.wait_timeout, 3600.0))


class ConvertSwapOperator(LatencyPaced, LagGated, ConvertBaseOperator):
    """Catch up (outside any lock), then swap in one short transaction under ``lock_timeout`` with retries.
    Replication lag (``max_lag_bytes`` / ``max_lag_seconds``) is checked once first: over the limit, the task
    defers to the triggerer and swaps once lag is back within limits."""

    template_fields: Sequence[str] = (*ConvertBaseOperator.template_fields, "batch_size", "catch_up_first",
                                      "replay_until_backlog_below", *LAG_FIELDS, *PACE_FIELDS)

    def __init__(self, *, batch_size: int | str = 10_000, catch_up_first: bool | str = True,
                 replay_until_backlog_below: int | str = 1000, max_lag_bytes: Any = None,
                 max_lag_seconds: Any = None, watch_slots: Any = None, max_pause_seconds: Any = 600,
                 lag_poll_seconds: float = 30.0, throttle_ratio: Any = None, throttle_target_ms: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_pace(throttle_ratio=throttle_ratio, throttle_target_ms=throttle_target_ms)
        self.batch_size = batch_size
        self.catch_up_first = catch_up_first
        self.replay_until_backlog_below = replay_until_backlog_below
        self.init_lag(max_lag_bytes=max_lag_bytes, max_lag_seconds=max_lag_seconds, watch_slots=watch_slots,
                      max_pause_seconds=max_pause_seconds, lag_poll_seconds=lag_poll_seconds)

    def execute(self, context: Context) -> dict[str, Any]:
        """With change capture: replay until the backlog is under ``replay_until_backlog_below`` (so the swap's
        locked apply is small), then swap, which applies the rest and removes capture under its lock; no
        catch-up (capture has every insert too). Without: catch-up outside any lock, then swap (its last
        anti-join under the lock)."""
        return self._swap(self.lag_gate())

    def resume_after_lag(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        self.check_lag_event(event, str(self.conn_id))
        return self._swap((event or {}).get("result"))

    def _swap(self, gate: dict[str, Any] | None) -> dict[str, Any]:
        with self.run_step() as (ex, spec), self.paced(ex, spec) as pace:
            result = convert.finish_and_swap(
                ex, spec, batch_size=parse_int(self.batch_size, 10_000, what="batch_size") or 10_000,
                replay_until_backlog_below=parse_int(self.replay_until_backlog_below, 1000,
                                                     what="replay_until_backlog_below") or 1,
                catch_up_first=parse_bool(self.catch_up_first, what="catch_up_first"), throttle=pace,
                **self.lock_kwargs())
        if gate is not None:
            result["lag_gate"] = gate
        return result


class ConvertUnswapOperator(ConvertBaseOperator):
    """Roll the swap back (rows written since are copied back first)."""

    run_claim = "claim"  # the rollback run's first change

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_step() as (ex, spec):
            return convert.unswap(ex, spec, **self.lock_kwargs())


class ConvertUnprepOperator(ConvertBaseOperator):
    """Drop the intermediate table and forget the conversion (refused while swapped)."""

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_step() as (ex, spec):
            return convert.unprep(ex, spec, **self.lock_kwargs())


class ConvertReportOperator(ConvertBaseOperator):
    """Rows and size before/after, per-partition counts, time per step, swap lock time."""

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_step() as (ex, spec):
            report = convert.report(ex.conn, spec)
            overall = progress.overall_fill(ex.conn, spec, parallel=1)
        dag_run = context.get("dag_run")
        tail = progress.report_tail(report, getattr(dag_run, "start_date", None),
                                    overall["fill_seconds"] if overall else None)
        for line in [*convert.format_report(report).splitlines(), *tail]:
            self.log.info("%s", line)
        return report | {"summary": tail}
