"""The warehouse side of the feed tests: a real subscriber cluster (tools/stack.py, no standby) and an application
thread writing INSERT, UPDATE (also moving rows between partitions) and DELETE at a steady rate. Shared by
tests/integration/core/convert/test_subscriber_feed.py and tests/matrix/test_feed.py."""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tools.stack import PgCluster


@pytest.fixture(scope="module")
def subscriber() -> Iterator[PgCluster]:
    """The warehouse: its own cluster of the version under test (PG_MAJOR), no standby."""
    root = Path(tempfile.mkdtemp(prefix="pgp-sub-"))
    root.chmod(0o755)
    cluster = PgCluster.create(root / "pg", standby=False)
    try:
        yield cluster
    finally:
        cluster.stop()


class App(threading.Thread):
    """The application: INSERT (recent rows), UPDATE (also of the partition column) and DELETE of any row it ever
    wrote, at about ``rate`` tx/s; ``paused`` holds it between two transactions."""

    def __init__(self, dsn: str, *, rate: float, high: int, table: str = "events", ahead_days: int = 0) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rate, self.high, self.table, self.ahead_days = dsn, rate, high, table, ahead_days
        self.rng = random.Random(15)
        self.stop_event = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.idle = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []

    def pause(self) -> None:
        self.running.clear()
        self.idle.clear()
        assert self.idle.wait(120), "the application did not reach a pause"

    def resume(self) -> None:
        self.running.set()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop_event.is_set():
                    if not self.running.is_set():
                        self.idle.set()
                        self.running.wait(0.1)
                        continue
                    self._one(conn)
                    self.done += 1
                    time.sleep(1.0 / self.rate)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)
        finally:
            self.idle.set()

    def _one(self, conn: psycopg.Connection[Any]) -> None:
        k = self.rng.randint(1, self.high)
        kind = self.rng.choice(("insert", "update", "update", "move", "delete"))
        if kind == "insert":
            # ahead_days: one insert in four is dated that many days (up to two weeks more) ahead, past the
            # partitions that exist, into the DEFAULT partition until rotation premakes its month
            hours = -self.rng.randint(0, 48) if not self.ahead_days or self.rng.random() < 0.75 else \
                24 * self.ahead_days + self.rng.randint(0, 24 * 13)
            row = conn.execute(f"INSERT INTO {self.table} (created_at, v) VALUES (now() + %s * interval '1 hour', "
                               "'i') RETURNING id", (hours,)).fetchone()
            assert row is not None
            self.high = max(self.high, int(row[0]))
        elif kind == "update":
            conn.execute(f"UPDATE {self.table} SET v = %s, n = n + 1 WHERE id = %s", (f"u{self.done}", k))
        elif kind == "move":  # a row moving between partitions: DELETE + INSERT at the partition level
            conn.execute(f"UPDATE {self.table} SET created_at = now() - %s * interval '1 hour', n = n + 1 "
                         "WHERE id = %s", (self.rng.randint(0, 48), k))
        else:
            conn.execute(f"DELETE FROM {self.table} WHERE id = %s", (k,))


def wait_for(predicate: Any, *, what: str, timeout: float = 90, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def subscribe(sub: psycopg.Connection[Any], *, create_table: str, source: Any, publication: str,
              name: str) -> None:
    """Create the subscriber's table, subscribe to ``publication`` of ``source`` (a test database: ``.cluster``
    and ``.name``) and wait until the initial table sync is done."""
    sub.execute(create_table)
    port = source.cluster.primary.port
    sub.execute(f"CREATE SUBSCRIPTION {name} CONNECTION 'host=127.0.0.1 port={port} user=postgres "
                f"dbname={source.name}' PUBLICATION {publication}")
    wait_for(lambda: sub.execute("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'").fetchone()
             == (0,), what="initial table sync")
