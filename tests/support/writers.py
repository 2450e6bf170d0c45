"""Application writers for the no-loss tests: steady, rate-limited, and mirrored into a truth table in the same
transactions, so a conversion's result can be compared with what the application actually committed."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg
from psycopg import sql


class MirroredWriter(threading.Thread):
    """A steady application: UPDATE, DELETE and INSERT on ``activities`` at about ``rate`` transactions per
    second, each mirrored into ``truth`` in the same transaction, so after the run the two must be equal row for
    row (whatever table ``activities`` names by then)."""

    def __init__(self, dsn: str, *, rate: float, high: int, seed: int = 3) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rate, self.high = dsn, rate, high
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                period = 1.0 / self.rate
                while not self.stop_event.is_set():
                    started = time.monotonic()
                    self.step(conn)
                    self.done += 1
                    time.sleep(max(0.0, period - (time.monotonic() - started)))
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def step(self, conn: psycopg.Connection[Any]) -> None:
        k = self.rng.randint(1, self.high)
        kind = self.rng.choice(("insert", "update", "delete"))
        with conn.transaction():
            if kind == "insert":
                row = conn.execute(
                    "INSERT INTO activities (key, parameters, created_at, updated_at) VALUES "
                    "('w', %s, now()::timestamp - %s * interval '1 day', now()::timestamp) RETURNING *",
                    (str(k), self.rng.randint(0, 60))).fetchone()
                assert row is not None
                conn.execute(sql.SQL("INSERT INTO truth VALUES ({})").format(
                    sql.SQL(", ").join(sql.Placeholder() * len(row))), row)
            elif kind == "update":
                conn.execute("UPDATE activities SET parameters = %s WHERE id = %s", (f"u{self.done}", k))
                conn.execute("UPDATE truth SET parameters = %s WHERE id = %s", (f"u{self.done}", k))
            else:
                conn.execute("DELETE FROM activities WHERE id = %s", (k,))
                conn.execute("DELETE FROM truth WHERE id = %s", (k,))
