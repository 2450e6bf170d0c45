"""The ``pg_partition_convert`` DAG: online conversion of one table to RANGE partitions, triggered with params.

    preflight -> prep -> add_partitions -> plan_fill -> fill (mapped, one task per partition) -> indexes
    -> analyze -> swap (catch-up, then the short locked swap) -> catch_up -> report

Every task is idempotent and resumes from the state recorded in the database, so a failed run is fixed by
clearing the failed task (or triggering the DAG again with the same params). ``plan_fill`` is a task of its own
(not in the issue's list) because the mapped fill needs its item list, and because it is where the conversion
waits for in-flight writers to set its safe high-water mark.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Param

from pg_partition.operators.convert import (
    ConvertAddPartitionsOperator,
    ConvertAnalyzeOperator,
    ConvertCatchUpOperator,
    ConvertFillOperator,
    ConvertIndexesOperator,
    ConvertPlanFillOperator,
    ConvertPreflightOperator,
    ConvertPrepOperator,
    ConvertReportOperator,
    ConvertSwapOperator,
)

DOC = """
### pg_partition_convert

Converts **table** into a table partitioned by RANGE on **column**, online: the application keeps reading and
writing it. pgslice's prep / add_partitions / fill / analyze / swap / fill --swapped, with:

* **preflight** refusals that change nothing (missing key, NULLs, incoming foreign keys, unique indexes without
  the column, leftovers of another conversion, ...) and a report (rows, size, rows per period, append-only,
  publications, replication slots);
* a **fill** of batches that *replace* their key range (safe to repeat) with a checkpoint committed in the same
  transaction, one mapped task per partition, resumable after a kill; it never misses a row committed late with a
  lower id (it waits for in-flight writers to fix a safe high-water mark);
* a **swap** in one short transaction under `lock_timeout` (with retries) that restores index names, moves
  sequence ownership or restarts identity, keeps grants, carries publication membership
  (`publish_via_partition_root`) and sends `NOTIFY pg_partition, '<table>'` so applications can reset schema caches;
* **catch-up** of rows written after the fill; **report** of rows and sizes before/after and time per step.

Set **dry_run** to rehearse: every statement is logged, nothing changes. Rollback: `ConvertUnswapOperator`
then `ConvertUnprepOperator` (or `pg_partition.core.convert.unswap/unprep`).
"""


def _params(default_conn_id: str) -> dict[str, Param]:
    return {
        "conn_id": Param(default_conn_id, type="string", description="Airflow Postgres connection id."),
        "table": Param("public.activities", type="string",
                       description="Table to convert, as schema.table (quote mixed case: \"Sales\".\"Orders\")."),
        "column": Param("created_at", type="string",
                        description="Partition column: timestamp, timestamptz or date."),
        "period": Param("month", type="string", enum=["day", "week", "month", "quarter", "year"],
                        description="Partition size. Bounds are UTC calendar periods."),
        "past": Param(0, type="integer", minimum=0,
                      description="Partitions to create before the current period (pgslice --past)."),
        "future": Param(3, type="integer", minimum=0,
                        description="Partitions to create after the current period (pgslice --future)."),
        "cover_data": Param(True, type="boolean",
                            description="Also create a partition for every period that holds rows (matching "
                            "`where`), from the data's min to max."),
        "batch_size": Param(10_000, type="integer", minimum=1,
                            description="Primary-key range per fill batch (one short transaction each)."),
        "where": Param("", type="string",
                       description="Optional row filter, one boolean SQL expression over the table's columns "
                       "(e.g. created_at > now() - interval '2 years'); validated by PostgreSQL before use."),
        "sleep_seconds": Param(0, type="number", minimum=0, description="Pause between fill batches."),
        "primary_key": Param("per_partition", type="string", enum=["per_partition", "composite"],
                             description="per_partition: a primary key on each partition (pgslice's way, id "
                             "unique per partition only); composite: (key, column) on the parent table."),
        "default_partition": Param(False, type="boolean",
                                   description="Add a DEFAULT partition (rows outside every range and NULLs "
                                   "land there; handy in development databases)."),
        "defer_indexes": Param(False, type="boolean",
                               description="Create only the key before the fill and the other indexes after it "
                               "(faster fill)."),
        "tablespace": Param("", type="string", description="Optional tablespace for the new table and indexes."),
        "lock_timeout": Param("2s", type="string",
                              description="lock_timeout of every DDL on a live table (swap, attach); each lock "
                              "wait gives up after this and retries with backoff."),
        "lock_retries": Param(5, type="integer", minimum=1, description="Attempts per locked step."),
        "max_lag_bytes": Param(None, type=["null", "integer"], minimum=0,
                               description="Pause the fill while a standby or replication slot lags more "
                               "than this many bytes (empty: no gate)."),
        "max_lag_seconds": Param(None, type=["null", "number"], minimum=0,
                                 description="Pause the fill while replay lag exceeds this many seconds."),
        "dry_run": Param(False, type="boolean", description="Log every statement, change nothing."),
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
    with DAG(
        dag_id=dag_id,
        schedule=None,
        catchup=False,
        max_active_runs=1,
        tags=["pg-partition"],
        doc_md=DOC,
        params=_params(default_conn_id),
        default_args={"retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True},
    ) as dag:
        preflight = ConvertPreflightOperator(task_id="preflight", where=where, retries=0, **common)
        prep = ConvertPrepOperator(task_id="prep", retries=2, **common)
        add = ConvertAddPartitionsOperator(
            task_id="add_partitions", past="{{ params.past }}", future="{{ params.future }}",
            cover_data="{{ params.cover_data }}", where=where, retries=3, **common)
        plan = ConvertPlanFillOperator(task_id="plan_fill", where=where, batch_size="{{ params.batch_size }}",
                                       retries=2, **common)
        fill = ConvertFillOperator.partial(
            task_id="fill", batch_size="{{ params.batch_size }}", sleep_seconds="{{ params.sleep_seconds }}",
            max_lag_bytes="{{ params.max_lag_bytes }}", max_lag_seconds="{{ params.max_lag_seconds }}",
            retries=5, max_active_tis_per_dag=4, **common,
        ).expand(item=plan.output)
        indexes = ConvertIndexesOperator(task_id="indexes", retries=2, trigger_rule="none_failed", **common)
        analyze = ConvertAnalyzeOperator(task_id="analyze", retries=2, **common)
        swap = ConvertSwapOperator(task_id="swap", batch_size="{{ params.batch_size }}", retries=3, **common)
        catch_up = ConvertCatchUpOperator(task_id="catch_up", batch_size="{{ params.batch_size }}", retries=3,
                                          **common)
        report = ConvertReportOperator(task_id="report", retries=1, **common)
        preflight >> prep >> add >> plan >> fill >> indexes >> analyze >> swap >> catch_up >> report
    return dag
