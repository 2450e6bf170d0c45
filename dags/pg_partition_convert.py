"""Airflow DAG pg_partition_convert: online conversion of a table to RANGE partitions (preflight, prep,
add_partitions, plan_fill, fill per partition, indexes, analyze, swap, catch_up, report). Params: conn_id, table,
column, period, past, future, cover_data, batch_size, where, sleep_seconds, primary_key, default_partition,
defer_indexes, lock_timeout, dry_run, ..."""

from pg_partition.dag_factory.convert import build_convert_dag

dag = build_convert_dag()
