"""The ``pg_partition_rollback`` DAG: undo a conversion, swapped or not, with a dry run.

    unswap -> unprep

``unswap`` makes the original table live again when the conversion was swapped (rows the application inserted
into the partitioned table since the swap are copied back first, under the same short ``lock_timeout`` with
retries as the swap); on a conversion that was never swapped it does nothing. ``unprep`` then removes change
capture and drops ``<table>_intermediate`` and forgets the conversion (skipped when ``drop_intermediate`` is
off, e.g. to inspect the partitioned copy first). Both are idempotent: a failed run is fixed by clearing the
failed task. ``dry_run`` logs every statement and changes nothing.

Why a DAG and not only operators: the people who run conversions work in the Airflow UI; a rollback they cannot
trigger from there is a rollback they do not have at 3 am.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Context
from airflow.sdk.exceptions import AirflowSkipException

from pg_partition.core import convert
from pg_partition.core.params import parse_bool
from pg_partition.dag_factory.params import SAFETY, WHAT, required
from pg_partition.operators.convert import ConvertUnprepOperator, ConvertUnswapOperator

DOC = __doc__


class RollbackUnprepOperator(ConvertUnprepOperator):
    """:class:`ConvertUnprepOperator` that skips (nothing dropped) when ``drop_intermediate`` renders false."""

    template_fields: Sequence[str] = (*ConvertUnprepOperator.template_fields, "drop_intermediate")

    def __init__(self, *, drop_intermediate: bool | str = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.drop_intermediate = drop_intermediate

    def execute(self, context: Context) -> dict[str, Any]:
        if not parse_bool(self.drop_intermediate, what="drop_intermediate"):
            raise AirflowSkipException("drop_intermediate is off: the intermediate table and the conversion's "
                                       "state are kept")
        if self.is_dry_run:
            with self.run_step() as (ex, spec):
                if convert.is_swapped(ex.conn, spec):
                    # the engine refuses unprep while swapped; in a rehearsal the unswap was only logged
                    raise AirflowSkipException(
                        f"dry run: {spec.table} is still swapped (the unswap above was only rehearsed); after a "
                        f"real unswap this step removes change capture, drops {spec.intermediate} and forgets "
                        "the conversion")
        return super().execute(context)


def build_rollback_dag(dag_id: str = "pg_partition_rollback", default_conn_id: str = "pg_demo") -> DAG:
    common: dict[str, Any] = {
        "conn_id": "{{ params.conn_id }}",
        "table": "{{ params.table }}",
        "column": "{{ params.column }}",
        "lock_timeout": "{{ params.lock_timeout }}",
        "lock_retries": "{{ params.lock_retries }}",
        "dry_run": "{{ params.dry_run }}",
    }
    with DAG(
        dag_id=dag_id,
        schedule=None,
        catchup=False,
        max_active_runs=4,  # runs on different tables side by side; same table: run claims + table lock
        tags=["pg-partition"],
        doc_md=DOC,
        params={
            "conn_id": required(default_conn_id, "string", "Airflow Postgres connection id.", WHAT,
                                examples=[default_conn_id]),
            "table": required("public.activities", "string", "The converted table (the name the application "
                              "uses), as schema.table.", WHAT, examples=["public.activities"]),
            "column": required("created_at", "string", "The partition column the conversion used.", WHAT,
                               examples=["created_at"]),
            "drop_intermediate": required(True, "boolean", "After unswap, drop <table>_intermediate (the "
                                          "partitioned copy), remove change capture and forget the conversion. "
                                          "Off: keep them to inspect.", WHAT),
            "dry_run": required(False, "boolean", "Log every statement, change nothing.", SAFETY),
            "lock_timeout": required("2s", "string", "lock_timeout of the unswap and the DROP; each lock wait "
                                     "gives up after this and retries with backoff.", SAFETY,
                                     examples=["500ms", "2s", "5s"]),
            "lock_retries": required(5, "integer", "Attempts per locked step.", SAFETY, minimum=1),
        },
        default_args={"retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True},
    ) as dag:
        unswap = ConvertUnswapOperator(task_id="unswap", retries=2, **common)
        unprep = RollbackUnprepOperator(task_id="unprep", retries=2,
                                        drop_intermediate="{{ params.drop_intermediate }}", **common)
        unswap >> unprep
    return dag
