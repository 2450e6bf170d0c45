"""The ``pg_partition_rotate`` DAG: premake, retention and health for every table in the fleet config.

One DAG for the whole fleet, mapped over the config entries (dynamic task mapping), so adding a database is one
line in ``pg_partition.yaml``. Per entry, a mapped task group runs ``premake >> detach >> health``; detach and
health run even when an earlier step failed (``all_done``) because detaching is independent of premake and the
health check must report precisely when something went wrong. One table's failure never stops the others.

``announce_archive`` then emits one ``ARCHIVE_PENDING`` Asset event whose ``extra`` is ``{"conn_ids": [...]}``:
the connections with partitions waiting in their archive queue (it is skipped, so no event, when there are none
or in a dry run). The archive DAG schedules on that asset. It hangs off the detach tasks only, so the health
tasks stay leaves of the DAG and a failed health check fails the DAG run.

A config error raises :class:`pg_partition.config.ConfigError` at parse time: Airflow shows it as the import
error of this one DAG file (with file, line and field); the other DAGs are unaffected.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, TriggerRule, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowSkipException
from psycopg import sql

from pg_partition import settings
from pg_partition.assets import ARCHIVE_PENDING
from pg_partition.config import ConfigError, FleetConfig, TableConfig, is_due, load_config, previous_tick
from pg_partition.core.db import state
from pg_partition.core.params import parse_bool
from pg_partition.dag_factory.params import SAFETY, TARGET, optional, required
from pg_partition.hooks.partition import PartitionHook
from pg_partition.operators.rotate import (
    DetachExpiredPartitionsOperator,
    PartitionHealthOperator,
    PremakePartitionsOperator,
)

Callback = Callable[..., Any]
log = logging.getLogger("pg_partition")


def resolve_callback(path: str | None, source: str = "") -> Callback | None:
    """Import ``package.module.attr`` (a function, or a notifier instance) named in the config."""
    if not path:
        return None
    module_name, _, attr = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{source}: dag.on_failure_callback {path!r} cannot be imported: {exc}",
                          fix="put the module on the DAG processor's and workers' PYTHONPATH (e.g. in "
                          "plugins/ or the dags folder), or fix the dotted path") from None
    if not callable(target):
        raise ConfigError(f"{source}: dag.on_failure_callback {path!r} is not callable",
                          fix="point it at a function taking the task context, or at a notifier instance")
    return target  # type: ignore[no-any-return]


def select_due(entries: Sequence[dict[str, Any]], *, dag_schedule: str | None, run_type: str | None,
               logical_date: datetime | None, conn_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The entries this run handles: due by their own cron (scheduled runs), restricted to ``conn_ids``."""
    wanted = set(conn_ids)
    manual = run_type not in (None, "scheduled", "backfill")
    start = None if manual or logical_date is None else previous_tick(dag_schedule, logical_date)
    end = None if manual else logical_date
    return [e for e in entries
            if (not wanted or e["conn_id"] in wanted) and is_due(e.get("schedule"), start, end)]


def pending_conn_ids(conn_ids: Sequence[str]) -> list[str]:
    """Connections whose state schema holds archive-queue rows still 'pending'.

    A connection that cannot be read (unknown conn_id, database down) is logged and left out rather than raised:
    its own premake/detach tasks already fail the run, and raising here would withhold the archive event from
    every healthy database rotated in the same run (issue 15).
    """
    out = []
    queue = sql.Identifier(state.SCHEMA, "archive_queue")
    for conn_id in sorted(set(conn_ids)):
        try:
            with PartitionHook(postgres_conn_id=conn_id).open() as conn:
                exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (queue.as_string(conn),)).fetchone()
                if not (exists and exists[0]):
                    continue
                row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE status = 'pending'").format(
                    queue)).fetchone()
        except Exception as exc:  # one bad entry must not silence the others
            log.error("cannot read the archive queue of %s (left out of the archive event): %s: %s", conn_id,
                      type(exc).__name__, exc)
            continue
        if row and row[0]:
            out.append(conn_id)
    return out


def build_rotate_dag(
    dag_id: str = "pg_partition_rotate",
    *,
    config: FleetConfig | str | Path | None = None,
    on_failure_callback: Callback | list[Callback] | None = None,
) -> DAG:
    """Build the rotation DAG from the fleet config (``config``: a loaded config or a path; default:
    ``$PG_PARTITION_CONFIG``, else ``[pg_partition] config_file``, else pg_partition.yaml in ``[core]
    dags_folder``: Airflow's setting, not an environment variable). ``on_failure_callback`` (a function or
    notifier, or a list) overrides ``dag.on_failure_callback`` from the config; it is set on every task, so a
    failed health check pages whoever it names."""
    cfg = config if isinstance(config, FleetConfig) else load_config(config or settings.config_file())
    callback = on_failure_callback if on_failure_callback is not None else resolve_callback(
        cfg.dag.on_failure_callback, cfg.source)
    entries = [t.model_dump(mode="json") for t in cfg.enabled()]
    dag_schedule = cfg.dag.schedule
    tables = "\n".join(f"- `{t.conn_id}`: `{t.table}` ({t.period}, premake {t.premake}, retention "
                       f"{t.retention})" for t in cfg.enabled()) or "- (none)"
    with DAG(
        dag_id=dag_id,
        schedule=dag_schedule,
        catchup=False,
        max_active_runs=1,
        tags=["pg-partition"],
        doc_md=f"{__doc__}\n\nConfig: `{cfg.source}`\n\n{tables}\n",
        default_args={"on_failure_callback": callback} if callback else {},
        params={
            "dry_run": required(cfg.dag.dry_run, "boolean", "Only list what would be created, moved and detached.",
                                SAFETY),
            "conn_ids": optional("array", "Only these Airflow connection ids, one per line (empty: every entry "
                                 "that is due).", TARGET, items={"type": "string"}),
            "today": optional("string", "Rotate as of this date (YYYY-MM-DD); empty: the current UTC date.", TARGET,
                              format="date", examples=["2025-01-31"]),
        },
    ) as dag:

        @task
        def select_entries() -> list[dict[str, Any]]:
            """The config entries due in this run (all of them on a manual run), filtered by ``conn_ids``."""
            ctx = get_current_context()
            dag_run = ctx.get("dag_run")
            run_type = str(getattr(dag_run, "run_type", "") or "").lower() or None
            chosen = select_due(entries, dag_schedule=dag_schedule,
                                run_type=run_type, logical_date=ctx.get("logical_date"),
                                conn_ids=ctx["params"].get("conn_ids") or [])
            log.info("%d of %d config entries in this run: %s", len(chosen), len(entries),
                     ", ".join(TableConfig.model_validate(e).key for e in chosen))
            return chosen

        @task_group(group_id="rotate")  # type: ignore[untyped-decorator]
        def rotate_one(entry: dict[str, Any]) -> DetachExpiredPartitionsOperator:
            common: dict[str, Any] = {"entry": entry, "dry_run": "{{ params.dry_run }}",
                                      "today": "{{ params.today }}",
                                      # conn_id:table, set by the operator (BaseOperator ignores a class attribute)
                                      "map_index_template": "{{ pg_partition_target }}"}
            premake = PremakePartitionsOperator(task_id="premake", **common)
            detach = DetachExpiredPartitionsOperator(task_id="detach", trigger_rule=TriggerRule.ALL_DONE, **common)
            health = PartitionHealthOperator(task_id="health", trigger_rule=TriggerRule.ALL_DONE, **common)
            premake >> detach >> health
            return detach  # announce_archive hangs off detach, so a failed health check stays a leaf

        @task(outlets=[ARCHIVE_PENDING], trigger_rule=TriggerRule.ALL_DONE)  # type: ignore[untyped-decorator]
        def announce_archive(chosen: list[dict[str, Any]]) -> list[str]:
            """One Asset event for the archive DAG: ``extra={"conn_ids": [...]}`` with pending partitions."""
            ctx = get_current_context()
            if parse_bool(ctx["params"].get("dry_run"), what="dry_run"):
                raise AirflowSkipException("dry run: nothing was detached, no archive event")
            conn_ids = pending_conn_ids([e["conn_id"] for e in chosen])
            if not conn_ids:
                raise AirflowSkipException("no partition is waiting for archive: no event")
            ctx["outlet_events"][ARCHIVE_PENDING].extra = {"conn_ids": conn_ids}
            log.info("archive pending on: %s", ", ".join(conn_ids))
            return conn_ids

        chosen = select_entries()
        detach = rotate_one.expand(entry=chosen)
        detach >> announce_archive(chosen)
    return dag
