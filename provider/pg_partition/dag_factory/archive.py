"""The ``pg_partition_archive`` and ``pg_partition_restore`` DAGs.

``pg_partition_archive`` runs when rotation emits the ``ARCHIVE_PENDING`` Asset event (its ``extra`` carries
``{"conn_ids": [...]}``) and can be triggered by hand (``conn_ids`` param). Per connection it optionally queues
the ``<table>_retired`` tables a conversion left (``archive_retired`` param), waits until replication lag is within
limits (:class:`~pg_partition.sensors.lag.ReplicationLagSensor`, deferrable: the wait costs no worker slot), then
maps one archive task over every queue row that still needs work: pending ones, and failed or interrupted ones
(their retry). Each archive task streams the table to S3, verifies it, and only then drops it.

Why gate on lag: the DROP (and, for big tables, the long read snapshot that holds back vacuum) should not pile
onto replicas that are already behind; with no limit set the sensor passes at once and says so.

``pg_partition_restore`` brings one archive back, attached as a partition again or into a separate schema.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from airflow.sdk import DAG, get_current_context, task

from pg_partition.assets import ARCHIVE_PENDING
from pg_partition.core import archive
from pg_partition.dag_factory.params import ADVANCED, ARCHIVE, LAG, SAFETY, TARGET, optional, required
from pg_partition.hooks.partition import PartitionHook
from pg_partition.operators.archive import DEFAULT_AWS_CONN_ID, ArchivePartitionOperator, RestorePartitionOperator
from pg_partition.sensors.lag import ReplicationLagSensor

log = logging.getLogger("pg_partition")


def conn_ids_from_events(events: Mapping[Any, Iterable[Any]] | None, extra_ids: Sequence[str] = ()) -> list[str]:
    """Connection ids named by ``ARCHIVE_PENDING`` events (``extra["conn_ids"]``) plus ``extra_ids``, deduplicated.

    Events of other assets are ignored; a malformed ``extra`` is logged and skipped rather than failing the run.
    """
    out: list[str] = []
    for asset, asset_events in (events or {}).items():
        if getattr(asset, "name", None) != ARCHIVE_PENDING.name:
            continue
        for event in asset_events:
            extra = getattr(event, "extra", None) or {}
            ids = extra.get("conn_ids") if isinstance(extra, Mapping) else None
            if not isinstance(ids, list):
                log.warning("ignoring an %s event without a conn_ids list: %r", ARCHIVE_PENDING.name, extra)
                continue
            out += [str(i) for i in ids if i]
    out += [str(i) for i in extra_ids if i]
    return sorted(set(out))


def pending_rows(conn_ids: Sequence[str], retired: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Queue rows that need work on each connection (after queueing ``<table>_retired`` for ``retired``)."""
    rows: list[dict[str, Any]] = []
    for conn_id in conn_ids:
        with PartitionHook(postgres_conn_id=conn_id).open() as conn:
            for table in retired:
                queued = archive.enqueue_retired(conn, table)
                if queued is None:
                    log.info("%s: no retired table for %s (nothing to queue)", conn_id, table)
                else:
                    log.info("%s: queued the retired table of %s (queue id %s)", conn_id, table, queued)
            for row in archive.pending_queue(conn):
                log.info("%s: %s is %s (attempts %d)%s", conn_id, row.table, row.status, row.attempts,
                         f", last error: {row.last_error}" if row.last_error else "")
                rows.append({"conn_id": conn_id, "queue_id": row.id, "table": str(row.table)})
    return rows


def build_archive_dag(
    dag_id: str = "pg_partition_archive",
    *,
    bucket: str = "",
    prefix: str = archive.DEFAULT_PREFIX,
    format: str = "pg_dump",
    aws_conn_id: str = DEFAULT_AWS_CONN_ID,
    max_lag_bytes: str | None = None,
    max_lag_seconds: float | None = None,
    max_active_tis_per_dag: int = 4,
) -> DAG:
    """Build the archive DAG. The keyword arguments are the defaults of the DAG's params; queue rows written by
    rotation carry their own policy (bucket, prefix, format, drop, sse, aws_conn_id), which wins."""
    with DAG(
        dag_id=dag_id,
        schedule=[ARCHIVE_PENDING],
        catchup=False,
        max_active_runs=1,  # two runs would map over the same pending queue rows and fail on each other's claims
        tags=["pg-partition"],
        doc_md=__doc__,
        params={
            "conn_ids": optional("array", "Airflow Postgres connection ids to archive from, one per line, in "
                                 "addition to those named by the triggering ARCHIVE_PENDING events (empty: only "
                                 "those).", TARGET, items={"type": "string"}),
            "archive_retired": optional("array", "Tables (schema.table), one per line, whose <table>_retired, "
                                        "left by a conversion, should be queued and archived now.", TARGET,
                                        items={"type": "string"}),
            "dry_run": required(False, "boolean", "Only log what would be uploaded and dropped.", SAFETY),
            "drop": required(True, "boolean", "Drop each table after its archive is verified (when the row's "
                             "policy does not say).", SAFETY),
            "max_lag_bytes": optional(["string", "integer"], "Wait until replicas/slots are within this lag, "
                                      "bytes or with a unit (e.g. 256MB); empty: no byte limit.", LAG,
                                      default=max_lag_bytes or None, examples=["256MB", "1GB"]),
            "max_lag_seconds": optional("number", "Wait until standby replay lag is within this many seconds "
                                        "(e.g. 30); empty: no limit.", LAG, default=max_lag_seconds, minimum=0),
            "bucket": optional("string", "S3 bucket for rows queued without a policy (e.g. retired tables).",
                               ARCHIVE, default=bucket or None, examples=["pg-partition-archive"]),
            "prefix": required(prefix, "string", "Key prefix: prefix/<db>/<schema>/<table>/...", ARCHIVE,
                               examples=[archive.DEFAULT_PREFIX]),
            "format": required(format, "string", "pg_dump (custom format), parquet or csv (gzip), when the row has "
                               "none.", ARCHIVE, enum=list(archive.FORMATS)),
            "aws_conn_id": required(aws_conn_id, "string", "Airflow AWS connection (endpoint, credentials) when the "
                                    "row's policy does not name one.", ARCHIVE, examples=[DEFAULT_AWS_CONN_ID]),
            "sse": optional("string", "Server-side encryption when the row's policy does not say (empty: the "
                            "bucket's default).", ARCHIVE, enum=["AES256", "aws:kms"]),
            "kms_key_id": optional("string", "KMS key id for sse=aws:kms.", ARCHIVE,
                                   examples=["arn:aws:kms:us-east-1:111122223333:key/1234abcd-..."]),
            "pg_dump": optional("string", "Path of pg_dump (empty: the newest installed; it must be at least the "
                                "server's major version).", ADVANCED,
                                examples=["/usr/lib/postgresql/17/bin/pg_dump"]),
        },
    ) as dag:

        @task
        def find_connections() -> list[str]:
            """Connections from the triggering Asset events plus the ``conn_ids`` param."""
            ctx = get_current_context()
            conn_ids = conn_ids_from_events(ctx.get("triggering_asset_events"), ctx["params"].get("conn_ids") or [])
            log.info("archiving on %d connection(s): %s", len(conn_ids), ", ".join(conn_ids) or "(none)")
            return conn_ids

        @task
        def find_pending(conn_ids: list[str]) -> list[dict[str, Any]]:
            """Every queue row that needs work, as ``{conn_id, queue_id, table}`` for the mapped archive task."""
            ctx = get_current_context()
            rows = pending_rows(conn_ids, ctx["params"].get("archive_retired") or [])
            log.info("%d table(s) to archive", len(rows))
            return rows

        conn_ids = find_connections()
        gate = ReplicationLagSensor.partial(
            task_id="wait_for_replication_lag",
            map_index_template="{{ task.conn_id }}",
            max_lag_bytes="{{ params.max_lag_bytes }}",
            max_lag_seconds="{{ params.max_lag_seconds }}",
            poke_interval=30,
            timeout=6 * 3600,
        ).expand(conn_id=conn_ids)
        pending = find_pending(conn_ids)
        gate >> pending
        ArchivePartitionOperator.partial(
            task_id="archive",
            map_index_template="{{ task.table }}",  # the queued table (BaseOperator ignores a class attribute)
            max_active_tis_per_dag=max_active_tis_per_dag,
            aws_conn_id="{{ params.aws_conn_id }}",
            bucket="{{ params.bucket }}",
            prefix="{{ params.prefix }}",
            format="{{ params.format }}",
            drop="{{ params.drop }}",
            sse="{{ params.sse }}",
            kms_key_id="{{ params.kms_key_id }}",
            dry_run="{{ params.dry_run }}",
            pg_dump="{{ params.pg_dump }}",
        ).expand_kwargs(pending)
    return dag


def build_restore_dag(
    dag_id: str = "pg_partition_restore",
    *,
    default_conn_id: str = "pg_demo",
    bucket: str = "",
    prefix: str = archive.DEFAULT_PREFIX,
    aws_conn_id: str = DEFAULT_AWS_CONN_ID,
) -> DAG:
    """Build the restore DAG: one task, every choice a param with a description for the Trigger form."""
    with DAG(
        dag_id=dag_id,
        schedule=None,
        catchup=False,
        tags=["pg-partition"],
        doc_md=__doc__,
        params={
            "conn_id": required(default_conn_id, "string", "Airflow Postgres connection id.", TARGET,
                                examples=[default_conn_id]),
            "table": optional("string", "The partitioned parent, schema.table (with period); or empty when s3_key "
                              "is given (the manifest names the parent).", TARGET, examples=["public.activities"]),
            "period": optional("string", "Period label of the archive (with table).", TARGET,
                               examples=["2024-01", "2024-01-15", "2024-Q1", "2024"]),
            "s3_key": optional("string", "Instead of table+period: the object's or manifest's key, or "
                               "s3://bucket/key.", TARGET,
                               examples=["s3://pg-partition-archive/pg-partition/db/public/activities/..."]),
            "target": required("attach", "string", "attach: back as a partition (bounds checked, CHECK "
                               "pre-validated so ATTACH skips its scan); schema: a plain table in a separate schema "
                               "for ad-hoc queries.", TARGET, enum=["attach", "schema"]),
            "schema": required(archive.RESTORE_SCHEMA, "string", "Schema for target=schema.", TARGET,
                               examples=[archive.RESTORE_SCHEMA]),
            "dry_run": required(False, "boolean", "Only log the statements a restore would run.", SAFETY),
            "bucket": optional("string", "S3 bucket holding the archive (empty: the bucket of s3://... in "
                               "s3_key).", ARCHIVE, default=bucket or None, examples=["pg-partition-archive"]),
            "prefix": required(prefix, "string", "Key prefix used when archiving.", ARCHIVE,
                               examples=[archive.DEFAULT_PREFIX]),
            "format": optional("string", "Prefer this format when several archives exist (empty: pg_dump first).",
                               ARCHIVE, enum=list(archive.FORMATS)),
            "aws_conn_id": required(aws_conn_id, "string", "Airflow AWS connection id.", ARCHIVE,
                                    examples=[DEFAULT_AWS_CONN_ID]),
        },
    ) as dag:
        RestorePartitionOperator(
            task_id="restore",
            conn_id="{{ params.conn_id }}",
            table="{{ params.table }}",
            period="{{ params.period }}",
            s3_key="{{ params.s3_key }}",
            target="{{ params.target }}",
            schema="{{ params.schema }}",
            bucket="{{ params.bucket }}",
            prefix="{{ params.prefix }}",
            format="{{ params.format }}",
            aws_conn_id="{{ params.aws_conn_id }}",
            dry_run="{{ params.dry_run }}",
        )
    return dag
