"""Issue 18, the throttle's signal from the database's own view (real PostgreSQL):

- the workload meter sees an application statement waiting behind a lock while it waits, leaves out the
  conversion's own sessions (``application_name = pg_partition``), and a throttle on it pauses while the
  application waits and stops once it does not;
- the baseline judges the application's statements when it sees them running, and falls back to the canary when
  they run as another role and this role lacks pg_read_all_stats (their ``state`` is hidden: counted, logged);
- the meter's commit rate follows the application's commits (pg_stat_database).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from pg_partition.core import convert
from pg_partition.core.convert import throttle
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.convert.throttle import LatencyThrottle, WorkloadMeter
from pg_partition.core.db.execute import Executor
from tools.seed import seed_activities


def _tagged(dsn: str) -> Callable[[], psycopg.Connection[Any]]:
    """Sessions tagged as the hook tags the operators' (the conversion's own)."""
    return lambda: psycopg.connect(f"{dsn} application_name={throttle.OWN_APPLICATION_NAME}", autocommit=True)


def _wait_for(predicate: Callable[[], bool], poll: float = 0.02) -> None:
    """Wait for a condition another thread drives (no wall-clock limit: pytest-timeout guards the test)."""
    while not predicate():
        time.sleep(poll)


@contextmanager
def _application(dsn: str, sessions: int, statement: str = "SELECT pg_sleep(0.02)") -> Iterator[list[int]]:
    """``sessions`` untagged application sessions running ``statement`` back to back; yields the commit count."""
    stop, done = threading.Event(), [0]

    def loop() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            while not stop.is_set():
                c.execute(statement)
                done[0] += 1
    threads = [threading.Thread(target=loop) for _ in range(sessions)]
    for t in threads:
        t.start()
    try:
        yield done
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_meter_sees_a_waiting_application_statement_and_not_the_conversions_own_sessions(db, conn) -> None:
    conn.execute("CREATE TABLE app (id int PRIMARY KEY)")
    conn.execute("INSERT INTO app VALUES (1)")
    own = _tagged(db.dsn)()
    busy = threading.Thread(target=lambda: own.execute("SELECT pg_sleep(1.5)"))  # a long batch of the conversion
    busy.start()
    pauses: list[float] = []
    with WorkloadMeter(_tagged(db.dsn), interval=0.02, window=20) as meter:
        thr = LatencyThrottle(meter, target_ms=100.0, sleep=pauses.append)
        _wait_for(lambda: len(meter.ticks) >= 20)
        assert meter.ages() == [] and meter.level() == 0.0, "the conversion's own statement is not the application"
        thr()
        assert pauses == []
        blocker = db.connect(autocommit=False)
        blocker.execute("LOCK TABLE app IN ACCESS EXCLUSIVE MODE")
        app = db.connect()
        waiting = threading.Thread(target=lambda: app.execute("SELECT id FROM app WHERE id = 1"))
        waiting.start()
        _wait_for(lambda: meter.level() >= 200.0)  # seen while it waits, not when it returns
        assert waiting.is_alive()
        time.sleep(0.05)
        thr()
        thr()
        assert len(pauses) == 2 and thr.control.over == 2 and pauses[0] >= 0.25 * 0.05  # ratio x the batch time
        blocker.rollback()
        waiting.join()
        _wait_for(lambda: meter.level() == 0.0)  # the window forgets the wait once the statement is done
        blocker.close()
        app.close()
    busy.join()
    own.close()


def test_meter_commit_rate_follows_the_applications_commits(db) -> None:
    with WorkloadMeter(_tagged(db.dsn), interval=0.05, window=1000) as meter:
        with _application(db.dsn, 2, "SELECT 1") as done:
            _wait_for(lambda: done[0] >= 3000)
        ended = len(meter.ticks)  # a backend flushes its counters about once a second, and when it exits
        _wait_for(lambda: len(meter.ticks) >= ended + 30)
        ticks = list(meter.ticks)
    seen = ticks[-1][1] - ticks[0][1] - (len(ticks) - 1)
    assert 0.9 * done[0] <= seen <= done[0] + 10  # the meter's own sample transactions are left out
    assert meter.commits_per_s() > 0 and meter.little_ms() >= 0.0


def _spec(conn: psycopg.Connection[Any]) -> tuple[ConvertSpec, Executor]:
    seed_activities(conn, "public.activities", rows=1_000)
    spec = ConvertSpec.create("activities", "created_at")
    ex = Executor(conn)
    convert.prep(ex, spec)  # the state schema the baseline is recorded in
    return spec, ex


def test_baseline_judges_the_applications_statements_when_it_sees_them(db, conn) -> None:
    spec, ex = _spec(conn)
    with _application(db.dsn, 3):
        base = throttle.measure_baseline(ex, spec, _tagged(db.dsn), seconds=1.5)
    assert base["signal"] == "statements" and base["app_ages"] >= throttle.MIN_APP_AGES
    assert base["app_hidden"] == 0 and 0 < base["app_age_p50_ms"] <= base["app_age_p90_ms"]
    target = throttle.target_from(base, ratio=1.5, target_ms=None)
    assert target == throttle.target_for(base["app_age_p90_ms"], 1.5)
    with throttle.latency_throttle(ex, spec, _tagged(db.dsn), ratio=1.5) as thr:
        assert thr is not None and isinstance(thr.canary, WorkloadMeter) and thr.target_ms == target
    with throttle.latency_throttle(ex, spec, _tagged(db.dsn), ratio=1.5, signal="canary") as thr:
        assert thr is not None and isinstance(thr.canary, throttle.Canary)
        assert thr.target_ms == throttle.target_for(base["p90_ms"], 1.5)


def test_a_role_without_pg_read_all_stats_falls_back_to_the_canary(db, conn, caplog) -> None:
    """Other roles' sessions show with ``state`` NULL to a role that is neither superuser nor a member of
    pg_read_all_stats (pg_monitor): the meter counts them as hidden and the baseline judges the canary; the same
    role's own application sessions stay visible."""
    spec, ex = _spec(conn)
    role = f"plain_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER")
    conn.execute(f"GRANT SELECT ON activities TO {role}")
    plain_dsn = db.dsn.replace("user=postgres", f"user={role}")
    try:
        assert psycopg.connect(plain_dsn).execute("SELECT pg_has_role('pg_read_all_stats', 'MEMBER')"
                                                  ).fetchone() == (False,)
        with _application(db.dsn, 3):  # the application runs as postgres, the throttle as the plain role
            caplog.set_level("INFO", logger="pg_partition")
            base = throttle.measure_baseline(ex, spec, _tagged(plain_dsn), seconds=1.5)
        assert base["signal"] == "canary" and base["app_ages"] == 0 and base["app_hidden"] >= 3
        assert "grant pg_read_all_stats" in caplog.text
        with throttle.latency_throttle(ex, spec, _tagged(plain_dsn), ratio=1.5) as thr:
            assert thr is not None and isinstance(thr.canary, throttle.Canary)
        with _application(plain_dsn, 3), WorkloadMeter(_tagged(plain_dsn), interval=0.05, window=40) as meter:
            _wait_for(lambda: len(meter.ages()) >= 20)  # its own role's statements are visible
            assert meter.hidden() <= 1  # only the test's own postgres session; its 3 application sessions show
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_burst_canary_times_whole_pipelined_bursts_and_cannot_write(db, conn) -> None:
    """The burst canary (kept for the bench's signal comparison): one sample per burst of ``burst`` statements run
    back to back in one READ ONLY transaction, so a burst of 5 x 20 ms sleeps takes at least 100 ms."""
    with throttle.BurstCanary(_tagged(db.dsn), query="SELECT pg_sleep(0.02)", burst=5, interval=0.01,
                              window=10) as canary:
        _wait_for(lambda: len(canary.samples) >= 3)
        assert min(list(canary.samples)) >= 100.0 and canary.errors == 0  # completed bursts (not the one running)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        throttle.BurstCanary(_tagged(db.dsn), query="CREATE TABLE canary_wrote ()", burst=2).start()
    assert conn.execute("SELECT to_regclass('public.canary_wrote')").fetchone() == (None,)
