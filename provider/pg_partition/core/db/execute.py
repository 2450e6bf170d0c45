"""Running SQL the project's way: every statement logged, dry-run capable, DDL under lock_timeout with retries.

All engine functions that change the database take an :class:`Executor`. In dry-run mode it logs and records
statements without sending them, so every step can be rehearsed and every step returns the exact SQL it ran.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from pg_partition.core.db.errors import LockTimeoutExhausted

log = logging.getLogger("pg_partition")

T = TypeVar("T")

# What waiting and trying again can cure: a lock not granted within lock_timeout, a deadlock PostgreSQL broke by
# cancelling us, a serialization failure. Anything else (a schema error, a missing table, bad data, a permission)
# fails the same way on every attempt, so it is raised at once instead of being retried with backoff.
RETRYABLE: tuple[type[psycopg.Error], ...] = (
    psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
Query = str | sql.SQL | sql.Composed


def render(conn: psycopg.Connection[Any], stmt: Query) -> str:
    """The statement as PostgreSQL will see it (identifiers quoted), for logs and dry-run output."""
    return stmt if isinstance(stmt, str) else stmt.as_string(conn)


@dataclass
class Executor:
    """Runs (or, with ``dry_run``, only logs) statements on one connection and remembers what it ran."""

    conn: psycopg.Connection[Any]
    dry_run: bool = False
    logger: logging.Logger = field(default_factory=lambda: log)
    statements: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Our sessions read string literals the standard way (a backslash is an ordinary character), which is
        how every validated filter and literal we print is meant to be read."""
        if self.conn.info.parameter_status("standard_conforming_strings") != "on":
            self.conn.execute("SET standard_conforming_strings = on")

    def run(self, stmt: Query, params: Sequence[Any] | dict[str, Any] | None = None, *,
            level: int = logging.INFO) -> psycopg.Cursor[Any] | None:
        """Execute a statement that changes something. Returns the cursor, or None in dry-run mode.

        ``level``: batch loops log their first batch at INFO (the template) and the rest at DEBUG, so a
        terabyte fill does not write two lines of SQL per batch at INFO; a dry run always logs at INFO. Executed
        SQL goes to the ``<logger>.sql`` child logger (``pg_partition.sql``), so a deployment can set its level
        apart from progress lines and warnings."""
        text = render(self.conn, stmt)
        self.statements.append(text)
        if self.dry_run:
            self.logger.info("[dry run] %s", text)
            return None
        logging.getLogger(f"{self.logger.name}.sql").log(level, "SQL: %s", text)
        return self.conn.execute(stmt, params)

    def query(self, stmt: Query, params: Sequence[Any] | dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Execute a read-only statement; runs even in dry-run mode because it changes nothing."""
        return self.conn.execute(stmt, params).fetchall()

    def scalar(self, stmt: Query, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
        row = self.conn.execute(stmt, params).fetchone()
        return None if row is None else row[0]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction that is a no-op in dry-run mode (nothing is sent, so nothing to commit)."""
        if self.dry_run:
            yield
            return
        with self.conn.transaction():
            yield

    def with_lock_timeout(
        self,
        body: Callable[[], T],
        *,
        lock_timeout: str = "2s",
        retries: int = 5,
        what: str = "DDL",
    ) -> T:
        """Run ``body`` in one transaction with ``SET LOCAL lock_timeout``, retrying lock timeouts with backoff.

        Why: a DDL statement that waits for a lock blocks every later statement on that table, so it must give up
        quickly and try again rather than queue behind a long transaction while the application stalls.
        """
        from pg_partition.core.params import parse_lock_timeout  # core.params imports core.db.errors only

        lock_timeout = parse_lock_timeout(lock_timeout)  # "forever"/"-1s" never reach SET LOCAL
        if self.dry_run:
            self.run(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
            return body()

        def _log_retry(state: RetryCallState) -> None:
            self.logger.warning(
                "%s: %s (attempt %d of %d); retrying", what, _why(state, lock_timeout), state.attempt_number, retries,
            )

        retrying = Retrying(
            retry=retry_if_exception_type(RETRYABLE),
            stop=stop_after_attempt(retries),
            wait=wait_exponential_jitter(multiplier=0.2, max=10),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt, self.conn.transaction():
                    self.run(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
                    return body()
        except RETRYABLE as exc:
            raise LockTimeoutExhausted(
                f"{what} could not get its lock within lock_timeout={lock_timeout} after {retries} attempts "
                f"(last: {type(exc).__name__})",
                fix="find the long-running transaction holding the table (pg_stat_activity, pg_locks) or retry "
                "at a quieter time; raise lock_timeout/retries only if the application tolerates longer waits",
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover


    @contextmanager
    def _session_lock_timeout(self, lock_timeout: str) -> Iterator[None]:
        self.run(sql.SQL("SET lock_timeout = {}").format(sql.Literal(lock_timeout)))
        try:
            yield
        finally:
            if self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                self.run("RESET lock_timeout")

    def outside_transaction_with_lock_timeout(
        self,
        stmt: Query,
        *,
        lock_timeout: str,
        retries: int,
        what: str,
        after_timeout: Callable[[], bool] | None = None,
        where: str | None = None,
        fix: str | None = None,
    ) -> bool:
        """Run a statement PostgreSQL refuses inside a transaction block (``DETACH ... CONCURRENTLY``/``FINALIZE``)
        under a session-level ``lock_timeout``, retrying lock timeouts up to ``retries`` attempts.

        ``after_timeout`` runs after each timed-out attempt; when it returns True the work was completed another
        way (an interrupted concurrent detach finalized, say), no further attempt is made and this returns False.
        Returns True when the statement itself ran. Raises LockTimeoutExhausted after the last attempt.
        """
        last: Exception | None = None
        for attempt in range(1, retries + 1):
            try:
                with self._session_lock_timeout(lock_timeout):
                    self.run(stmt)
                return True
            except psycopg.errors.LockNotAvailable as exc:
                last = exc
                self.logger.warning("%s timed out after lock_timeout=%s (attempt %d of %d)",
                                    what, lock_timeout, attempt, retries)
                if after_timeout is not None and after_timeout():
                    return False
        raise LockTimeoutExhausted(
            f"{what} did not get its locks within lock_timeout={lock_timeout} after {retries} attempts",
            where=where,
            fix=fix or "find the long-running transaction holding the table (pg_stat_activity, pg_locks); the "
            "next run retries",
        ) from last


def _why(state: RetryCallState, lock_timeout: str) -> str:
    exc = state.outcome.exception() if state.outcome is not None else None
    if isinstance(exc, psycopg.errors.LockNotAvailable) or exc is None:
        return f"lock not granted within lock_timeout={lock_timeout}"
    return f"{type(exc).__name__} ({(exc.diag.message_primary or '').strip()})" if isinstance(
        exc, psycopg.Error) else type(exc).__name__


def read_only(conn: psycopg.Connection[Any], query: Query,
              params: Sequence[Any] | dict[str, Any] | None = None) -> list[Any]:
    """Run a query that only reads (planning, counting) in a READ ONLY transaction when no transaction is open,
    so even a filter that slipped through every gate could not write (inside a caller's transaction it runs
    there: that transaction's mode is the caller's)."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return conn.execute(query, params).fetchall()
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        return conn.execute(query, params).fetchall()


class Progress:
    """Progress lines for long loops: done/total, rate, ETA. Logs at most every ``every`` seconds."""

    def __init__(self, what: str, total: int | None, *, unit: str = "rows", every: float = 10.0,
                 logger: logging.Logger | None = None) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.every = every
        self.done = 0
        self.started = time.monotonic()
        self._last = self.started
        self.logger = logger or log

    def add(self, n: int, *, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            self.logger.info("%s", self.line())

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        if self.total:
            pct = 100.0 * self.done / self.total
            remaining = max(self.total - self.done, 0)
            eta = f"{remaining / rate:,.0f}s" if rate > 0 else "unknown"
            return (f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({pct:.1f}%), "
                    f"{rate:,.0f} {self.unit}/s, ETA {eta}")
        return f"{self.what}: {self.done:,} {self.unit}, {rate:,.0f} {self.unit}/s"
