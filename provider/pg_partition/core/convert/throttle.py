"""Pacing by the application's latency: a signal sampled in the background (the application's own running
statements, or a canary query), and a throttle that slows the fill, the replay, the index builds and verify down
while the signal says the application is suffering.

**Which signal** (measured: bench/results/2026-11-29e-signals-run{1,2,3}.md). On a saturated 2-core server, four
pgbench clients flat out and a synthetic fill at duty cycles 1.0/0.5/0.25: the application's p99 rose up to 2.6x,
while

- the *sleeping canary* (one key lookup every 50 ms) read 0.4-1.6x, unrelated to the application: a process
  waking from sleep gets the CPU at once, so it does not queue like busy sessions do;
- a *burst canary* (:class:`BurstCanary`, 20 lookups pipelined back to back) did not do better (p50 0.4-1.75x,
  p90 0.7-1.5x: up in one run, below 1x in the other two under the same kind of load); a likely reason (not
  measured): 20 lookups are still short next to a scheduler slice;
- the **age of the application's running statements** (:class:`WorkloadMeter`: ``now() - query_start`` of every
  active client session in ``pg_stat_activity`` that is not the conversion's, sampled 20 times a second) moved
  with it: p90 1.0-3.6x where the application's p99 was 1.0-2.6x, lowest in the phase the application felt least in
  all three runs (though run 3 under-read: 1.03-1.41x where the application read 1.31-2.33x). A sample lands
  on a statement with a chance proportional to its duration, so the ages weigh the slow statements the p99 is made
  of, and a statement stuck behind a lock shows while it waits;
- Little's law (running statements / commits per second from ``pg_stat_database``) followed the application's
  mean in all three runs (best of all in run 3), but the statistics are flushed about once a second per
  backend: too slow and too coarse to steer batches of 0.1 s.

So the throttle judges the **statement age p90** over the last second when the baseline saw enough application
statements (MIN_APP_AGES), and falls back to the canary otherwise: no application was running, or it runs as
another role and this role can see neither its state nor its query_start (a role that is neither superuser nor a
member of ``pg_read_all_stats``, e.g. through ``pg_monitor``; the baseline logs the hidden sessions and says
so). The conversion's own sessions are left out by ``application_name = pg_partition``,
which the hook sets on every connection. Limit: an application statement that is always long (a report running
minutes) sits in the ages; the baseline holds it too, so the target rises with it rather than pausing forever.

**The rule**, for either signal: its p90 (one scheduling hiccup does not move it; a real slowdown of a tenth of
the statements does), against a target of ``max(ratio x baseline p90, baseline + MIN_HEADROOM_MS,
TARGET_FLOOR_MS)``; the baseline measured once per conversion over BASELINE_SECONDS; **hysteresis** (over the
target the throttle backs off, under RELEASE (80%) of it it speeds up, in between it holds) and **AIMD** on the
pause between batches (the pause is ``ratio`` times the last batch's duration, a duty cycle): over the target the
ratio doubles plus a step, under the release mark it falls by one step, so the pace settles just under the target.
``max_ratio`` bounds the cost: a target the server cannot meet slows the conversion at most ``1 + max_ratio``
times instead of stalling it (on a saturated server a 1.5x target may need more than the default 4: see
tests/unit/core/convert/test_throttle.py's saturated-server model).

The control rule is :class:`PauseController`, a pure function of the level series (unit-tested without a
database or a clock). What a throttle cannot pace: the capture triggers run inside each application write and
ANALYZE is one statement per partition; and a pause only spaces batches out, it does not shorten one (see
bench/results/2026-11-29c-throttle.md for why the batch size is not shrunk here).

The canary is read-only SQL the user chooses (``SELECT 1`` by default, or a typical application lookup); it and
the meter run in READ ONLY sessions with a statement_timeout so they can neither change data nor hang. Dry runs
never start them (the fill calls the throttle only when it really copies).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from psycopg import sql

from pg_partition.core.convert.spec import ConvertSpec, checkpoint, put
from pg_partition.core.db import catalog
from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.db.execute import Executor

log = logging.getLogger("pg_partition")

DEFAULT_CANARY = "SELECT 1"


LEVEL_QUANTILE = 0.9  # the statistic the throttle judges (see the module docstring)


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank, 0 < q < 1) of ``samples``; 0 for none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p99(samples: list[float]) -> float:
    """The 99th percentile (nearest rank) of ``samples``; 0 for none."""
    return percentile(samples, 0.99)


def level(samples: list[float], in_flight_ms: float = 0.0) -> float:
    """The throttle's statistic: the p90 of the completed samples, or the wait of a probe still running if that
    is longer (a stalled application shows at once, not only once its probe returns)."""
    return max(percentile(samples, LEVEL_QUANTILE), in_flight_ms)


class LatencySource(Protocol):
    """What the throttle reads: a :class:`Canary`, or a synthetic series in the unit tests."""

    errors: int

    def level(self) -> float: ...

    def p99(self) -> float: ...


class Canary:
    """A background thread running ``query`` every ``interval`` seconds; latencies (ms) in a sliding window."""

    name = "canary p90"

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
        self._in_flight: float | None = None  # when the running probe started (monotonic), if one is running

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
        with self._lock:
            self._in_flight = t0
        try:
            conn.execute(self.query).fetchall()  # type: ignore[arg-type]  # the read-only canary
        finally:
            with self._lock:
                self._in_flight = None
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

    def _snapshot(self) -> tuple[list[float], float | None]:
        """The completed samples and how long the running probe has waited (None if none runs)."""
        with self._lock:
            waited = (time.perf_counter() - self._in_flight) * 1000.0 if self._in_flight is not None else None
            return list(self.samples), waited

    def recent(self) -> list[float]:
        """The window's latencies; a probe still running counts with the time it has waited so far, so a stall
        (a lock queue, an I/O storm) is seen while it lasts, not only once the probe returns."""
        done, waited = self._snapshot()
        return done if waited is None else [*done, waited]

    def p99(self) -> float:
        return p99(self.recent())

    def level(self) -> float:
        """The throttle's statistic over the window (:func:`level`)."""
        done, waited = self._snapshot()
        return level(done, waited or 0.0)


class BurstCanary(Canary):
    """The canary in back-to-back bursts: ``burst`` executions of ``query`` pipelined in one READ ONLY
    transaction, every ``interval`` seconds; a sample is the whole burst's time (ms).

    Why: a single lookup that sleeps between probes is a waking task, and the scheduler runs a waking task at once,
    so its latency barely moves while always-busy application sessions queue behind the conversion for the CPU.
    A pipelined burst keeps its backend running for many statements in a row (the server reads the next one from
    the socket without waiting for the client), so it is a busy task for the burst's length and queues like the
    application. One transaction per burst also keeps it to one commit, which :class:`WorkloadMeter` discounts.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], *, query: str = DEFAULT_CANARY,
                 burst: int = 20, interval: float = 0.1, window: int = 50, timeout_ms: int = 5000) -> None:
        if burst < 1:
            raise InvalidInputError(f"canary burst must be >= 1, got {burst}", fix="e.g. burst=20")
        super().__init__(connect, query=query, interval=interval, window=window, timeout_ms=timeout_ms)
        self.burst = burst

    def _probe(self, conn: psycopg.Connection[Any]) -> None:
        t0 = time.perf_counter()
        with self._lock:
            self._in_flight = t0
        try:
            with conn.transaction(), conn.pipeline():
                cursors = [conn.execute(self.query) for _ in range(self.burst)]  # type: ignore[arg-type]
            for cur in cursors:
                cur.fetchall()
        finally:
            with self._lock:
                self._in_flight = None
        with self._lock:
            self.samples.append((time.perf_counter() - t0) * 1000.0)


OWN_APPLICATION_NAME = "pg_partition"  # the hook tags every conversion session so (see hooks/partition.py)

WORKLOAD_SQL = """\
SELECT extract(epoch FROM clock_timestamp())::float8,
       (SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()),
       count(*) FILTER (WHERE a.state = 'active'),
       count(*) FILTER (WHERE a.state IS NULL),
       coalesce(array_agg(extract(epoch FROM clock_timestamp() - a.query_start)::float8 * 1000)
                FILTER (WHERE a.state = 'active'), '{}')
  FROM pg_stat_activity a
 WHERE (a.backend_type = 'client backend' OR a.backend_type IS NULL)  -- NULL: a session hidden from this role
   AND a.datname = current_database() AND a.pid <> pg_backend_pid()
   AND a.application_name IS DISTINCT FROM %s"""


class WorkloadMeter:
    """The database's own view of the application, sampled every ``interval`` seconds from ``pg_stat_activity``
    and ``pg_stat_database`` on one connection (a plain SELECT, no extension).

    Two statistics, both over the last ``window`` samples, leaving out the conversion's own sessions (tagged
    ``application_name = pg_partition``) and this one:

    - **statement age**: how long each *running* application statement has been running when sampled. A sample
      lands on a statement with a chance proportional to its duration, so the ages weigh the slow statements
      (the ones the application's p99 is made of) and a statement stuck behind a lock or the CPU queue shows
      while it waits, not after;
    - **Little's law**: mean active application sessions / application commits per second = the mean time a
      commit takes, for a closed loop (clients flat out: their rate falls) and an open one (their concurrency
      rises) alike. Commits are flushed to the statistics about once a second per backend, so it is slow.

    A role without ``pg_read_all_stats`` sees other roles' sessions with ``state`` NULL: those are counted as
    ``hidden`` and the statement age then sees only the sessions of its own role (the application's role when the
    conversion runs as it); the commit rate (``pg_stat_database``) is visible to every role.
    """

    name = "application statement age p90"

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], *, interval: float = 0.05,
                 window: int = 100, timeout_ms: int = 5000) -> None:
        if interval <= 0 or window < 10:
            raise InvalidInputError(f"meter interval must be > 0 and window >= 10, got {interval}, {window}",
                                    fix="e.g. interval=0.05, window=100")
        self.connect, self.interval, self.timeout_ms = connect, interval, timeout_ms
        self.ticks: deque[tuple[float, int, int, int, list[float]]] = deque(maxlen=window)
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> WorkloadMeter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        conn = self.connect()
        conn.autocommit = True
        conn.execute(f"SET statement_timeout = {int(self.timeout_ms)}")
        conn.execute("SET default_transaction_read_only = on")
        self._sample(conn)
        self._thread = threading.Thread(target=self._loop, args=(conn,), name="pg-partition-meter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _sample(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(WORKLOAD_SQL, (OWN_APPLICATION_NAME,)).fetchone()
        assert row is not None
        with self._lock:
            self.ticks.append((float(row[0]), int(row[1] or 0), int(row[2]), int(row[3]),
                               [float(x) for x in row[4]]))

    def _loop(self, conn: psycopg.Connection[Any]) -> None:
        with conn:
            while not self._stop.wait(self.interval):
                try:
                    self._sample(conn)
                except psycopg.Error as exc:
                    self.errors += 1
                    log.warning("workload meter failed (%s)", exc)

    def _window(self) -> list[tuple[float, int, int, int, list[float]]]:
        with self._lock:
            return list(self.ticks)

    def ages(self) -> list[float]:
        """Every running application statement's age (ms) seen in the window."""
        return [a for t in self._window() for a in t[4]]

    def hidden(self) -> int:
        """Sessions of other roles whose state this role cannot see, in the last sample."""
        w = self._window()
        return w[-1][3] if w else 0

    def active(self) -> float:
        """Mean running application statements per sample."""
        w = self._window()
        return statistics.fmean(t[2] for t in w) if w else 0.0

    def commits_per_s(self) -> float:
        """Application commits per second over the window (this meter's own sample transactions left out)."""
        w = self._window()
        if len(w) < 2 or w[-1][0] <= w[0][0]:
            return 0.0
        return max(0.0, (w[-1][1] - w[0][1] - (len(w) - 1)) / (w[-1][0] - w[0][0]))

    def little_ms(self) -> float:
        """Mean time per application commit (ms), by Little's law: active sessions / commit rate."""
        x = self.commits_per_s()
        return 1000.0 * self.active() / x if x > 0 else 0.0

    def level(self) -> float:
        """The throttle's statistic: the p90 of the running statements' ages."""
        return percentile(self.ages(), LEVEL_QUANTILE)

    def p99(self) -> float:
        return percentile(self.ages(), 0.99)

    def level_last(self, seconds: float) -> float | None:
        """The level over the samples of the last ``seconds`` (a pause), leaving out its first two samples (their
        statements may have queued behind the batch before it); None when that leaves fewer than four samples."""
        n = int(seconds / self.interval) - 2
        if n < 4:
            return None
        w = self._window()[-n:]
        return percentile([a for t in w for a in t[4]], LEVEL_QUANTILE) if len(w) >= 4 else None


class PauseController:
    """The control rule, pure: fed one latency level per batch, it returns the pause ratio (pause = ratio x the
    batch's duration). Over ``target_ms``: ratio = min(max_ratio, 2 x ratio + step) (multiplicative back-off).
    Under ``release`` x target: ratio = max(0, ratio - step) (additive recovery). In between: unchanged
    (hysteresis: a level hovering at the target does not flip the pace every batch).

    Attribution: ``idle_ms``, when given, is the level measured during the pause before the batch, while the
    conversion was not running. Over the target both during the batch and during the pause, the excess is load
    the conversion does not cause (other sessions, other tenants, a noisy host): pausing more would slow the
    conversion for nothing, so the ratio is held (counted in ``external``) instead of doubled."""

    def __init__(self, target_ms: float, *, max_ratio: float = 4.0, step: float = 0.25,
                 release: float = 0.8) -> None:
        if target_ms <= 0:
            raise InvalidInputError(f"throttle target must be positive, got {target_ms} ms",
                                    fix="e.g. 1.5x the canary's level before the conversion")
        if not 0 < release < 1 or step <= 0 or max_ratio <= 0:
            raise InvalidInputError(f"throttle release must be in (0, 1), step and max_ratio > 0; got {release}, "
                                    f"{step}, {max_ratio}", fix="e.g. release=0.8, step=0.25, max_ratio=4")
        self.target_ms, self.max_ratio, self.step, self.release = target_ms, max_ratio, step, release
        self.ratio = 0.0
        self.over = 0  # how many levels were over the target (for the summary)
        self.external = 0  # of which over the target during the pause too (held, not backed off)

    def update(self, level_ms: float, idle_ms: float | None = None) -> float:
        if level_ms > self.target_ms:
            self.over += 1
            if idle_ms is not None and idle_ms > self.target_ms:
                self.external += 1
                return self.ratio
            self.ratio = min(self.max_ratio, self.ratio * 2 + self.step)
        elif level_ms < self.release * self.target_ms:
            self.ratio = max(0.0, self.ratio - self.step)
        return self.ratio


class LatencyThrottle:
    """Call it between batches: it sleeps as long as the canary's level says the application needs.

    ``target_ms``: the canary level (p90, see :func:`level`) to stay under. The pause after a batch is
    ``ratio * duration of the last batch`` (measured between calls), at most ``max_pause`` seconds; ``ratio``
    follows :class:`PauseController` (AIMD with hysteresis, at most ``max_ratio``: the conversion is slowed at
    most ``1 + max_ratio`` times; the bench measured 24x with a cap of 20 on an overloaded machine).
    """

    def __init__(self, canary: LatencySource, target_ms: float, *, max_ratio: float = 4.0, max_pause: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        self.control = PauseController(target_ms, max_ratio=max_ratio)
        self.canary, self.target_ms, self.max_ratio, self.max_pause = canary, target_ms, max_ratio, max_pause
        self.sleep, self.clock, self.logger = sleep, clock, logger or log
        self.max_paused = 0.0  # the longest single pause (bounded by max_pause)
        self.paused = 0.0
        self.calls = 0
        self._last: float | None = None
        self._idle: float | None = None  # the level during the last pause, when the source can tell

    @property
    def ratio(self) -> float:
        return self.control.ratio

    def __call__(self) -> None:
        now = self.clock()
        busy = now - self._last if self._last is not None else 0.0
        self.calls += 1
        current = self.canary.level()
        ratio = self.control.update(current, self._idle)
        pause = min(self.max_pause, ratio * busy)
        self._idle = None
        if pause > 0:
            if self.calls % 50 == 1:
                self.logger.info("throttle: %s %.1f ms (target %.1f ms), pausing %.0f ms per batch",
                                 self.name, current, self.target_ms, pause * 1000)
            self.sleep(pause)
            self.paused += pause
            self.max_paused = max(self.max_paused, pause)
            during_pause = getattr(self.canary, "level_last", None)  # a source that can tell the pause apart
            self._idle = during_pause(pause) if during_pause is not None else None
        self._last = self.clock()

    def summary(self) -> str:
        return (f"throttle: {self.calls} batches ({self.control.over} over target, {self.control.external} of them "
                f"over it during the pause too: held), paused {self.paused:.1f}s in "
                f"total (longest pause {self.max_paused * 1000:.0f} ms), target {self.name} {self.target_ms:.1f} ms, "
                f"last {self.canary.level():.1f} ms, p99 {self.canary.p99():.1f} ms, errors {self.canary.errors}")

    @property
    def name(self) -> str:
        """What the throttle judges (the source's ``name``; a synthetic series has none)."""
        return str(getattr(self.canary, "name", "level"))


def baseline_p99(canary: Canary, seconds: float = 2.0) -> float:
    """The canary's p99 over ``seconds`` before the conversion starts (a target is often a multiple of it)."""
    time.sleep(seconds)
    return canary.p99() or statistics.fmean(canary.recent() or [0.0])


def baseline_level(canary: Canary, seconds: float = 2.0) -> float:
    """The canary's level (p90) over ``seconds``: what :func:`target_from` multiplies."""
    time.sleep(seconds)
    return canary.level()


# --- wiring: a baseline recorded once per conversion, a throttle per task ------------------------------------

BASELINE_STEP = "throttle_baseline"
BASELINE_SECONDS = 10.0  # at 40 lookups/s: ~400 samples, so the baseline's p90 is the 40th slowest, not noise
OPERATOR_INTERVAL = 0.05  # each throttled task runs its own canary: 20 lookups/s, a 5 s window of 100 samples
OPERATOR_WINDOW = 100
METER_INTERVAL = 0.05  # the workload meter samples pg_stat_activity 20 times a second (one cheap catalog read)
METER_WINDOW = 20  # and judges the last second: ~3 running statements a sample, ~60 ages, reacts within a second
MIN_APP_AGES = 50  # fewer running application statements seen in the baseline: judge the canary instead
MIN_HEADROOM_MS = 1.0  # a target never closer than this to the baseline: scheduler jitter alone is ~1 ms
TARGET_FLOOR_MS = 3.0  # and never under this: a 0.4 ms lookup at 1.5x would make any hiccup a violation


def canary_query(conn: psycopg.Connection[Any], table: catalog.QualifiedName) -> str:
    """The default canary: what an application does most, a primary-key lookup on the table being converted
    (the newest row: the hot end of the index). Built from identifiers, never from user text."""
    info = catalog.describe(conn, table)
    pk = info.primary_key.columns if info.primary_key is not None else ()
    if not pk:
        return "SELECT 1"
    keys = sql.SQL(", ").join(sql.Identifier(c) for c in pk)
    desc = sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(c)) for c in pk)
    return sql.SQL("SELECT {k} FROM {t} ORDER BY {d} LIMIT 1").format(k=keys, t=table.ident, d=desc).as_string(conn)


def recorded_baseline(conn: psycopg.Connection[Any], spec: ConvertSpec) -> dict[str, Any] | None:
    value = checkpoint(conn, spec, BASELINE_STEP)
    return dict(value) if isinstance(value, dict) else None


def measure_baseline(ex: Executor, spec: ConvertSpec, connect: Callable[[], psycopg.Connection[Any]], *,
                     seconds: float = BASELINE_SECONDS, query: str | None = None) -> dict[str, Any]:
    """The application's latency before the conversion loads the server, recorded in the conversion's state so
    every task (retried, mapped, on another worker) compares against the same numbers; measured once (a recorded
    baseline is returned as is: a second measurement would be taken while the conversion already runs).

    Two signals are measured side by side: the canary's latency (p50/p90/p99) and the application's own running
    statements as :class:`WorkloadMeter` sees them (statement age p50/p90, commits/s, Little's law). ``signal``
    says which one the throttle will judge: ``statements`` when the meter saw at least MIN_APP_AGES running
    application statements, else ``canary`` (no application running, or its sessions hidden from this role)."""
    recorded = recorded_baseline(ex.conn, spec)
    if recorded is not None:
        return recorded
    query = query or canary_query(ex.conn, spec.table)
    with Canary(connect, query=query, interval=OPERATOR_INTERVAL / 2, window=max(10, int(seconds / 0.025))) as c, \
            WorkloadMeter(connect, interval=METER_INTERVAL, window=max(10, int(seconds / METER_INTERVAL) + 1)) as m:
        time.sleep(seconds)
        samples = c.recent()
        ages, hidden, commits, little = m.ages(), m.hidden(), m.commits_per_s(), m.little_ms()
    value = {"p90_ms": round(percentile(samples, LEVEL_QUANTILE), 3), "p99_ms": round(p99(samples), 3),
             "p50_ms": round(statistics.median(samples or [0.0]), 3),
             "samples": len(samples), "seconds": seconds, "query": query,
             "app_age_p90_ms": round(percentile(ages, LEVEL_QUANTILE), 3),
             "app_age_p50_ms": round(percentile(ages, 0.5), 3), "app_ages": len(ages), "app_hidden": hidden,
             "app_commits_s": round(commits, 1), "app_little_ms": round(little, 3),
             "signal": "statements" if len(ages) >= MIN_APP_AGES else "canary",
             "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if not ex.dry_run:
        with ex.conn.transaction():
            put(ex, spec, BASELINE_STEP, value)
    ex.logger.info("throttle baseline for %s: canary p90 %.2f ms (p50 %.2f, p99 %.2f) over %d samples in %.0fs "
                   "(`%s`); application statements running: age p90 %.2f ms over %d, %.0f commits/s, %.2f ms per "
                   "commit (Little); %d sessions of other roles hidden; the throttle judges the %s", spec.table,
                   value["p90_ms"], value["p50_ms"], value["p99_ms"], len(samples), seconds, query,
                   value["app_age_p90_ms"], len(ages), commits, little, hidden,
                   "application's statements" if value["signal"] == "statements" else
                   "canary (too few application statements visible: " + (
                       "grant pg_read_all_stats to see other roles' sessions)" if hidden else "no application ran)"))
    return value


SIGNALS = ("statements", "canary")


def signal_of(baseline: dict[str, Any] | None, forced: str | None = None) -> str:
    """Which signal to judge: ``forced`` when given (``canary`` is always possible; ``statements`` only with a
    baseline that saw enough application statements), else the baseline's choice (a baseline recorded before the
    meter existed, or none: the canary)."""
    if forced is not None and forced not in SIGNALS:
        raise InvalidInputError(f"throttle signal must be one of {', '.join(SIGNALS)}, got {forced!r}",
                                fix="leave it empty to let the baseline choose")
    chosen = "statements" if (baseline or {}).get("signal") == "statements" else "canary"
    return "canary" if forced == "canary" else chosen


def target_from(baseline: dict[str, Any] | None, *, ratio: float | None, target_ms: float | None,
                signal: str | None = None) -> float:
    """The canary level (p90) to keep under: ``target_ms`` when given, else ``ratio`` times the baseline's p90,
    at least the baseline plus MIN_HEADROOM_MS and at least TARGET_FLOOR_MS (a sub-millisecond baseline times 1.5
    is within noise). A baseline recorded before p90 was (only ``p99_ms``) is read as its p99."""
    if target_ms is not None:
        return target_ms
    if ratio is None or baseline is None:
        raise InvalidInputError("a throttle needs throttle_target_ms or throttle_ratio with a baseline",
                                fix="set throttle_ratio (e.g. 1.5) or throttle_target_ms (e.g. 20)")
    if ratio < 1:
        raise InvalidInputError(f"throttle_ratio must be at least 1, got {ratio}",
                                fix="e.g. 1.5: keep the canary's p99 under 1.5x what it was before the conversion")
    if signal_of(baseline, signal) == "statements":
        return target_for(float(baseline["app_age_p90_ms"]), ratio)
    return target_for(float(baseline["p90_ms"] if "p90_ms" in baseline else baseline["p99_ms"]), ratio)


def target_for(base_ms: float, ratio: float) -> float:
    """``ratio`` x the baseline level, with the headroom and the floor of :func:`target_from`."""
    return max(ratio * base_ms, base_ms + MIN_HEADROOM_MS, TARGET_FLOOR_MS)


@contextmanager
def latency_throttle(ex: Executor, spec: ConvertSpec, connect: Callable[[], psycopg.Connection[Any]], *,
                     ratio: float | None = None, target_ms: float | None = None, max_pause: float = 5.0,
                     max_ratio: float = 4.0, signal: str | None = None) -> Iterator[LatencyThrottle | None]:
    """A running canary and its throttle for one task's batch loop, or None when no target is set (or in a dry
    run). The baseline is the one recorded for the conversion (measured now if none is). Logs the target on
    entry and what the throttle did on exit."""
    if (ratio is None and target_ms is None) or ex.dry_run:
        yield None
        return
    baseline = recorded_baseline(ex.conn, spec) if target_ms is not None else measure_baseline(ex, spec, connect)
    signal = signal_of(baseline, signal)
    target = target_from(baseline, ratio=ratio, target_ms=target_ms, signal=signal)
    query = (baseline or {}).get("query") or canary_query(ex.conn, spec.table)
    source: Canary | WorkloadMeter = (
        WorkloadMeter(connect, interval=METER_INTERVAL, window=METER_WINDOW) if signal == "statements" else
        Canary(connect, query=query, interval=OPERATOR_INTERVAL, window=OPERATOR_WINDOW))
    base = (baseline or {}).get("app_age_p90_ms" if signal == "statements" else "p90_ms",
                                (baseline or {}).get("p99_ms", "not measured"))
    with source:
        thr = LatencyThrottle(source, target, max_ratio=max_ratio, max_pause=max_pause, logger=ex.logger)
        ex.logger.info("throttle on: keeping the %s under %.1f ms (%s; baseline %s ms); pauses of at most %.1fs and "
                       "%.0fx the batch time", source.name, target,
                       f"ratio {ratio}" if target_ms is None else "target_ms", base, max_pause, max_ratio)
        try:
            yield thr
        finally:
            ex.logger.info("%s", thr.summary())


def chain(*steps: Callable[[], None] | None) -> Callable[[], None] | None:
    """One between-batches callback calling each of ``steps`` (lag gate, latency throttle, fixed sleep) in order;
    None when there is none."""
    real = [s for s in steps if s is not None]
    if not real:
        return None
    if len(real) == 1:
        return real[0]

    def call() -> None:
        for s in real:
            s()
    return call
