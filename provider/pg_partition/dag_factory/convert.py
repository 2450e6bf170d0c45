"""The ``pg_partition_convert`` DAG: online conversion of one table to RANGE partitions, triggered with params.

    preflight -> prep -> add_partitions (+ change capture) -> plan_fill -> fill (mapped: a few tasks, each
    filling neighbouring partitions on 2 sessions, labelled by the partitions it covers) -> replay -> indexes
    -> verify (+ ANALYZE alongside) -> swap -> after_swap -> report

Two modes, chosen by ``capture_changes`` (auto means on: whether a table takes UPDATE/DELETE cannot be told from
statistics that reset on failover or pg_stat_reset; off is append-only mode, an explicit opt-in). With capture:
add_partitions also installs triggers (before the fill plan) that record every changed key; replay applies them
after the fill; verify compares every partition with its source range (the gate: a mismatch fails the run); the
swap replays once more and applies the rest under its lock; after_swap compares the retired table with the live one
when ``verify_after_swap`` is on (logged). Append-only: replay skips, verify (catch-up first) still gates the swap,
and after_swap copies the rows written since (catch-up). Skipped tasks do not stop the run (the tasks after them
use ``none_failed``).
Replication lag gates the fill, the index builds and the swap: each of those tasks measures it once when it
starts and defers to the triggerer only when it is over the limit; the fill, replay and index builds also check
it before every batch (or partition) themselves. Gentle mode (``throttle_ratio`` / ``throttle_target_ms``):
plan_fill records a canary query's latency before any row is copied, and the fill, replay, index builds, verify
and the swap's pre-lock replay pause between batches while the canary is slower than the target.

Why these 11 nodes and not more: every task is a process that parses the DAG file again (a fraction of a second
under ``dags test``, seconds under a scheduler), so a node that has nothing to do in most runs is a cost users pay
on every run. Capture installation rides with add_partitions and the catch-up/verify-after pair is one task
(pg_partition.operators.convert_flow); the lag checks ride with the steps they gate (there are no sensor tasks);
ANALYZE runs alongside verify, on a second session (both read the copy, one core each); the fill is packed
into at most ``fill_tasks`` mapped tasks (one for a small table) instead of one per partition, each copying its
partitions on ``fill_sessions`` sessions (so ``dags test``, which runs tasks one at a time, and a scheduler both
keep two cores busy). Replay and verify stay separate because replay may defer for lag
and verify is the gate before the swap. Indexes are deferred by default (``defer_indexes``): the fill copies into
partitions that carry only the key, and the other indexes are built per partition afterwards, on 2 sessions.

Every task is idempotent and resumes from the state recorded in the database, so a failed run is fixed by
clearing the failed task (or triggering the DAG again with the same params). ``plan_fill`` is a task of its own
because the mapped fill needs its item list, and because it is where the conversion waits for in-flight writers
to set its safe high-water mark. Rollback: the ``pg_partition_rollback`` DAG.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Param

from pg_partition.dag_factory.params import ADVANCED, CAPTURE, HOW_FAST, LAG, SAFETY, WHAT, optional, required
from pg_partition.operators.capture import ReplayChangesOperator, VerifyConversionOperator
from pg_partition.operators.convert import (
    ConvertFillOperator,
    ConvertIndexesOperator,
    ConvertPlanFillOperator,
    ConvertPreflightOperator,
    ConvertPrepOperator,
    ConvertReportOperator,
    ConvertSwapOperator,
)
from pg_partition.operators.convert_flow import ConvertAfterSwapOperator, ConvertPartitionsAndCaptureOperator

# The grid labels each mapped fill by the partitions it covers (the work group's key, e.g. "public.t_p202401 ..
# public.t_p202406 (6 partitions)") instead of 0..N. Passed to partial():
# BaseOperator.__init__ resets a class-level map_index_template to None.
FILL_LABEL = "{{ task.item['key'] if task.item is mapping else task.item }}"

# How often a deferred lag wait (a gated step's start, or a paused fill/replay) measures again, in the triggerer.
LAG_POLL_SECONDS = 30.0

DOC = """
### pg_partition_convert

Converts **table** into a table partitioned by RANGE on **column**, online: the application keeps reading and
writing it. pgslice's prep / add_partitions / fill / analyze / swap / fill --swapped, with:

* **preflight** refusals that change nothing (missing key, NULLs, incoming foreign keys, unique indexes without
  the column, leftovers of another conversion, ...) and a report (rows, size, rows per period, append-only,
  publications, replication slots);
* a **fill** of batches that *replace* their key range (safe to repeat) with a checkpoint committed in the same
  transaction, in a few mapped tasks (one for a small table, up to `fill_tasks`), each filling neighbouring
  partitions on `fill_sessions` sessions, resumable after a kill; it never misses a row committed late with a
  lower id (it waits for in-flight writers to fix a safe high-water mark);
* a **swap** in one short transaction under `lock_timeout` (with retries) that restores index names, moves
  sequence ownership or restarts identity, keeps grants, carries publication membership
  (`publish_via_partition_root`) and sends `NOTIFY pg_partition, '<table>'` so applications can reset schema caches;
* **change capture** for tables that take UPDATE/DELETE (`capture_changes`: auto/on/off): triggers installed
  before the fill record every changed key, **replay** applies them, **verify** compares every partition with
  its source range (count + content hash) and fails the run naming the partition and key ranges, and the swap
  applies the last changes under its lock. Without capture (append-only tables), **catch-up** copies rows
  written after the fill instead;
* **deferred indexes** (`defer_indexes`, on by default): the fill copies into partitions that carry only the
  key; the other indexes are then built per partition on 2 sessions and attached; ANALYZE runs alongside verify;
* **replication-lag gating** (`max_lag_bytes`, `max_lag_seconds`, `watch_slots`): the fill, the index builds and
  the swap check lag when they start and defer to the triggerer (no worker waits) while it is over the limit;
  the fill, replay and index builds pause before a batch while lag is high and defer when the pause exceeds
  `max_pause_seconds`;
* **report** of rows and sizes before/after and time per step.

Set **dry_run** to rehearse: every statement is logged, nothing changes. Rollback: trigger
**pg_partition_rollback** (unswap, then unprep; with its own dry run).
"""


def _params(default_conn_id: str) -> dict[str, Param]:
    """The Trigger form: sections what to convert / how fast / safety / change capture / replication lag /
    advanced; optional params are null by default (see :mod:`pg_partition.dag_factory.params`)."""
    return {
        "conn_id": required(default_conn_id, "string", "Airflow Postgres connection id.", WHAT,
                            examples=[default_conn_id]),
        "table": required("public.activities", "string",
                          "Table to convert, as schema.table (quote mixed case: \"Sales\".\"Orders\").", WHAT,
                          examples=["public.activities", '"Sales"."Orders"']),
        "column": required("created_at", "string", "Partition column: timestamp, timestamptz or date.", WHAT,
                           examples=["created_at"]),
        "period": required("month", "string", "Partition size. Bounds are UTC calendar periods.", WHAT,
                           enum=["day", "week", "month", "quarter", "year"]),
        "past": required(0, "integer", "Partitions to create before the current period (pgslice --past).", WHAT,
                         minimum=0),
        "future": required(3, "integer", "Partitions to create after the current period (pgslice --future).",
                           WHAT, minimum=0),
        "cover_data": required(True, "boolean", "Also create a partition for every period that holds rows "
                               "(matching `where`), from the data's min to max.", WHAT),
        "where": optional("string", "Optional row filter, one boolean SQL expression over the table's own "
                          "columns (e.g. created_at > now() - interval '2 years'): columns, constants, casts to "
                          "built-in types, AND/OR/NOT, comparisons, arithmetic, IN, BETWEEN, IS NULL, LIKE and a "
                          "short list of side-effect-free functions (now, date_trunc, lower, upper, coalesce, abs, "
                          "length, ...). Parsed with PostgreSQL's grammar (pglast), re-checked against pg_proc; what "
                          "runs is the re-printed tree, never the text; subqueries, other tables and volatile "
                          "functions are refused. A dry run does not run it. Empty: every row.", WHAT,
                          examples=["created_at > now() - interval '2 years'", "created_at >= '2024-01-01'"]),
        "batch_size": required(10_000, "integer", "Primary-key range per fill batch (one short transaction "
                               "each); also the keys per replay and catch-up batch.", HOW_FAST, minimum=1),
        "sleep_seconds": required(0, "number", "Pause between fill batches, in seconds (e.g. 0.1).", HOW_FAST,
                                  minimum=0),
        "defer_indexes": required(True, "boolean", "Create only the key before the fill and build the other "
                                  "indexes per partition after it, 2 at a time (a much faster fill; off: every "
                                  "index is maintained during the fill, as pgslice does).", HOW_FAST),
        "fill_tasks": required(2, "integer", "At most this many fill tasks: the partitions are packed, "
                               "neighbours together and balanced by rows, one task per 5,000,000 rows (a smaller "
                               "table gets one). Under a scheduler the tasks run side by side.", HOW_FAST,
                               minimum=1, maximum=64),
        "fill_sessions": required(2, "integer", "Database sessions per fill task, each copying one partition at a "
                                  "time (so at most fill_tasks x fill_sessions copy at once; 1 for the gentlest "
                                  "fill).", HOW_FAST, minimum=1, maximum=16),
        "throttle_ratio": optional("number", "Gentle mode: keep the application's latency, as the p90 age of its "
                                   "running statements in pg_stat_activity over the last second (or, when no "
                                   "application statement is visible to the conversion's role, e.g. without "
                                   "pg_read_all_stats/pg_monitor, a canary query's p90 over 5 s: a primary-key "
                                   "lookup on the table every 50 ms), under this multiple of its p90 before the "
                                   "conversion (measured once over 10 s by plan_fill and kept in the conversion's "
                                   "state; never under 3 ms), by pausing fill, replay, index builds and verify "
                                   "between batches (at most 4x the batch time, 5 s each). E.g. 1.5. Empty: no "
                                   "throttle.", HOW_FAST, minimum=1, examples=[1.5, 2]),
        "throttle_target_ms": optional("number", "Gentle mode with an absolute target: keep the judged signal's p90 "
                                       "(see throttle_ratio) under this many milliseconds (overrides "
                                       "throttle_ratio). Empty: none.", HOW_FAST, minimum=0.1, examples=[20]),
        "dry_run": required(False, "boolean", "Log every statement, change nothing.", SAFETY),
        "lock_timeout": required("2s", "string", "lock_timeout of every DDL on a live table (swap, attach); "
                                 "each lock wait gives up after this and retries with backoff. "
                                 "PostgreSQL units: 500ms, 2s, 1min.", SAFETY, examples=["500ms", "2s", "5s"]),
        "lock_retries": required(5, "integer", "Attempts per locked step.", SAFETY, minimum=1),
        "verify_after_swap": required(False, "boolean", "With change capture: after the swap, compare the retired "
                                      "table with the live one partition by partition once more (logged, never "
                                      "fails the run: rows changed since the swap differ legitimately; the verify "
                                      "before the swap is the gate). Reads both tables again.", SAFETY),
        "capture_changes": required("auto", ["string", "boolean"], "Change capture: auto (= on, the safe "
                                    "default), on, or off (append-only mode, pgslice's way: fill + catch-up; "
                                    "UPDATE/DELETE after a row was copied and ids reserved with nextval before the "
                                    "fill are NOT carried over). Cannot be on together with `where`.", CAPTURE,
                                    enum=["auto", "on", "off", True, False]),
        "replay_until_backlog_below": required(1000, "integer", "Replay captured changes until fewer than this "
                                               "many are waiting (after the fill, and again right before the "
                                               "swap).", CAPTURE, minimum=1),
        "max_lag_bytes": optional("integer", "Hold the fill, index builds and swap (checked when each starts) "
                                  "and pause "
                                  "fill/replay batches while a standby or watched replication slot lags more than "
                                  "this many bytes, e.g. 268435456 for 256 MB (empty: no gate).", LAG, minimum=0),
        "max_lag_seconds": optional("number", "The same gate on replay lag in seconds, e.g. 30 (empty: no gate).",
                                    LAG, minimum=0),
        "watch_slots": optional("array", "Replication slots the lag gate watches, one per line (empty: every "
                                "slot; [] none). A named slot that does not exist fails the gate.", LAG,
                                items={"type": "string"}),
        "max_pause_seconds": optional("number", "A fill/replay batch loop paused longer than this for lag "
                                      "defers to the triggerer (frees the worker) and resumes from its checkpoint "
                                      "(empty: never defer).", LAG, default=600, minimum=0),
        "primary_key": required("per_partition", "string", "per_partition: a primary key on each partition "
                                "(pgslice's way, id unique per partition only); composite: (key, column) on the "
                                "parent table.", ADVANCED, enum=["per_partition", "composite"]),
        "default_partition": required(False, "boolean", "Add a DEFAULT partition (rows outside every range and "
                                      "NULLs land there; handy in development databases).", ADVANCED),
        "tablespace": optional("string", "Optional tablespace for the new table and indexes (empty: the "
                               "database's default).", ADVANCED, examples=["pg_default"]),
    }


def build_convert_dag(dag_id: str = "pg_partition_convert", default_conn_id: str = "pg_demo") -> DAG:
    common: dict[str, Any] = {
        "conn_id": "{{ params.conn_id }}",
        "table": "{{ params.table }}",
        "column": "{{ params.column }}",
        "period": "{{ params.period }}",
        "primary_key": "{{ params.primary_key }}",
        "default_partition": "{{ params.default_partition }}",
        "defer_indexes": "{{ params.defer_indexes }}",
        "tablespace": "{{ params.tablespace }}",
        "lock_timeout": "{{ params.lock_timeout }}",
        "lock_retries": "{{ params.lock_retries }}",
        "dry_run": "{{ params.dry_run }}",
    }
    where = "{{ params['where'] }}"
    lag: dict[str, Any] = {
        "max_lag_bytes": "{{ params.max_lag_bytes }}",
        "max_lag_seconds": "{{ params.max_lag_seconds }}",
        "watch_slots": "{{ params.watch_slots }}",
    }
    batch_lag: dict[str, Any] = {**lag, "max_pause_seconds": "{{ params.max_pause_seconds }}",
                                 "lag_poll_seconds": LAG_POLL_SECONDS}
    pace: dict[str, Any] = {"throttle_ratio": "{{ params.throttle_ratio }}",
                            "throttle_target_ms": "{{ params.throttle_target_ms }}"}
    capture_mode = "{{ params.capture_changes }}"
    skip_ok = "none_failed"  # a skipped capture task (append-only) or catch-up (capture) must not stop the run

    with DAG(
        dag_id=dag_id,
        schedule=None,
        catchup=False,
        max_active_runs=4,  # runs on different tables side by side; same table: run claims + table lock
        tags=["pg-partition"],
        doc_md=DOC,
        params=_params(default_conn_id),
        default_args={"retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True},
    ) as dag:
        preflight = ConvertPreflightOperator(task_id="preflight", where=where, capture_changes=capture_mode,
                                             retries=0, **common)
        prep = ConvertPrepOperator(task_id="prep", retries=2, **common)
        add = ConvertPartitionsAndCaptureOperator(
            task_id="add_partitions", past="{{ params.past }}", future="{{ params.future }}",
            cover_data="{{ params.cover_data }}", where=where, capture_changes=capture_mode, retries=3, **common)
        plan = ConvertPlanFillOperator(task_id="plan_fill", where=where, batch_size="{{ params.batch_size }}",
                                       fill_tasks="{{ params.fill_tasks }}", retries=2, trigger_rule=skip_ok,
                                       **pace, **common)
        # retries: Airflow 3.3.2 can fail a deferred task whose trigger fires within seconds (apache/airflow#67287);
        # the fill, indexes and swap defer when lag is over the limit, and a retry resumes from the checkpoints
        fill = ConvertFillOperator.partial(
            task_id="fill", map_index_template=FILL_LABEL, batch_size="{{ params.batch_size }}",
            sleep_seconds="{{ params.sleep_seconds }}", sessions="{{ params.fill_sessions }}", retries=5,
            max_active_tis_per_dag=4, **batch_lag, **pace, **common,
        ).expand(item=plan.output)
        replay = ReplayChangesOperator(
            task_id="replay", conn_id=common["conn_id"], table=common["table"], dry_run=common["dry_run"],
            batch_size="{{ params.batch_size }}", until_backlog_below="{{ params.replay_until_backlog_below }}",
            skip_without_capture=True, retries=3, trigger_rule=skip_ok, **batch_lag, **pace)
        indexes = ConvertIndexesOperator(task_id="indexes", analyze=False, retries=2, trigger_rule=skip_ok,
                                         **batch_lag, **pace, **common)
        verify = VerifyConversionOperator(  # the gate in both modes; ANALYZE runs alongside on a second session
            task_id="verify", conn_id=common["conn_id"], table=common["table"], dry_run=common["dry_run"],
            against="intermediate", analyze=True, retries=1, trigger_rule=skip_ok, **batch_lag, **pace)
        swap = ConvertSwapOperator(task_id="swap", batch_size="{{ params.batch_size }}",
                                   replay_until_backlog_below="{{ params.replay_until_backlog_below }}",
                                   retries=3, **batch_lag, **pace, **common)  # all_success: verify is its gate
        # append-only: catch-up of rows written since the fill; with capture and verify_after_swap: retired vs live,
        # logged (rows the application changes after the swap differ legitimately; the pre-swap verify is the gate)
        after_swap = ConvertAfterSwapOperator(task_id="after_swap", batch_size="{{ params.batch_size }}",
                                              verify_after_swap="{{ params.verify_after_swap }}", retries=3,
                                              trigger_rule=skip_ok, **common)
        report = ConvertReportOperator(task_id="report", retries=1, trigger_rule=skip_ok, **common)
        (preflight >> prep >> add >> plan >> fill >> replay >> indexes >> verify >> swap >> after_swap >> report)
    return dag
