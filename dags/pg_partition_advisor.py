"""Airflow DAG pg_partition_advisor: a table's size and partitioning candidacy. Params: conn_id, table."""

from pg_partition.dag_factory.advisor import build_advisor_dag

dag = build_advisor_dag()
