"""The ``pg_partition_advisor`` DAG (which tables to partition, and how) and ``pg_partition_cost_report``
(what partitioning and archiving saved). Both only read the database (the cost report also records its own
measurement in the state schema, for its time series)."""

from __future__ import annotations

from airflow.sdk import DAG

from pg_partition.dag_factory.params import ADVANCED, ARCHIVE, TARGET, optional, required
from pg_partition.operators.advisor import AdvisorOperator
from pg_partition.operators.cost import DEFAULT_PREFIX, CostReportOperator

ADVISOR_DOC = """
### pg_partition_advisor

The talk's "SQL goodie bag" without hand-written queries. Leave **table** empty (or set **scope** to
`database`) to list the largest tables of the database with heap/index/TOAST sizes, write pattern
(`pg_stat_user_tables` inserts vs updates/deletes), usable time column and integer key, rows and bytes per
month, and candidacy (size >= **memory_gb**, or >= **min_gb**). Give a **table** for one table in depth: its
`CREATE INDEX` statements (for a deferred index rebuild) and, when partitioned, row counts and sizes per
partition.

For each candidate the log (and the XCom) holds a fleet-config entry for rotation (paste into
`dags/pg_partition.yaml`) and a ready `pg_partition_convert` params JSON (lines starting with `CONVERT`).
Read-only: safe on production at any time.
"""

COST_DOC = """
### pg_partition_cost_report

Size before/after (heap + indexes + TOAST, partitions summed, plus a retired table and detached partitions that
still wait for the archive), bytes archived in S3 and the monthly cost before/after at the given prices per
GB-month (defaults from the talk: RDS storage $0.115, backups $0.095, S3 $0.025). Logs a Markdown table and
stores a PNG chart (size per partition; database vs S3 over time) at
`s3://<bucket>/<prefix>/reports/<schema.table>/cost-<time>.png`, beside the archive's manifests.
Run it after a conversion and after each archive run.
"""


def build_advisor_dag(dag_id: str = "pg_partition_advisor", default_conn_id: str = "pg_demo") -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=None,
        catchup=False,
        tags=["pg-partition"],
        doc_md=ADVISOR_DOC,
        params={
            "conn_id": required(default_conn_id, "string", "Airflow Postgres connection id.", TARGET,
                                examples=[default_conn_id]),
            "table": optional("string", "Table to assess, as schema.table (quote mixed case: \"S\".\"T\"). "
                              "Empty: survey the largest tables of the whole database.", TARGET,
                              examples=["public.activities", '"Sales"."Orders"']),
            "scope": required("auto", "string", "auto: the table if one is given, else the database; table; "
                              "database.", TARGET, enum=["auto", "table", "database"]),
            "time_column": optional("string", "Column to partition on (one table only). Empty: created_at, else "
                                    "the best NOT NULL, indexed timestamp/date column.", TARGET,
                                    examples=["created_at"]),
            "limit": required(10, "integer", "Database survey: how many of the largest tables to assess.", TARGET,
                              minimum=1, maximum=1000),
            "memory_gb": required(16, "number", "Server memory in GB: a table larger than this is a candidate "
                                  "(the PostgreSQL docs' rule of thumb).", ADVANCED, minimum=0),
            "min_gb": required(100, "number", "Size in GB from which a table is a candidate whatever the memory "
                               "(postgres.fm's rule of thumb).", ADVANCED, minimum=0),
            "append_only_ratio": required(0.01, "number", "(updates + deletes) / inserts at or below which a "
                                          "table counts as append-only.", ADVANCED, minimum=0),
            "update_heavy_ratio": required(0.1, "number", "(updates + deletes) / inserts at or above which a table "
                                           "counts as update-heavy.", ADVANCED, minimum=0),
            "premake": required(3, "integer", "Future partitions in the recommended rotation entry and the convert "
                                "params (future).", ADVANCED, minimum=1),
            "retention_months": required(24, "integer", "Months of data the recommended rotation entry keeps "
                                         "(the talk kept 2 years). 0: keep everything.", ADVANCED, minimum=0),
            "exact_counts": required(False, "boolean", "Partitioned table: count(*) each partition besides the "
                                     "planner estimate (reads every partition).", ADVANCED),
        },
    ) as dag:
        AdvisorOperator(
            task_id="assess",
            conn_id="{{ params.conn_id }}",
            table="{{ params.table }}",
            scope="{{ params.scope }}",
            memory_gb="{{ params.memory_gb }}",
            min_gb="{{ params.min_gb }}",
            limit="{{ params.limit }}",
            append_only_ratio="{{ params.append_only_ratio }}",
            update_heavy_ratio="{{ params.update_heavy_ratio }}",
            time_column="{{ params.time_column }}",
            premake="{{ params.premake }}",
            retention_months="{{ params.retention_months }}",
            exact_counts="{{ params.exact_counts }}",
        )
    return dag


def build_cost_report_dag(dag_id: str = "pg_partition_cost_report", default_conn_id: str = "pg_demo",
                          bucket: str | None = None) -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=None,
        catchup=False,
        tags=["pg-partition"],
        doc_md=COST_DOC,
        params={
            "conn_id": required(default_conn_id, "string", "Airflow Postgres connection id.", TARGET,
                                examples=[default_conn_id]),
            "table": required("public.activities", "string", "The table, as schema.table.", TARGET,
                              examples=["public.activities"]),
            "aws_conn_id": required("aws_default", "string", "Airflow AWS connection id.", ARCHIVE,
                                    examples=["aws_default"]),
            "bucket": optional("string", "Archive bucket. Empty: the table's archive policy in the fleet config; "
                               "none there: S3 counts as 0 and the chart is not stored.", ARCHIVE,
                               default=bucket or None, examples=["pg-partition-archive"]),
            "prefix": required(DEFAULT_PREFIX, "string", "Archive key prefix (objects under "
                               "<prefix>/<db>/<schema>/<table>/).", ARCHIVE, examples=[DEFAULT_PREFIX]),
            "price_database": required(0.115, "number", "Database storage, USD per GB-month (RDS gp2: 0.115).",
                                       ADVANCED, minimum=0),
            "price_backups": required(0.095, "number", "Backup storage, USD per GB-month (RDS: 0.095).", ADVANCED,
                                      minimum=0),
            "price_s3": required(0.025, "number", "S3 storage, USD per GB-month (S3 Standard: 0.025).", ADVANCED,
                                 minimum=0),
            "before_bytes": optional("integer", "Database bytes before, if known (else: first recorded "
                                     "measurement or the retired table), e.g. 1099511627776 for 1 TiB.", ADVANCED,
                                     minimum=0),
        },
    ) as dag:
        CostReportOperator(
            task_id="cost_report",
            conn_id="{{ params.conn_id }}",
            table="{{ params.table }}",
            aws_conn_id="{{ params.aws_conn_id }}",
            bucket="{{ params.bucket }}",
            prefix="{{ params.prefix }}",
            price_database="{{ params.price_database }}",
            price_backups="{{ params.price_backups }}",
            price_s3="{{ params.price_s3 }}",
            before_bytes="{{ params.before_bytes }}",
        )
    return dag
