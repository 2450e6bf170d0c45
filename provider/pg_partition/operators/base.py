"""What every pg-partition operator shares: connection, dry run, lock settings, logging of the exact SQL."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from airflow.sdk import BaseOperator, get_current_context
from airflow.sdk.exceptions import AirflowFailException

from pg_partition import settings
from pg_partition.core.db import state
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from pg_partition.core.db.locks import table_lock
from pg_partition.core.params import LOCK_RETRIES, bounded_int, is_none, parse_bool, parse_lock_timeout
from pg_partition.hooks.partition import PartitionHook

# SQLSTATE classes that fail the same way on every attempt: syntax error or access rule violation (a missing table
# or column, a permission), feature not supported. Airflow's task retries (minutes of backoff) cannot cure them.
PERMANENT_SQLSTATE_CLASSES = ("42", "0A")


@contextmanager
def _fail_without_retry() -> Iterator[None]:
    """A schema error fails the task at once (AirflowFailException: no Airflow retry) with PostgreSQL's message;
    everything else keeps the task's retries (a lost connection, a lock timeout, a busy table)."""
    try:
        yield
    except psycopg.Error as exc:
        state = exc.sqlstate or ""
        if state[:2] in PERMANENT_SQLSTATE_CLASSES:
            raise AirflowFailException(
                f"{type(exc).__name__} (SQLSTATE {state}): {str(exc).strip()} - a schema or permission error "
                "does not go away on retry, so the task fails now; fix the cause and clear the task") from exc
        raise


def _process_created() -> float:
    """When this process started (epoch seconds; psutil, which Airflow's task supervisor already imports)."""
    import psutil  # at task run time only, not at DAG parse

    return float(psutil.Process().create_time())


class PartitionBaseOperator(BaseOperator):
    """Base for operators that act on one table through ``pg_partition.core``.

    Subclasses implement ``execute`` with ``self.sql_executor(conn)``: it logs every statement (the exact SQL)
    and in dry-run mode only logs. Keep subclasses thin: parse arguments, call core, log, return XCom.
    """

    template_fields: Sequence[str] = ("conn_id", "table", "dry_run", "lock_timeout", "lock_retries")
    ui_color = "#d7e9f7"
    # Runs of one DAG may overlap (max_active_runs > 1). "claim": this step records that its run works on the table
    # (state.claim_run); "check": this step stops when another run has claimed it since; None: neither.
    run_claim: str | None = None

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

    def pre_execute(self, context: Any) -> None:
        """One INFO line marking where Airflow's own start-up of this task ends and our code begins: Airflow calls
        ``pre_execute`` right before ``execute``, after its task runner, the DAG parse, the connection to the API
        server and the template rendering. ``started_at`` is the wall clock (epoch seconds, what bench/peers.py
        reads as the end of Airflow's start-up) and ``process_age`` how long this task's process had been alive
        (for ``airflow dags test``, the whole CLI process): the operator's view of Airflow's start-up cost."""
        now = time.time()
        self.log.info("pg-partition task %s: our code starts (started_at=%.3f, process_age=%.2fs)", self.task_id,
                      now, now - _process_created())

    @property
    def is_dry_run(self) -> bool:
        return parse_bool(self.dry_run, what="dry_run")

    @property
    def qualified_table(self) -> QualifiedName:
        return QualifiedName.parse(self.table)

    def hook(self) -> PartitionHook:
        return PartitionHook(postgres_conn_id=self.conn_id)

    def table_lock_mode(self) -> tuple[bool, str | None]:
        """(shared, item) for :func:`pg_partition.core.db.locks.table_lock`: exclusive by default; the mapped
        fill tasks share the table's lock and each locks its own item."""
        return False, None

    @contextmanager
    def connection(self, *, autocommit: bool = True) -> Iterator[psycopg.Connection[Any]]:
        """A connection holding the table's pg-partition lock for the task: a second run on the same table (any
        executor, any worker) fails naming the session that holds it. Every param is checked first."""
        self.lock_kwargs()
        with _fail_without_retry(), self.hook().open(autocommit=autocommit) as conn:
            # the archive operator learns its table from the queue row (the engine locks it); a second connection
            # of the same task (the lag gate's) is covered by the lock its first connection holds
            if is_none(self.table) or getattr(self, "_holds_table_lock", False):
                yield conn
                return
            shared, item = self.table_lock_mode()
            with table_lock(conn, self.qualified_table, what=f"task {self.task_id}", shared=shared, item=item):
                self._claim_or_check(conn)
                self._holds_table_lock = True
                try:
                    yield conn
                finally:
                    self._holds_table_lock = False

    def _claim_or_check(self, conn: psycopg.Connection[Any]) -> None:
        """The run-level exclusion on top of the task-level lock (see :func:`pg_partition.core.db.state.claim_run`).
        Outside a DAG run (an operator executed directly) and in a dry run there is no run to claim for."""
        if self.run_claim is None or self.is_dry_run:
            return
        try:
            dag_run = get_current_context()["dag_run"]
        except Exception:  # not inside a task run: no run identity
            return
        run = f"{dag_run.dag_id}/{dag_run.run_id}"
        table = str(self.qualified_table)
        if self.run_claim == "claim":
            previous = state.claim_run(conn, table, run)
            if previous:
                self.log.warning("run %s now works on %s; run %s, which claimed it before, stops at its next step",
                                 run, table, previous)
            return
        try:
            state.check_run(conn, table, run)
        except state.RunSupersededError as exc:
            raise AirflowFailException(str(exc)) from exc  # retrying cannot help: the other run owns the table

    def sql_executor(self, conn: psycopg.Connection[Any]) -> Executor:
        """Not named ``executor``: Airflow's BaseOperator.__init__ sets ``self.executor`` (the executor name).
        Statements go to the ``pg_partition.sql`` logger at ``[pg_partition] sql_log_level``."""
        settings.sql_logger()  # applies [pg_partition] sql_log_level to the Executor's pg_partition.sql lines
        return Executor(conn, dry_run=self.is_dry_run)

    def lock_kwargs(self) -> dict[str, Any]:
        """lock_timeout and lock_retries, checked (1ms..10min; 1..100) before anything runs."""
        return {"lock_timeout": parse_lock_timeout(self.lock_timeout),
                "retries": bounded_int(self.lock_retries, what="lock_retries", bounds=LOCK_RETRIES, default=5)}
