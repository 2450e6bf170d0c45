"""Airflow DAGs pg_partition_advisor (which tables to partition, and how: one table or the whole database) and
pg_partition_cost_report (sizes before/after, S3 bytes, monthly cost, chart). Params: conn_id, table, ..."""

from pg_partition.dag_factory.advisor import build_advisor_dag, build_cost_report_dag

dag = build_advisor_dag()
cost_dag = build_cost_report_dag()
