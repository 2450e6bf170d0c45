"""Issue 18 (gentle on the application) and the issue 15 leftover, on the engine with real PostgreSQL:

- the swap with capture replays the backlog down to a few entries right before its lock, under a steady writer,
  and loses nothing (truth table row for row);
- the outside-rows check before the swap probes each uncovered range through an index on the partition column;
- the latency throttle pauses while the application is blocked and stops pausing once it is not (the control
  rule itself is unit-tested in tests/unit/core/convert/test_throttle.py);
- the throttle's baseline is measured once per conversion, kept in the state schema, and reused;
- verify_conversion's replay (and catch-up) calls the throttle between batches.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from pg_partition.core import convert
from pg_partition.core.convert import capture, catchup, replay, throttle, verify
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.convert.throttle import Canary, LatencyThrottle
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from tests.support.convert import row_hash
from tests.support.writers import MirroredWriter
from tools.seed import seed_activities

TABLE = QualifiedName("public", "activities")
LOCKED = re.compile(r"backlog of \S+(?: applied under the lock)?: (\d+) entries")


def _prepared(conn: psycopg.Connection[Any], rows: int, *, months: int = 6) -> tuple[ConvertSpec, Executor]:
    seed_activities(conn, TABLE, rows=rows, months=months)
    spec = ConvertSpec.create("activities", "created_at", period="month")
    ex = Executor(conn)
    convert.preflight(conn, spec)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=2)
    return spec, ex


def _wait_for(predicate: Any, poll: float = 0.02) -> None:
    """Wait for a condition another thread drives (no wall-clock limit here: pytest-timeout guards the test)."""
    while not predicate():
        time.sleep(poll)


# --- the swap's pre-lock drain ------------------------------------------------------------------------------------


def test_swap_drains_the_backlog_to_a_few_entries_before_its_lock_under_a_steady_writer(db, conn, caplog) -> None:
    spec, ex = _prepared(conn, 20_000)
    conn.execute("CREATE TABLE truth AS SELECT * FROM activities")
    writer = MirroredWriter(db.dsn, rate=60, high=20_000)
    writer.start()
    try:
        assert convert.install_capture(ex, spec)["capture"]
        for item in convert.plan_fill(ex, spec, batch_size=5_000)["items"]:
            convert.fill(ex, spec, item)
        replay.replay(ex, spec.table, spec.intermediate, until_backlog_below=1)
        # what indexes, ANALYZE and verify leave behind in a real run: a backlog of thousands of entries
        with conn.transaction():
            conn.execute("UPDATE activities SET parameters = 'bulk' WHERE id <= 6000")
            conn.execute("UPDATE truth SET parameters = 'bulk' WHERE id <= 6000")
        assert capture.backlog(conn, TABLE) >= 6000
        done_before = writer.done
        with caplog.at_level(logging.INFO, logger="pg_partition"):
            result = convert.swap(ex, spec, sync=False)
        _wait_for(lambda: writer.done > done_before + 5)  # the writer never stopped, and goes on after the swap
    finally:
        writer.stop_event.set()
        writer.join(30)
    assert not writer.errors, writer.errors
    locked = [int(m.group(1)) for m in map(LOCKED.search, caplog.messages) if m]
    assert len(locked) == 1, caplog.messages
    # the 6,000-entry backlog was replayed before the lock; what the lock applied is what the writer (60 tx/s)
    # committed between the last pre-lock batch and the grant
    assert locked[0] < 200, f"{locked[0]} entries applied under the lock"
    assert result["drain_before_lock"]["entries"] >= 6000
    assert result["lock_ms"] > 0
    assert catalog.describe(conn, TABLE).is_partitioned
    assert not catalog.exists(conn, capture.changelog_name(TABLE))  # dropped after the commit, out of the lock
    assert not capture.trigger_names(conn, TABLE) and not capture.trigger_names(conn, spec.retired)
    assert row_hash(conn, "activities") == row_hash(conn, "truth")


# --- the outside-rows check ---------------------------------------------------------------------------------------


def test_outside_rows_check_probes_each_range_through_the_partition_column_index(conn) -> None:
    spec, ex = _prepared(conn, 30_000, months=8)
    plan = convert.plan_fill(ex, spec, batch_size=10_000)
    # a gap between partitions, rows below the first and above the last
    parts = sorted(catalog.describe(conn, spec.intermediate).partitions, key=lambda p: str(p.range_from))
    middle = parts[len(parts) // 2]
    conn.execute(sql.SQL("DROP TABLE {}").format(middle.name.ident))
    conn.execute("INSERT INTO activities (trackable_type, trackable_id, owner_type, owner_id, key, created_at, "
                 "updated_at) VALUES ('J', 1, 'U', 1, 'far', now() + interval '5 years', now()), "
                 "('J', 1, 'U', 1, 'old', now() - interval '9 years', now())")
    conn.execute("ANALYZE activities")
    in_gap = conn.execute(sql.SQL("SELECT count(*) FROM activities WHERE created_at >= {}::timestamp AND "
                                  "created_at < {}::timestamp").format(
        sql.Literal(middle.range_from), sql.Literal(middle.range_to))).fetchone()[0]
    assert in_gap > 0

    without_index = catchup.rows_outside(conn, plan, spec.table, spec.intermediate)
    conn.execute("CREATE INDEX activities_created_at ON activities (created_at)")
    conn.execute("ANALYZE activities")
    with_index = catchup.rows_outside(conn, plan, spec.table, spec.intermediate)
    assert with_index == without_index
    assert with_index[0] == in_gap + 2 and with_index[3] == 0

    conds = catchup.outside_ranges(conn, plan, spec.intermediate)
    assert len(conds) == 4  # NULL, below the first, the gap, above the last
    for cond in conds:
        plan_text = "\n".join(r[0] for r in conn.execute(sql.SQL(
            "EXPLAIN SELECT EXISTS (SELECT 1 FROM activities WHERE ({}))").format(cond)).fetchall())
        assert "activities_created_at" in plan_text and "Seq Scan on activities" not in plan_text, plan_text


# --- the latency throttle -----------------------------------------------------------------------------------------


def test_throttle_pauses_while_the_application_is_blocked_and_resumes_after(db, conn) -> None:
    conn.execute("CREATE TABLE app (id int PRIMARY KEY)")
    conn.execute("INSERT INTO app VALUES (1)")
    pauses: list[float] = []
    blocker = db.connect(autocommit=False)
    with Canary(lambda: db.connect(autocommit=True), query="SELECT id FROM app WHERE id = 1", interval=0.01,
                window=10) as canary:
        thr = LatencyThrottle(canary, target_ms=50.0, sleep=pauses.append)

        def batch() -> None:  # one "batch" of work, then the throttle, as the fill loop does
            time.sleep(0.02)
            thr()

        for _ in range(3):
            batch()
        assert pauses == [] and thr.ratio == 0.0  # fast canary: full speed
        blocker.execute("LOCK TABLE app IN ACCESS EXCLUSIVE MODE")  # the application now waits
        released = threading.Event()

        def release() -> None:
            _wait_for(lambda: len(pauses) >= 3)
            blocker.rollback()
            released.set()

        t = threading.Thread(target=release)
        t.start()
        while not released.is_set():
            batch()
        t.join()
        assert len(pauses) >= 3 and max(pauses) <= thr.max_pause
        assert thr.ratio <= thr.max_ratio
        paused_while_blocked = len(pauses)
        # the blocked probes leave the window; the ratio decays to 0 and pauses stop
        _wait_for(lambda: (batch(), thr.ratio == 0.0)[1])
        n = len(pauses)
        for _ in range(5):
            batch()
        assert len(pauses) == n, "no pause once the canary is fast again"
        assert paused_while_blocked >= 3
    blocker.close()
    assert "paused" in thr.summary()


def test_throttle_baseline_is_measured_once_and_reused_by_every_task(db, conn) -> None:
    spec, ex = _prepared(conn, 2_000)
    first = throttle.measure_baseline(ex, spec, lambda: db.connect(autocommit=True), seconds=0.5)
    assert first["samples"] >= 10 and 0 < first["p50_ms"] <= first["p90_ms"] <= first["p99_ms"]
    assert "activities" in first["query"]
    # another task (another process, another worker): it reads the recorded number, it does not measure again
    # while the conversion loads the server (a slow canary would give a different number)
    again = throttle.measure_baseline(Executor(db.connect()), spec, lambda: db.connect(autocommit=True),
                                      seconds=0.5, query="SELECT pg_sleep(0.05)")
    assert again == first
    assert throttle.recorded_baseline(conn, spec) == first
    target = throttle.target_from(first, ratio=1.5, target_ms=None)
    # the target follows the robust p90, with headroom and a floor (a sub-millisecond lookup x 1.5 is noise)
    assert target == max(1.5 * first["p90_ms"], first["p90_ms"] + throttle.MIN_HEADROOM_MS, throttle.TARGET_FLOOR_MS)
    with throttle.latency_throttle(ex, spec, lambda: db.connect(autocommit=True), ratio=1.5) as thr:
        assert thr is not None and thr.target_ms == target
    with throttle.latency_throttle(ex, spec, lambda: db.connect(autocommit=True)) as off:
        assert off is None


# --- verify's replay is paced like the replay task ---------------------------------------------------------------


def test_verify_conversion_calls_the_throttle_between_replay_batches(conn) -> None:
    spec, ex = _prepared(conn, 6_000)
    assert convert.install_capture(ex, spec)["capture"]
    for item in convert.plan_fill(ex, spec, batch_size=2_000)["items"]:
        convert.fill(ex, spec, item)
    conn.execute("UPDATE activities SET parameters = 'x' WHERE id <= 3000")
    calls: list[int] = []
    report = verify.verify_conversion(ex, spec, batch_size=500, replay_until_backlog_below=1,
                                      throttle=lambda: calls.append(capture.backlog(conn, TABLE)))
    assert report.ok, report.summary()
    assert report.replayed is not None and report.replayed["batches"] >= 6
    assert len(calls) >= 5  # between batches
    assert calls == sorted(calls, reverse=True)  # each pause happened with the backlog shrinking


def test_verify_conversion_append_only_paces_its_catch_up(conn) -> None:
    spec, ex = _prepared(conn, 6_000)
    convert.install_capture(ex, spec, "off")
    for item in convert.plan_fill(ex, spec, batch_size=2_000)["items"]:
        convert.fill(ex, spec, item)
    seed_more = "INSERT INTO activities (trackable_type, trackable_id, owner_type, owner_id, key, created_at, " \
        "updated_at) SELECT 'J', g, 'U', 1, 'late', now(), now() FROM generate_series(1, 3000) g"
    conn.execute(seed_more)
    calls: list[int] = []
    report = verify.verify_conversion(ex, spec, batch_size=500, throttle=lambda: calls.append(1))
    assert report.ok, report.summary()
    assert report.caught_up is not None and report.caught_up["rows"] == 3000
    assert len(calls) >= 5


def test_each_swap_attempt_drains_again_after_a_lock_timeout_and_nothing_is_lost(db, conn, caplog) -> None:
    spec, ex = _prepared(conn, 6_000)
    assert convert.install_capture(ex, spec)["capture"]
    for item in convert.plan_fill(ex, spec, batch_size=3_000)["items"]:
        convert.fill(ex, spec, item)
    conn.execute("UPDATE activities SET parameters = 'a' WHERE id <= 500")
    blocker = db.connect(autocommit=False)
    blocker.execute("SELECT 1 FROM activities LIMIT 1")  # ACCESS SHARE held: the swap's lock must wait
    writer = db.connect()

    def retry_seen() -> bool:
        return any("draining the backlog again" in m for m in list(caplog.messages))

    def release() -> None:
        _wait_for(retry_seen)
        writer.execute("UPDATE activities SET parameters = 'b' WHERE id BETWEEN 501 AND 800")  # between attempts
        blocker.rollback()

    t = threading.Thread(target=release)
    with caplog.at_level(logging.INFO, logger="pg_partition"):
        t.start()
        result = convert.swap(ex, spec, lock_timeout="300ms", retries=20)
    t.join()
    blocker.close()
    drains = [m for m in caplog.messages if "pre-lock replay" in m]
    assert len(drains) >= 2, drains  # one drain per attempt
    assert result["lock_ms"] > 0 and catalog.describe(conn, TABLE).is_partitioned
    retired, live = spec.retired, spec.table
    assert row_hash(conn, str(live)) == row_hash(conn, str(retired))
    assert conn.execute("SELECT count(*) FROM activities WHERE parameters = 'b'").fetchone()[0] == 300
    writer.close()
