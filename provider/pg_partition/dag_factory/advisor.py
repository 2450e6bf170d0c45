"""The ``pg_partition_advisor`` DAG: is a table worth partitioning, and how big is it?"""

from __future__ import annotations

from airflow.sdk import DAG, Param

from pg_partition.operators.advisor import AssessTableOperator


def build_advisor_dag(dag_id: str = "pg_partition_advisor", default_conn_id: str = "pg_demo") -> DAG:
    with DAG(
        dag_id=dag_id,
        schedule=None,
        catchup=False,
        tags=["pg-partition"],
        doc_md=__doc__,
        params={
            "conn_id": Param(default_conn_id, type="string", description="Airflow Postgres connection id."),
            "table": Param("public.activities", type="string",
                           description="Table to assess, as schema.table (quote mixed case: \"S\".\"T\")."),
            "memory_gb": Param(16, type="number", minimum=0,
                               description="Server memory in GB: a table larger than this is a candidate."),
            "min_gb": Param(100, type="number", minimum=0,
                            description="Size in GB from which a table is a candidate whatever the memory."),
        },
    ) as dag:
        AssessTableOperator(
            task_id="assess",
            conn_id="{{ params.conn_id }}",
            table="{{ params.table }}",
            memory_gb="{{ params.memory_gb }}",
            min_gb="{{ params.min_gb }}",
        )
    return dag
