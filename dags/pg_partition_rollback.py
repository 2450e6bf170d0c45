"""Airflow DAG pg_partition_rollback: undo a conversion (unswap, then unprep), with dry_run.

Params: conn_id, table, column, drop_intermediate, dry_run (see the Trigger form or the README).
"""

from pg_partition.dag_factory.rollback import build_rollback_dag

dag = build_rollback_dag()
