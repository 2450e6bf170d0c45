"""Operators that report on tables without changing anything."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from pg_partition.core import advisor
from pg_partition.core.catalog import QualifiedName
from pg_partition.hooks.partition import PartitionHook


class AssessTableOperator(BaseOperator):
    """Size, shape and partitioning candidacy of one table; pushes the assessment as a dict to XCom."""

    template_fields: Sequence[str] = ("conn_id", "table", "memory_gb", "min_gb")

    def __init__(self, *, conn_id: str, table: str, memory_gb: float | str = 16, min_gb: float | str = 100,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.table = table
        self.memory_gb = memory_gb
        self.min_gb = min_gb

    def execute(self, context: Context) -> dict[str, Any]:
        with PartitionHook(postgres_conn_id=self.conn_id).open() as conn:
            result = advisor.assess(conn, QualifiedName.parse(self.table), memory_gb=float(self.memory_gb),
                                    min_gb=float(self.min_gb))
        self.log.info("%s", advisor.render(result))
        return result.as_dict()
