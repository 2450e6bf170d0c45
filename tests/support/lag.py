"""Replication helpers for lag tests: pause the standby's replay for real, write WAL, wait for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from pg_partition.core.lag import measure


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 90) -> Any:
    """Poll a condition; the deadline only stops a broken test from hanging, it is not a speed requirement."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for: {what}"
        time.sleep(0.1)


@contextmanager
def replay_paused(cluster) -> Iterator[None]:
    """Pause replay on the real standby, and wait until it is actually paused: PostgreSQL only honours the
    request at the next WAL record, so a little WAL is written until the state says 'paused'."""
    with cluster.standby.connect(autocommit=True) as s, cluster.primary.connect(autocommit=True) as p:
        s.execute("SELECT pg_wal_replay_pause()")
        try:
            def paused() -> bool:
                p.execute("SELECT txid_current()")  # one tiny WAL record for the standby to stop at
                return s.execute("SELECT pg_get_wal_replay_pause_state()").fetchone() == ("paused",)

            wait_until(paused, "standby replay paused")
            yield
        finally:
            s.execute("SELECT pg_wal_replay_resume()")


def write_wal(conn: psycopg.Connection[Any], rows: int = 20_000) -> None:
    """About 5 MB of WAL for 20k rows."""
    conn.execute("CREATE TABLE IF NOT EXISTS walgen (id bigserial PRIMARY KEY, pad text)")
    conn.execute("INSERT INTO walgen (pad) SELECT repeat(md5(g::text), 6) FROM generate_series(1, %s) g", (rows,))


def standby_caught_up(conn: psycopg.Connection[Any]) -> bool:
    sb = [s for s in measure(conn).standbys if s.name == "standby1"]
    return bool(sb) and sb[0].replay_lag_bytes == 0
