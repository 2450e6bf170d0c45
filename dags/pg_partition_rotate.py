"""Airflow DAG pg_partition_rotate: premake, retention and health for every table in pg_partition.yaml.

The config file is pg_partition.yaml in the DAGs folder ([core] dags_folder), or [pg_partition] config_file
(or $PG_PARTITION_CONFIG). A config error becomes this file's import error, naming the config file, line and
field; the other DAGs load as usual.
"""

from pg_partition.dag_factory.rotate import build_rotate_dag

dag = build_rotate_dag()
