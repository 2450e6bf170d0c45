"""Bounded parallel maintenance on a partitioned table: one statement per partition on a few sessions at once.

Why: CREATE INDEX and ANALYZE of one partition keep about one core busy; partitions are independent, so while
the server has idle cores N sessions finish in about 1/N of the time. Bounded (default 2 sessions), so the
application keeps the rest of the machine, and paced by an optional throttle (latency pacing) before each
statement.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pg_partition.core.db.execute import Executor

DEFAULT_WORKERS = 2

def sibling_connection(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """A new autocommit session to the same server, database and role as ``conn`` (its parameters and password
    are read from the open connection, never logged)."""
    conninfo = make_conninfo(**conn.info.get_parameters(), password=conn.info.password)
    return psycopg.connect(conninfo, autocommit=True)


def run_bounded(ex: Executor, statements: list[sql.Composed], *, workers: int = DEFAULT_WORKERS,
                connect: Callable[[], psycopg.Connection[Any]] | None = None,
                throttle: Callable[[], None] | None = None) -> None:
    """Run independent statements (one partition each) on up to ``workers`` sessions at once.

    Why: a CREATE INDEX or ANALYZE of one partition uses about one core; on a partitioned table they are
    independent, so N sessions finish in about 1/N of the time while the server has idle cores. Bounded, so the
    application keeps the rest; ``throttle`` is called before each statement (latency pacing). Every statement
    is logged by an Executor sharing ``ex``'s logger; in a dry run (or with one worker) they run one by one on
    ``ex``. The first error stops the others from starting new statements and is raised.
    """
    if ex.dry_run or workers <= 1 or len(statements) <= 1:
        for stmt in statements:
            if throttle is not None and not ex.dry_run:
                throttle()
            ex.run(stmt)
        return
    todo = list(reversed(statements))
    lock = threading.Lock()
    errors: list[BaseException] = []
    opener = connect or (lambda: sibling_connection(ex.conn))

    def work() -> None:
        try:
            with opener() as own:
                wex = Executor(own, logger=ex.logger)
                while True:
                    with lock:
                        if errors or not todo:
                            return
                        stmt = todo.pop()
                    if throttle is not None:
                        throttle()
                    wex.run(stmt)
        except BaseException as exc:  # raised in the caller after every worker stopped
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=work, name=f"pg-partition-maint-{i}") for i in range(min(workers,
                                                                                              len(statements)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
