"""Bounded parallel maintenance on a partitioned table: one statement per partition on a few sessions at once.

Why: CREATE INDEX and ANALYZE of one partition keep about one core busy; partitions are independent, so while
the server has idle cores N sessions finish in about 1/N of the time. Bounded (default 2 sessions), so the
application keeps the rest of the machine, and paced by an optional throttle (latency pacing) before each
statement.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pg_partition.core.db.execute import Executor

DEFAULT_WORKERS = 2
T = TypeVar("T")


def sibling_connection(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """A new autocommit session to the same server, database and role as ``conn`` (its parameters and password
    are read from the open connection, never logged)."""
    conninfo = make_conninfo(**conn.info.get_parameters(), password=conn.info.password)
    return psycopg.connect(conninfo, autocommit=True)


X = TypeVar("X")


def map_sessions(ex: Executor, items: list[X], work: Callable[[Executor, X], T], *, workers: int = DEFAULT_WORKERS,
                 connect: Callable[[], psycopg.Connection[Any]] | None = None) -> list[T]:
    """``[work(executor, item) for item in items]`` on up to ``workers`` sessions at once, results in order.

    Why: a CREATE INDEX, an ANALYZE or the copy of one partition keeps about one core busy, and partitions are
    independent, so N sessions finish in about 1/N of the time while the server has idle cores. Bounded (the
    application keeps the rest). Each worker session gets an Executor sharing ``ex``'s logger; in a dry run (or
    with one worker, or one item) everything runs in order on ``ex``. The first error stops the other workers
    from starting new items and is raised once every worker has stopped (no session outlives the call).
    """
    if ex.dry_run or workers <= 1 or len(items) <= 1:
        return [work(ex, it) for it in items]
    todo = list(reversed(list(enumerate(items))))
    results: dict[int, T] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    opener = connect or (lambda: sibling_connection(ex.conn))

    def run() -> None:
        try:
            with opener() as own:
                wex = Executor(own, logger=ex.logger)
                while True:
                    with lock:
                        if errors or not todo:
                            return
                        index, it = todo.pop()
                    results[index] = work(wex, it)
        except BaseException as exc:  # raised in the caller after every worker stopped
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, name=f"pg-partition-session-{i}")
               for i in range(min(workers, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(items))]


def serialized(throttle: Callable[[], None] | None) -> Callable[[], None] | None:
    """The throttle, callable from several worker threads: one caller at a time, so a pause (for lag or the
    application's latency) holds every session, and a throttle's own state is never updated concurrently."""
    if throttle is None:
        return None
    lock = threading.Lock()

    def call() -> None:
        with lock:
            throttle()

    return call


def run_bounded(ex: Executor, statements: list[sql.Composed], *, workers: int = DEFAULT_WORKERS,
                connect: Callable[[], psycopg.Connection[Any]] | None = None,
                throttle: Callable[[], None] | None = None,
                local_settings: dict[str, str] | None = None) -> None:
    """Run independent statements (one partition each) on up to ``workers`` sessions at once
    (:func:`map_sessions`); ``throttle`` is called before each statement (latency pacing). Every statement is
    logged by an Executor sharing ``ex``'s logger. ``local_settings`` are set for each statement only (its own
    transaction, ``set_config(..., is_local => true)``), so no session, the caller's included, keeps them."""
    pace = serialized(throttle)

    def one(wex: Executor, stmt: sql.Composed) -> None:
        if pace is not None and not wex.dry_run:
            pace()
        if not local_settings or wex.dry_run:
            wex.run(stmt)
            return
        with wex.conn.transaction():
            for name, value in local_settings.items():
                wex.conn.execute("SELECT set_config(%s, %s, true)", (name, value))
            wex.run(stmt)

    map_sessions(ex, statements, one, workers=workers, connect=connect)


@contextmanager
def alongside(ex: Executor, work: Callable[[Executor], T] | None, *,
              connect: Callable[[], psycopg.Connection[Any]] | None = None) -> Iterator[Future[T] | None]:
    """Run ``work`` on a sibling session in a background thread while the block runs; the block's exit waits
    for it (so no session outlives the step), and ``future.result()`` returns its value or raises its error.

    Why: two read-mostly steps that each keep one core busy (ANALYZE before PostgreSQL 18 is one statement;
    the pre-swap verify) finish in about the time of the longer one when a second core is idle. In a dry run,
    or with ``work`` None, nothing runs in the background: a dry run's ``work`` runs first on ``ex`` itself,
    so its statements are logged in order.
    """
    if work is None:
        yield None
        return
    if ex.dry_run:
        done: Future[T] = Future()
        done.set_result(work(ex))
        yield done
        return
    opener = connect or (lambda: sibling_connection(ex.conn))

    def run() -> T:
        with opener() as own:
            return work(Executor(own, logger=ex.logger))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-partition-alongside") as pool:
        yield pool.submit(run)
