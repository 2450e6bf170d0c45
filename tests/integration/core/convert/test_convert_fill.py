"""The fill and catch-up under stress: SIGKILL mid-fill, late commits below the high-water mark, re-filling over
bad data, throttling, and the swap's lock discipline."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest

from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import state
from pg_partition.core.db.errors import LockTimeoutExhausted, StateError
from pg_partition.core.db.execute import Executor
from tests.support.convert import REPO_ROOT, row_hash, snapshot
from tools.seed import seed_activities

SPEC = ConvertSpec.create("activities", "created_at", period="month")


def _ready(conn: psycopg.Connection[Any], rows: int, *, timestamptz: bool = True) -> Executor:
    seed_activities(conn, "public.activities", rows=rows, timestamptz=timestamptz)
    ex = Executor(conn)
    convert.prep(ex, SPEC)
    convert.add_partitions(ex, SPEC, cover_data=True, future=1)
    return ex


def _copied(conn: psycopg.Connection[Any]) -> int:
    return sum(int(v.get("rows", 0)) for v in state.checkpoints(conn, SPEC.job_id, "fill").values())


@pytest.mark.parametrize("sessions", [1, 2])
def test_sigkill_mid_fill_then_resume_loses_and_duplicates_nothing(db, conn, sessions) -> None:
    ex = _ready(conn, 40_000)
    plan = convert.plan_fill(ex, SPEC, batch_size=500)
    code = (
        "import psycopg\n"
        "from pg_partition.core import convert\n"
        "from pg_partition.core.convert.spec import ConvertSpec\n"
        "from pg_partition.core.db.execute import Executor\n"
        f"conn = psycopg.connect({db.dsn!r}, autocommit=True)\n"
        "spec = ConvertSpec.create('activities', 'created_at', period='month')\n"
        f"convert.fill(Executor(conn), spec, sleep_seconds=0.05, sessions={sessions})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT)
    try:
        while _copied(conn) < 8_000:
            assert proc.poll() is None, "the fill finished before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # wait for the killed client's backend to go away (its open batch is rolled back)
    while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND pid <> pg_backend_pid() AND backend_type = 'client backend'").fetchone()[0]:
        time.sleep(0.05)
    copied_rows = conn.execute("SELECT count(*) FROM activities_intermediate").fetchone()[0]
    # the checkpoints committed with their batches: they agree with the data exactly
    assert copied_rows == _copied(conn)
    assert 0 < copied_rows < 40_000
    pending = convert.fill_status(conn, SPEC)["pending"]
    assert pending and len(pending) < len(plan["items"])

    result = convert.fill(ex, SPEC, sessions=sessions)
    assert any(r["resumed"] for r in result["items"])
    assert row_hash(conn, "activities_intermediate") == row_hash(conn, "activities")
    assert convert.fill_status(conn, SPEC)["pending"] == []


def test_a_failing_session_stops_the_group_and_a_retry_completes_it(conn) -> None:
    """Two sessions copy a work group; an error in one (here the throttle, as a lag pause that gives up would)
    stops both, is raised to the caller, and leaves checkpoints that agree with the data; the retry finishes."""
    ex = _ready(conn, 30_000)
    plan = convert.plan_fill(ex, SPEC, batch_size=500)
    group = {"key": "all", "items": plan["items"]}
    calls = []
    sessions_seen = set()

    def lagging() -> None:  # from the 12th batch on, every batch finds lag over the limit
        calls.append(1)
        sessions_seen.add(threading.current_thread().name)
        if len(calls) >= 12:
            raise RuntimeError("replication lag pause gave up")

    with pytest.raises(RuntimeError, match="pause gave up"):
        convert.fill(ex, SPEC, group, sessions=2, throttle=lagging)
    assert len(sessions_seen) == 2  # both sessions were copying
    copied_rows = conn.execute("SELECT count(*) FROM activities_intermediate").fetchone()[0]
    assert 0 < copied_rows < 30_000 and copied_rows == _copied(conn)
    assert convert.fill_status(conn, SPEC)["pending"]  # the other session stopped too, items are left
    result = convert.fill(ex, SPEC, group, sessions=2)
    assert result["rows"] == 30_000 and any(r["resumed"] for r in result["items"])
    assert row_hash(conn, "activities_intermediate") == row_hash(conn, "activities")
    assert convert.fill_status(conn, SPEC)["pending"] == []


def test_refill_replaces_whatever_the_destination_holds(conn) -> None:
    ex = _ready(conn, 20_000)
    convert.plan_fill(ex, SPEC, batch_size=1_000)
    convert.fill(ex, SPEC)
    # damage the copy: lost rows, stale rows, a row that does not exist in the source
    conn.execute("DELETE FROM activities_intermediate WHERE id % 97 = 0")
    conn.execute("UPDATE activities_intermediate SET key = 'stale' WHERE id % 89 = 0")
    conn.execute("DELETE FROM activities WHERE id = 5000")
    assert row_hash(conn, "activities_intermediate") != row_hash(conn, "activities")
    plan = convert.plan_fill(ex, SPEC, batch_size=1_000, replan=True)
    assert convert.fill_status(conn, SPEC)["pending"] == [i["key"] for i in plan["items"]]
    convert.fill(ex, SPEC)
    assert row_hash(conn, "activities_intermediate") == row_hash(conn, "activities")


def test_plan_is_recorded_and_reused(conn) -> None:
    ex = _ready(conn, 5_000)
    first = convert.plan_fill(ex, SPEC, batch_size=700)
    conn.execute("INSERT INTO activities (created_at, updated_at) VALUES (now(), now())")
    assert convert.plan_fill(ex, SPEC, batch_size=700) == first
    with pytest.raises(StateError, match="planned with where=None"):
        convert.plan_fill(ex, SPEC, where="owner_id > 5")


def wait_in_writer_loop(conn: psycopg.Connection[Any], application_name: str, timeout: float = 120) -> None:
    """Wait until the session ``application_name`` runs the writer-wait loop's poll of pg_locks: a state only
    reached while an in-flight writer of the table is still pending (no fixed sleep: a slow machine only waits
    longer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute("SELECT query FROM pg_stat_activity WHERE application_name = %s",
                           (application_name,)).fetchone()
        if row and "virtualtransaction = ANY" in (row[0] or ""):
            return
        time.sleep(0.05)
    raise AssertionError(f"{application_name} never entered the wait for in-flight writers")


def test_plan_waits_for_a_writer_holding_a_lower_id(db, conn) -> None:
    ex = _ready(conn, 5_000)
    late = db.connect(autocommit=False)
    late_id = late.execute("INSERT INTO activities (created_at, updated_at) VALUES (now(), now()) RETURNING id"
                           ).fetchone()[0]
    conn.execute("INSERT INTO activities (created_at, updated_at) SELECT now(), now() FROM generate_series(1, 3)")
    assert conn.execute("SELECT max(id) FROM activities").fetchone()[0] == late_id + 3  # committed above it
    result: dict[str, Any] = {}

    def plan() -> None:
        with db.connect(application_name="pgp_planner") as c:
            result["plan"] = convert.plan_fill(Executor(c), SPEC, batch_size=500)

    worker = threading.Thread(target=plan)
    worker.start()
    wait_in_writer_loop(conn, "pgp_planner")
    assert worker.is_alive() and "plan" not in result, "the plan did not wait for the in-flight writer"
    late.commit()
    late.close()
    worker.join()
    assert result["plan"]["high_water"] >= late_id + 3
    convert.fill(ex, SPEC)
    assert conn.execute("SELECT count(*) FROM activities_intermediate WHERE id = %s", (late_id,)).fetchone()[0] == 1
    assert row_hash(conn, "activities_intermediate") == row_hash(conn, "activities")


def test_catch_up_does_not_miss_a_late_commit_below_the_copied_max(db, conn) -> None:
    ex = _ready(conn, 5_000)
    convert.plan_fill(ex, SPEC, batch_size=500)
    convert.fill(ex, SPEC)
    conn.execute("INSERT INTO activities (created_at, updated_at) SELECT now(), now() FROM generate_series(1, 5)")
    convert.catch_up(ex, SPEC)  # copies those 5 and advances the safe high-water mark
    late = db.connect(autocommit=False)
    late_id = late.execute("INSERT INTO activities (created_at, updated_at) VALUES (now(), now()) RETURNING id"
                           ).fetchone()[0]
    conn.execute("INSERT INTO activities (created_at, updated_at) SELECT now(), now() FROM generate_series(1, 5)")
    result: dict[str, Any] = {}

    def catch() -> None:
        with db.connect(application_name="pgp_catch_up") as c:
            result["first"] = convert.catch_up(Executor(c), SPEC)

    worker = threading.Thread(target=catch)
    worker.start()
    wait_in_writer_loop(conn, "pgp_catch_up")
    assert worker.is_alive() and "first" not in result, "catch-up did not wait for the in-flight writer"
    late.commit()
    late.close()
    worker.join()
    # pgslice's fill --swapped would start above max(id) of the destination (late_id + 5) and miss late_id
    assert conn.execute("SELECT count(*) FROM activities_intermediate WHERE id = %s", (late_id,)).fetchone()[0] == 1
    assert row_hash(conn, "activities_intermediate") == row_hash(conn, "activities")
    assert convert.catch_up(ex, SPEC)["rows"] == 0  # safe to repeat


def test_pgslice_style_swap_then_catch_up_after_it(conn) -> None:
    ex = _ready(conn, 5_000)
    convert.plan_fill(ex, SPEC, batch_size=500)
    convert.fill(ex, SPEC)
    conn.execute("INSERT INTO activities (created_at, updated_at) SELECT now(), now() FROM generate_series(1, 7)")
    swapped = convert.swap(ex, SPEC, sync=False)
    assert swapped["synced"]["rows"] == 0
    assert conn.execute("SELECT count(*) FROM activities").fetchone()[0] == 5_000
    first = convert.catch_up(ex, SPEC)
    assert first["rows"] == 7 and first["after_swap"] is True
    assert row_hash(conn, "activities") == row_hash(conn, "activities_retired")
    assert convert.catch_up(ex, SPEC)["rows"] == 0
    assert convert.swap(ex, SPEC)["already_swapped"] is True


def test_catch_up_full_finds_ids_below_the_high_water_mark(conn) -> None:
    ex = _ready(conn, 3_000)
    convert.plan_fill(ex, SPEC, batch_size=500)
    convert.fill(ex, SPEC)
    conn.execute("DELETE FROM activities_intermediate WHERE id = 1500")  # as if the application reused an id
    assert convert.catch_up(ex, SPEC)["rows"] == 0
    assert convert.catch_up(ex, SPEC, full=True)["rows"] == 1
    assert row_hash(conn, "activities_intermediate") == row_hash(conn, "activities")


def test_swap_copies_the_rows_committed_since_the_last_catch_up(conn) -> None:
    ex = _ready(conn, 5_000)
    convert.plan_fill(ex, SPEC, batch_size=500)
    convert.fill(ex, SPEC)
    convert.catch_up(ex, SPEC)
    conn.execute("INSERT INTO activities (created_at, updated_at) SELECT now(), now() FROM generate_series(1, 4)")
    result = convert.swap(ex, SPEC)
    # copied by the last pass just before the lock, or by the anti-join under it: either way, all four
    assert result["last_pass_rows"] + result["synced"]["rows"] == 4
    assert row_hash(conn, "activities") == row_hash(conn, "activities_retired")


def test_throttle_and_progress_lines(conn, caplog) -> None:
    ex = _ready(conn, 6_000)
    plan = convert.plan_fill(ex, SPEC, batch_size=400)
    calls: list[float] = []
    caplog.set_level(logging.INFO, logger="pg_partition")
    result = convert.fill(ex, SPEC, throttle=lambda: calls.append(time.monotonic()))
    batches = sum(r["batches"] for r in result["items"])
    assert batches == sum(i["batches"] for i in plan["items"])
    assert len(calls) == batches  # before every batch (the lag gate rate-limits its own checks)
    lines = [r.getMessage() for r in caplog.records if "batches (" in r.getMessage()]
    assert lines and all("rows/s" in x and "ETA" in x for x in lines)


def test_swap_refuses_an_incomplete_fill(conn) -> None:
    ex = _ready(conn, 5_000)
    plan = convert.plan_fill(ex, SPEC, batch_size=500)
    convert.fill(ex, SPEC, plan["items"][0])
    before = snapshot(conn)
    with pytest.raises(StateError, match="not complete"):
        convert.swap(ex, SPEC)
    assert snapshot(conn) == before


def test_swap_gives_up_after_its_lock_retries_and_changes_nothing(db, conn) -> None:
    ex = _ready(conn, 2_000)
    convert.plan_fill(ex, SPEC, batch_size=500)
    convert.fill(ex, SPEC)
    reader = db.connect(autocommit=False)
    reader.execute("SELECT 1 FROM activities LIMIT 1")  # a long transaction holding ACCESS SHARE
    before = snapshot(conn)
    with pytest.raises(LockTimeoutExhausted, match=r"swap public\.activities"):
        convert.swap(ex, SPEC, lock_timeout="100ms", retries=2)
    assert snapshot(conn) == before
    reader.rollback()
    reader.close()
    assert convert.swap(ex, SPEC, lock_timeout="1s")["lock_ms"] > 0
