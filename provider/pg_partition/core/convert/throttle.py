"""Pacing by the application's latency: a canary query sampled in the background, and a throttle that slows
the fill, the replay and the index builds down while the canary's p99 is above the user's target.

Why a canary and not only replication lag: the application feels CPU, I/O and lock contention on the primary
long before a standby falls behind. A canary run every ``interval`` seconds on its own connection measures
what an application statement costs right now; the throttle compares the p99 of the last ``window`` samples
with the target and sets a pause after each batch proportional to the batch's own duration (a duty cycle):
doubled (plus a step) while the p99 is over the target, shrunk while it is well under it. The conversion
therefore runs at full speed on an idle server and yields as much as the application needs on a busy one.

The canary is read-only SQL the user chooses (``SELECT 1`` by default, or a typical application lookup); it runs
in a READ ONLY transaction with a statement_timeout so it can neither change data nor hang. Dry runs never start
it (the fill calls the throttle only when it really copies).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg

from pg_partition.core.db.errors import InvalidInputError

log = logging.getLogger("pg_partition")

DEFAULT_CANARY = "SELECT 1"


def p99(samples: list[float]) -> float:
    """The 99th percentile (nearest rank) of ``samples``; 0 for none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class Canary:
    """A background thread running ``query`` every ``interval`` seconds; latencies (ms) in a sliding window."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], *, query: str = DEFAULT_CANARY,
                 interval: float = 0.02, window: int = 200, timeout_ms: int = 5000) -> None:
        if interval <= 0 or window < 10:
            raise InvalidInputError(f"canary interval must be > 0 and window >= 10, got {interval}, {window}",
                                    fix="e.g. interval=0.02, window=200")
        self.connect, self.query, self.interval, self.timeout_ms = connect, query, interval, timeout_ms
        self.samples: deque[float] = deque(maxlen=window)
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Canary:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        conn = self.connect()  # connect here, so a bad DSN or query fails the caller, not a silent thread
        conn.autocommit = True
        conn.execute(f"SET statement_timeout = {int(self.timeout_ms)}")
        conn.execute("SET default_transaction_read_only = on")
        self._probe(conn)
        self._thread = threading.Thread(target=self._loop, args=(conn,), name="pg-partition-canary", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _probe(self, conn: psycopg.Connection[Any]) -> None:
        t0 = time.perf_counter()
        conn.execute(self.query).fetchall()  # type: ignore[arg-type]  # the user's read-only canary
        with self._lock:
            self.samples.append((time.perf_counter() - t0) * 1000.0)

    def _loop(self, conn: psycopg.Connection[Any]) -> None:
        with conn:
            while not self._stop.wait(self.interval):
                try:
                    self._probe(conn)
                except psycopg.Error as exc:  # a timeout counts as a very slow sample
                    self.errors += 1
                    with self._lock:
                        self.samples.append(float(self.timeout_ms))
                    log.warning("canary query failed (%s); counted as %d ms", exc, self.timeout_ms)

    def recent(self) -> list[float]:
        with self._lock:
            return list(self.samples)

    def p99(self) -> float:
        return p99(self.recent())


class LatencyThrottle:
    """Call it between batches: it sleeps as long as the canary's p99 says the application needs.

    ``target_ms``: the p99 to keep the canary under. ``max_pause``: the longest pause after one batch. The pause
    is ``ratio * duration of the last batch`` (measured between calls); ``ratio`` doubles (+0.25) while the p99 is
    over the target and shrinks by a third while it is under 80% of it, from 0 up to ``max_ratio`` (default 4: a
    target the server cannot meet, e.g. because of load the conversion does not cause, slows the conversion at
    most 5x instead of stalling it; the bench measured 24x with a cap of 20 on an overloaded machine).
    """

    def __init__(self, canary: Canary, target_ms: float, *, max_ratio: float = 4.0, max_pause: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep, logger: logging.Logger | None = None) -> None:
        if target_ms <= 0:
            raise InvalidInputError(f"throttle target must be positive, got {target_ms} ms",
                                    fix="e.g. 1.5x the p99 of the canary before the conversion")
        self.canary, self.target_ms, self.max_ratio, self.max_pause = canary, target_ms, max_ratio, max_pause
        self.sleep, self.logger = sleep, logger or log
        self.ratio = 0.0
        self.paused = 0.0
        self.calls = 0
        self._last: float | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        busy = now - self._last if self._last is not None else 0.0
        self.calls += 1
        current = self.canary.p99()
        if current > self.target_ms:
            self.ratio = min(self.max_ratio, self.ratio * 2 + 0.25)
        elif current < 0.8 * self.target_ms:
            self.ratio = self.ratio * 2 / 3 if self.ratio > 0.05 else 0.0
        pause = min(self.max_pause, self.ratio * busy)
        if pause > 0:
            if self.calls % 50 == 1:
                self.logger.info("throttle: canary p99 %.1f ms (target %.1f ms), pausing %.0f ms per batch",
                                 current, self.target_ms, pause * 1000)
            self.sleep(pause)
            self.paused += pause
        self._last = time.monotonic()


def baseline_p99(canary: Canary, seconds: float = 2.0) -> float:
    """The canary's p99 over ``seconds`` before the conversion starts (a target is often a multiple of it)."""
    time.sleep(seconds)
    return canary.p99() or statistics.fmean(canary.recent() or [0.0])
