"""Operators that report on tables without changing anything: the advisor (one table or a whole database)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from pg_partition.core.advise import advisor
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.params import is_none, parse_bool
from pg_partition.hooks.partition import PartitionHook

SCOPES = ("auto", "table", "database")




class AdvisorOperator(BaseOperator):
    """Partitioning advice: one table (``scope="table"``) or the largest tables of the database.

    ``scope="auto"`` (the default) assesses ``table`` when one is given and surveys the database otherwise.
    Logs a readable report (sizes, write pattern, candidacy, CREATE INDEX statements, partition stats, a fleet
    config YAML snippet and ready ``pg_partition_convert`` params) and returns it as a dict to XCom: for one
    table the assessment itself (``advisor.Assessment.as_dict()`` with ``scope: "table"``), for a database
    ``advisor.Survey.as_dict()``. Read-only: safe to run against production at any time.
    """

    template_fields: Sequence[str] = (
        "conn_id", "table", "scope", "memory_gb", "min_gb", "limit", "append_only_ratio", "update_heavy_ratio",
        "time_column", "premake", "retention_months", "exact_counts",
    )
    ui_color = "#e8f4d9"

    def __init__(self, *, conn_id: str, table: str | None = None, scope: str = "auto",
                 memory_gb: float | str = 16, min_gb: float | str = 100, limit: int | str = 10,
                 append_only_ratio: float | str = 0.01, update_heavy_ratio: float | str = 0.1,
                 time_column: str | None = None, premake: int | str = 3, retention_months: int | str | None = 24,
                 exact_counts: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.table = table
        self.scope = scope
        self.memory_gb = memory_gb
        self.min_gb = min_gb
        self.limit = limit
        self.append_only_ratio = append_only_ratio
        self.update_heavy_ratio = update_heavy_ratio
        self.time_column = time_column
        self.premake = premake
        self.retention_months = retention_months
        self.exact_counts = exact_counts

    def resolved_scope(self) -> str:
        scope = str(self.scope or "auto").strip().lower()
        if scope not in SCOPES:
            raise InvalidInputError(f"unknown scope {self.scope!r}", where=self.task_id,
                                    fix="use auto (table if given, else database), table or database")
        if scope == "auto":
            return "database" if is_none(self.table) else "table"
        if scope == "table" and is_none(self.table):
            raise InvalidInputError("scope is 'table' but no table was given", where=self.task_id,
                                    fix="set the table param (schema.table), or use scope database")
        return scope

    def thresholds(self) -> advisor.Thresholds:
        return advisor.Thresholds(memory_gb=float(self.memory_gb), min_gb=float(self.min_gb),
                                  append_only_ratio=float(self.append_only_ratio),
                                  update_heavy_ratio=float(self.update_heavy_ratio))

    def recipe(self) -> advisor.Recipe:
        months = None if is_none(self.retention_months) or int(str(self.retention_months)) <= 0 \
            else int(str(self.retention_months))
        return advisor.Recipe(premake=int(str(self.premake)), retention_months=months)

    def execute(self, context: Context) -> dict[str, Any]:
        scope = self.resolved_scope()
        with PartitionHook(postgres_conn_id=self.conn_id).open() as conn:
            if scope == "table":
                a = advisor.advise(conn, QualifiedName.parse(str(self.table)), conn_id=self.conn_id,
                                   thresholds=self.thresholds(), recipe=self.recipe(),
                                   time_column=None if is_none(self.time_column) else str(self.time_column),
                                   exact_counts=parse_bool(self.exact_counts, what="exact_counts"))
                self.log.info("%s", advisor.render(a))
                self._log_recommendations([a])
                return {"scope": "table", **a.as_dict()}
            s = advisor.survey(conn, conn_id=self.conn_id, limit=int(str(self.limit)),
                               thresholds=self.thresholds(), recipe=self.recipe())
        self.log.info("%s", advisor.render_survey(s))
        self._log_recommendations(s.tables)
        return s.as_dict()

    def _log_recommendations(self, tables: list[advisor.Assessment]) -> None:
        """One greppable line per recommendation, so a params JSON can be copied from the log as-is."""
        for a in tables:
            if a.convert_params:
                self.log.info("CONVERT %s: %s", a.table, json.dumps(a.convert_params))


# The original name (one table only); kept so existing DAGs that import it keep working.
AssessTableOperator = AdvisorOperator
