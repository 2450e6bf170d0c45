"""CostReportOperator: sizes before/after, bytes in S3 and monthly cost, as a Markdown table and a PNG chart.

Run it after a conversion (the retired table is the "before") and after every archive run (the S3 bytes grow, the
database bytes shrink). Each run records its measurement in the state schema, so the chart's time series grows
run by run whichever worker renders it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator, Context

from pg_partition.core.advise import cost
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.params import is_none, parse_bool
from pg_partition.hooks.partition import PartitionHook

DEFAULT_PREFIX = "pg-partition"  # pg_partition.config.ArchivePolicy's default prefix




class CostReportOperator(BaseOperator):
    """Measure ``table`` (+ retired table + detached partitions awaiting archive) and its archive in S3.

    :param conn_id: Airflow Postgres connection id.
    :param table: the (partitioned) table, ``schema.table``.
    :param aws_conn_id, bucket, prefix: where the archive lives. When ``bucket`` is empty they are taken from
        the table's entry in the fleet config (``archive:``) if it has one; without a bucket, S3 bytes count as
        0 and the chart is only logged as produced, not stored.
    :param s3_prefixes: override the archive folder(s) to sum (default ``<prefix>/<db>/<schema>/<table>/``).
    :param price_database, price_backups, price_s3: USD per GB-month (talk's defaults 0.115 / 0.095 / 0.025).
    :param before_bytes: the "before" database size, if known better than the recorded history.
    :param record: store this measurement for the time series (in the state schema's ``checkpoints``).
    Returns the report as a dict (``cost.CostReport.as_dict()`` plus ``chart_uri`` / ``markdown_uri``).
    """

    template_fields: Sequence[str] = (
        "conn_id", "table", "aws_conn_id", "bucket", "prefix", "s3_prefixes", "price_database", "price_backups",
        "price_s3", "before_bytes", "record",
    )
    ui_color = "#fff2cc"

    def __init__(self, *, conn_id: str, table: str, aws_conn_id: str | None = None, bucket: str | None = None,
                 prefix: str | None = None, s3_prefixes: list[str] | str | None = None,
                 price_database: float | str = cost.Prices.database, price_backups: float | str = cost.Prices.backups,
                 price_s3: float | str = cost.Prices.s3, before_bytes: int | str | None = None,
                 record: bool | str = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.table = table
        self.aws_conn_id = aws_conn_id
        self.bucket = bucket
        self.prefix = prefix
        self.s3_prefixes = s3_prefixes
        self.price_database = price_database
        self.price_backups = price_backups
        self.price_s3 = price_s3
        self.before_bytes = before_bytes
        self.record = record

    def prices(self) -> cost.Prices:
        return cost.Prices(float(self.price_database), float(self.price_backups), float(self.price_s3))

    def archive_location(self) -> tuple[str | None, str | None, str]:
        """(aws_conn_id, bucket, prefix): the arguments, else the fleet config's archive policy for the table."""
        aws, bucket, prefix = self.aws_conn_id, self.bucket, self.prefix
        if is_none(bucket):
            policy = self._config_policy()
            if policy is not None:
                aws = aws if not is_none(aws) else policy.aws_conn_id
                bucket = policy.bucket
                prefix = prefix if not is_none(prefix) else policy.prefix
        return (None if is_none(aws) else str(aws), None if is_none(bucket) else str(bucket),
                DEFAULT_PREFIX if prefix is None or str(prefix) == "None" else str(prefix))

    def _config_policy(self) -> Any:
        try:
            from pg_partition import settings
            from pg_partition.config import load_config

            entry = load_config(settings.config_file()).find(self.conn_id, self.table)
        except Exception as exc:  # no config file, or one with errors: the report does not need it
            self.log.info("no archive location from the fleet config (%s)", str(exc).splitlines()[0])
            return None
        return entry.archive if entry is not None else None

    def execute(self, context: Context) -> dict[str, Any]:
        table = QualifiedName.parse(self.table)
        aws_conn_id, bucket, prefix = self.archive_location()
        s3_client = None
        if bucket:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            s3_client = S3Hook(aws_conn_id=aws_conn_id or "aws_default").get_conn()
        ti = context["ti"]
        record = parse_bool(self.record, what="record")
        snapshot_id = f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}" if record else None
        with PartitionHook(postgres_conn_id=self.conn_id).open() as conn:
            usage = None
            if s3_client is not None and bucket:
                prefixes = self._prefixes(prefix, str(conn.info.dbname), table)
                usage = cost.s3_usage(s3_client, bucket, prefixes)
            report = cost.build_report(
                conn, table, s3=usage, prices=self.prices(),
                before_bytes=None if is_none(self.before_bytes) else int(str(self.before_bytes)),
                snapshot_id=snapshot_id)
        markdown = cost.render_markdown(report)
        self.log.info("\n%s", markdown)
        png = cost.render_chart(report)
        result = report.as_dict()
        result.update(chart_bytes=len(png), chart_uri=None, markdown_uri=None)
        if s3_client is not None and bucket:
            at = datetime.fromisoformat(report.after.taken_at)
            key = cost.report_key(prefix, table, at)
            md_key = cost.report_key(prefix, table, at, "md")
            s3_client.put_object(Bucket=bucket, Key=key, Body=png, ContentType="image/png")
            s3_client.put_object(Bucket=bucket, Key=md_key, Body=markdown.encode(),
                                 ContentType="text/markdown; charset=utf-8")
            result.update(chart_uri=f"s3://{bucket}/{key}", markdown_uri=f"s3://{bucket}/{md_key}")
            self.log.info("cost chart: s3://%s/%s (report: s3://%s/%s)", bucket, key, bucket, md_key)
        else:
            self.log.info("cost chart rendered (%d bytes PNG) but not stored: no archive bucket configured",
                          len(png))
        return result

    def _prefixes(self, prefix: str, database: str, table: QualifiedName) -> tuple[str, ...]:
        given = self.s3_prefixes
        if isinstance(given, str) and not is_none(given):
            return tuple(p.strip() for p in given.split(",") if p.strip())
        if isinstance(given, list | tuple) and given:
            return tuple(str(p) for p in given)
        return cost.archive_prefixes(prefix, database, table)
