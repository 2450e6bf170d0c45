"""What every pg-partition operator shares: connection, dry run, lock settings, logging of the exact SQL."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from airflow.sdk import BaseOperator

from pg_partition import settings
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from pg_partition.core.params import parse_bool
from pg_partition.hooks.partition import PartitionHook


class PartitionBaseOperator(BaseOperator):
    """Base for operators that act on one table through ``pg_partition.core``.

    Subclasses implement ``execute`` with ``self.sql_executor(conn)``: it logs every statement (the exact SQL)
    and in dry-run mode only logs. Keep subclasses thin: parse arguments, call core, log, return XCom.
    """

    template_fields: Sequence[str] = ("conn_id", "table", "dry_run", "lock_timeout", "lock_retries")
    ui_color = "#d7e9f7"

    def __init__(
        self,
        *,
        conn_id: str,
        table: str,
        dry_run: bool | str = False,
        lock_timeout: str = "2s",
        lock_retries: int | str = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.table = table
        self.dry_run = dry_run
        self.lock_timeout = lock_timeout
        self.lock_retries = lock_retries

    @property
    def is_dry_run(self) -> bool:
        return parse_bool(self.dry_run, what="dry_run")

    @property
    def qualified_table(self) -> QualifiedName:
        return QualifiedName.parse(self.table)

    def hook(self) -> PartitionHook:
        return PartitionHook(postgres_conn_id=self.conn_id)

    @contextmanager
    def connection(self, *, autocommit: bool = True) -> Iterator[psycopg.Connection[Any]]:
        with self.hook().open(autocommit=autocommit) as conn:
            yield conn

    def sql_executor(self, conn: psycopg.Connection[Any]) -> Executor:
        """Not named ``executor``: Airflow's BaseOperator.__init__ sets ``self.executor`` (the executor name).
        Statements go to the ``pg_partition.sql`` logger at ``[pg_partition] sql_log_level``."""
        settings.sql_logger()  # applies [pg_partition] sql_log_level to the Executor's pg_partition.sql lines
        return Executor(conn, dry_run=self.is_dry_run)

    def lock_kwargs(self) -> dict[str, Any]:
        return {"lock_timeout": str(self.lock_timeout), "retries": int(self.lock_retries)}
