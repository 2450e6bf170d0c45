"""Airflow DAG pg_partition_convert: online conversion of a table to RANGE partitions.

preflight -> prep -> add_partitions (+ change capture) -> plan_fill -> lag_before_fill -> fill (mapped per
partition) -> replay -> lag_before_indexes -> indexes -> analyze -> verify -> lag_before_swap -> swap ->
after_swap (catch-up, or verify with capture) -> report. Trigger it with params (see the README or the Trigger form).
"""

from pg_partition.dag_factory.convert import build_convert_dag

dag = build_convert_dag()
