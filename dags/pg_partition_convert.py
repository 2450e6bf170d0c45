"""Airflow DAG pg_partition_convert: online conversion of a table to RANGE partitions.

preflight -> prep -> add_partitions (+ change capture) -> plan_fill -> fill (mapped: a few tasks, each filling
neighbouring partitions) -> replay -> indexes (+ analyze) -> verify -> swap -> after_swap (catch-up, or verify
with capture) -> report; the fill, indexes and swap check replication lag when they start. Trigger it with params
(see the README or the Trigger form).
"""

from pg_partition.dag_factory.convert import build_convert_dag

dag = build_convert_dag()
