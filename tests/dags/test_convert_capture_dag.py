"""pg_partition_convert with change capture and replication-lag gating, end to end through dag.test().

* capture on, with the application writing (INSERT, UPDATE, partition-column moves, DELETE, key changes, bulk and
  multi-statement transactions) from its own connection during the whole run: afterwards the new table equals
  the retired one for every key not written after the swap, and the writes made after the swap are in the new
  table (row-level md5 hashes);
* capture_changes auto means on, even for a table that looks append-only (statistics reset on failover); off is
  an explicit opt-in (replay skipped, verify still gates the swap after a catch-up, after_swap catches up);
  capture with a where filter is refused before anything changes;
* dry run with capture on changes nothing (no triggers, no changelog, no state);
* unprep removes capture; unswap leaves no capture behind and requires a new fill;
* lag gating: a healthy standby does not hold the run; an unconsumed logical slot in watch_slots over
  max_lag_bytes makes the fill defer at its start until a consumer catches up; a fill that pauses too long defers to the
  trigger and resumes from its checkpoint.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

import psycopg
import pytest
from airflow.sdk.exceptions import TaskDeferred
from psycopg import sql

from pg_partition.core import convert
from pg_partition.core.convert import capture
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import StateError
from pg_partition.core.db.execute import Executor
from pg_partition.operators.convert import (
    ConvertFillOperator,
    ConvertSwapOperator,
    ConvertUnprepOperator,
    ConvertUnswapOperator,
)
from tests.support.capture import Writer, same_columns_hash
from tests.support.convert import row_hash, snapshot
from tests.support.writers import MirroredWriter
from tools.seed import seed_activities

DAG_ID = "pg_partition_convert"
TABLE = QualifiedName("public", "activities")
ROWS = 20_000
MB = 1024 * 1024
CAPTURE_TASKS = ("replay", "verify")  # both run with capture; append-only skips replay (verify always gates)


def _conf(db: Any, **extra: Any) -> dict[str, Any]:
    return {"conn_id": db.conn_id, "table": str(TABLE), "column": "created_at", "period": "month", "future": 3,
            "cover_data": True, "batch_size": 2_000, "lock_timeout": "2s", "lock_retries": 10, **extra}


def _common(db: Any) -> dict[str, Any]:
    return {"conn_id": db.conn_id, "table": str(TABLE), "column": "created_at", "period": "month"}


def _wait_for(predicate: Any, poll: float = 0.05) -> None:
    while not predicate():
        time.sleep(poll)


def _has_updates(conn: psycopg.Connection[Any]) -> None:
    """Make pg_stat_user_tables show an UPDATE and a DELETE (what capture_changes=auto looks at)."""
    conn.execute("UPDATE activities SET key = key WHERE id = 1")
    conn.execute("DELETE FROM activities WHERE id = 2")
    conn.execute("SELECT pg_stat_force_next_flush()")


def _capture_leftovers(conn: psycopg.Connection[Any]) -> list[Any]:
    return conn.execute(
        """SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname LIKE 'pg_partition_capture%'
           UNION ALL SELECT 'relation ' || relname FROM pg_class WHERE relname LIKE '%changelog%'
           UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE proname LIKE '%capture%'""").fetchall()


class RecordingWriter(Writer):
    """The capture tests' application writer, also remembering the last write it made to each key after the
    swap (insert/update/delete of one row), to check afterwards that those writes are in the new table."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_after_swap: dict[int, str] = {}

    def _record(self, kind: str, rows: list[tuple[Any, ...]], extra_keys: tuple[int, ...] = ()) -> None:
        super()._record(kind, rows, extra_keys)
        for key, oid in rows:
            if oid != self.source_oid:
                single = kind in ("insert", "update", "delete") and len(rows) == 1
                self.last_after_swap[int(key)] = kind if single else "other"
        for key in extra_keys:
            if rows and rows[0][1] != self.source_oid:
                self.last_after_swap[int(key)] = "other"


def _row_md5(conn: psycopg.Connection[Any], table: QualifiedName, key: int) -> str | None:
    row = conn.execute(sql.SQL("SELECT md5(t::text) FROM {} t WHERE id = %s").format(table.ident), (key,)).fetchone()
    return None if row is None else str(row[0])


def test_capture_on_with_a_concurrent_writer_end_to_end(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=ROWS, months=8)
    _has_updates(conn)
    writer = RecordingWriter(db.dsn, TABLE, low=20, high=ROWS, seed=11)
    writer.start()
    _wait_for(lambda: sum(writer.ops.values()) >= 20)
    # capture_changes defaults to auto: on, the table has seen UPDATE/DELETE; verify_after_swap (off by default)
    # runs the logged retired-vs-live comparison too
    result = run_dag(DAG_ID, _conf(db, verify_after_swap=True))
    assert result.state == "success", result.task_states
    _wait_for(lambda: sum(writer.post_swap_ops.values()) >= 60)
    writer.stop()

    states = result.task_states
    assert all(states[t] == "success" for t in CAPTURE_TASKS), states
    assert set(states.values()) == {"success"}, states  # no node is skipped with capture
    assert result.xcom("preflight")["capture"]["capture"] is True
    installed = result.xcom("add_partitions")["capture"]
    assert installed["capture"] is True and installed["created"] is True and "auto" in installed["reason"]
    replayed = result.xcom("replay")
    assert replayed["entries"] > 0 and replayed["backlog"] < 1000  # the writer's changes during the fill
    pre = result.xcom("verify")
    assert pre["ok"] is True and len(pre["partitions"]) >= 9
    swap = result.xcom("swap")
    assert sorted(swap["capture_triggers"]) == sorted(capture.TRIGGERS.values())
    assert swap["replay_before"] is not None and swap["catch_up_before"] is None
    after = result.xcom("after_swap")
    assert after["mode"] == "verify" and "ok" in after["verify"]  # logged, not a gate: writes after the swap differ
    assert result.xcom("report")["capture"]["capture"] is True

    # the writer really wrote during the conversion and after the swap, every kind of write
    assert set(writer.ops) >= {"insert", "update", "move", "delete", "key_change", "bulk_update", "multi"}
    assert catalog.describe(conn, TABLE).is_partitioned
    assert _capture_leftovers(conn) == []

    # every key not written after the swap: the new table equals the retired one, row for row
    retired = ConvertSpec.create(TABLE, "created_at").retired
    post = writer.post_swap_keys
    a, b = same_columns_hash(conn, retired, TABLE, exclude=post)
    # the hash covers every retired row whose key was not written after the swap (how many that is depends on
    # how long the writer ran while the conversion did, so the floor is only "most of the seeded table")
    comparable = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE NOT (id = ANY(%s))").format(retired.ident),
                              (sorted(post),)).fetchone()[0]
    assert a == b and a[0] == comparable and a[0] > ROWS // 2
    # the writes made after the swap are in the new table (and not in the retired one)
    checked = 0
    for key, kind in writer.last_after_swap.items():
        new, old = _row_md5(conn, TABLE, key), _row_md5(conn, retired, key)
        if kind == "insert":
            assert new is not None and old is None, key
        elif kind == "update":
            assert new is not None and new != old, key
        elif kind == "delete":
            assert new is None, key
        else:
            continue
        checked += 1
    assert checked >= 10, writer.last_after_swap


def test_a_steady_writer_does_not_stall_the_run_and_nothing_is_lost(db, conn, run_dag) -> None:
    """Issue 15 case 1 through the DAG: UPDATE + DELETE + INSERT at a steady rate during the whole run (and after
    the swap), each mirrored into ``truth`` in the same transaction; the run finishes and the converted table
    equals the truth row for row."""
    seed_activities(conn, TABLE, rows=ROWS, months=8)
    conn.execute("CREATE TABLE truth AS SELECT * FROM activities")
    writer = MirroredWriter(db.dsn, rate=50, high=ROWS)
    writer.start()
    try:
        result = run_dag(DAG_ID, _conf(db))
        assert result.state == "success", result.task_states
        done = writer.done
        _wait_for(lambda: writer.done >= done + 20)  # and after the swap
    finally:
        writer.stop_event.set()
        writer.join(30)
    assert not writer.errors, writer.errors
    assert catalog.describe(conn, TABLE).is_partitioned
    pre = result.xcom("verify")
    assert pre["ok"] is True and pre["mode"] == "capture" and pre["replayed"] is not None
    assert pre["source_scans"] == 1 and pre["dest_scans"] == 1
    assert row_hash(conn, "activities") == row_hash(conn, "truth")
    assert _capture_leftovers(conn) == []


def test_capture_auto_is_on_even_for_an_append_only_looking_table(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=5_000, months=4)
    conn.execute("SELECT pg_stat_force_next_flush()")
    before = row_hash(conn, "activities")
    result = run_dag(DAG_ID, _conf(db, verify_after_swap=True))
    assert result.state == "success", result.task_states
    states = result.task_states
    assert all(states[t] == "success" for t in CAPTURE_TASKS), states
    after = result.xcom("after_swap")
    assert states["after_swap"] == "success" and after["mode"] == "verify", states
    assert after["verify"]["ok"] is True, after  # nothing wrote since the swap: retired == live
    assert result.xcom("add_partitions")["capture"]["capture"] is True
    assert result.xcom("preflight")["capture"]["capture"] is True
    assert row_hash(conn, "activities") == before == row_hash(conn, "activities_retired")
    assert _capture_leftovers(conn) == []


def test_append_only_is_an_explicit_opt_in_and_verify_still_gates(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=5_000, months=4)
    before = row_hash(conn, "activities")
    result = run_dag(DAG_ID, _conf(db, capture_changes="off"))
    assert result.state == "success", result.task_states
    states = result.task_states
    assert states["replay"] == "skipped", states
    assert states["verify"] == "success" and result.xcom("verify")["ok"] is True, states
    assert result.xcom("verify")["mode"] == "append-only"
    assert states["after_swap"] == "success" and states["report"] == "success", states
    assert result.xcom("after_swap")["mode"] == "catch_up"
    assert result.xcom("add_partitions")["capture"]["capture"] is False
    assert result.xcom("preflight")["capture"]["capture"] is False
    reason = result.xcom("report")["capture"]["reason"]
    assert "append-only" in reason and "pgslice" in reason
    assert row_hash(conn, "activities") == before == row_hash(conn, "activities_retired")
    assert _capture_leftovers(conn) == []


def test_capture_with_a_where_filter_is_refused_before_anything_changes(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=2_000, months=3)
    _has_updates(conn)
    before = snapshot(conn)
    result = run_dag(DAG_ID, _conf(db, where="created_at > '2000-01-01'"))
    assert result.state == "failed" and result.task_states["preflight"] == "failed"
    assert snapshot(conn) == before
    # explicit off: the filtered conversion runs in append-only mode
    result = run_dag(DAG_ID, _conf(db, where="created_at > '2000-01-01'", capture_changes="off"))
    assert result.state == "success", result.task_states
    assert result.xcom("add_partitions")["capture"]["capture"] is False
    assert result.task_states["after_swap"] == "success" and result.xcom("after_swap")["mode"] == "catch_up"
    assert result.task_states["verify"] == "success", result.task_states


def test_dry_run_with_capture_on_changes_nothing(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=3_000, months=3)
    before, hashed = snapshot(conn), row_hash(conn, "activities")
    result = run_dag(DAG_ID, _conf(db, dry_run=True, capture_changes="on"))
    assert result.state == "success", result.task_states
    dry = result.xcom("add_partitions")["capture"]
    assert dry["capture"] is True and dry["created"] is True  # it logged the statements it would run
    assert snapshot(conn) == before and row_hash(conn, "activities") == hashed
    assert _capture_leftovers(conn) == []


def test_unprep_removes_capture(db, conn) -> None:
    seed_activities(conn, TABLE, rows=2_000, months=3, indexes=False)
    spec = ConvertSpec.create(TABLE, "created_at")
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    assert convert.install_capture(ex, spec, "on")["created"] is True
    conn.execute("UPDATE activities SET key = 'x' WHERE id < 10")
    assert capture.backlog(conn, TABLE) == 9 and _capture_leftovers(conn)
    out = ConvertUnprepOperator(task_id="unprep", **_common(db)).execute({})
    assert out["capture_removed"] is True and out["dropped"] is True
    assert _capture_leftovers(conn) == [] and not catalog.exists(conn, spec.intermediate)
    conn.execute("UPDATE activities SET key = 'y' WHERE id < 10")  # the application's writes work as before


def test_unswap_after_a_captured_conversion_leaves_no_capture_and_needs_a_new_fill(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=4_000, months=3)
    result = run_dag(DAG_ID, _conf(db, capture_changes="on"))
    assert result.state == "success", result.task_states
    # verify_after_swap is off by default: the gate was the verify before the swap
    assert result.xcom("after_swap") == {"mode": "none", "verify_after_swap": False}
    out = ConvertUnswapOperator(task_id="unswap", **_common(db)).execute({})
    assert out["refill_needed"] is True
    assert not catalog.describe(conn, TABLE).is_partitioned and _capture_leftovers(conn) == []
    conn.execute("UPDATE activities SET key = 'after unswap' WHERE id = 5")
    # the intermediate no longer follows the table: swapping again without a new fill is refused
    with pytest.raises(StateError, match="fill"):
        ConvertSwapOperator(task_id="swap", **_common(db)).execute({})
    # a new run installs capture again, fills again and swaps: the update made in between is carried over
    again = run_dag(DAG_ID, _conf(db, capture_changes="on"))
    assert again.state == "success", again.task_states
    assert again.xcom("preflight")["resuming"] is True and again.xcom("add_partitions")["capture"]["created"] is True
    assert conn.execute("SELECT key FROM activities WHERE id = 5").fetchone() == ("after unswap",)
    assert row_hash(conn, "activities") == row_hash(conn, "activities_retired")
    assert _capture_leftovers(conn) == []


# ------------------------------------------------------------------------------------------ replication lag


def test_lag_gated_run_with_a_healthy_standby_succeeds(db, conn, run_dag) -> None:
    seed_activities(conn, TABLE, rows=5_000, months=3)
    before = row_hash(conn, "activities")
    result = run_dag(DAG_ID, _conf(db, max_lag_bytes=256 * MB, max_lag_seconds=120, watch_slots=None,
                                   max_pause_seconds=600))
    assert result.state == "success", result.task_states
    # no sensor tasks: the fill, the index builds and the swap each measured lag when they started
    assert not [t for t in result.task_states if t.startswith("lag_")], result.task_states
    for task, out in (("fill", result.xcom("fill", 0)), ("indexes", result.xcom("indexes")),
                      ("swap", result.xcom("swap"))):
        gate = out["lag_gate"]
        assert gate["ok"] is True and "gated" not in gate and gate["measured_at"], (task, gate)
    assert row_hash(conn, "activities") == before == row_hash(conn, "activities_retired")


def _unconfirmed(conn: psycopg.Connection[Any], slot: str) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), confirmed_flush_lsn)::bigint "
                       "FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    assert row is not None
    return int(row[0])


def _consume(conn: psycopg.Connection[Any], slot: str) -> None:
    conn.execute("SELECT count(*) FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,))


class SlotFeed(threading.Thread):
    """A warehouse feed that is down until the lag gate has measured the slot, then catches up and keeps up.

    It starts consuming only once a pg_partition session has *finished* a lag measurement (idle, its last
    statement the slots query of ``core.lag``, the last one a measurement runs on a primary): the fill's own
    check at its start, or the deferred trigger waiting between polls. So the first check always sees the slot
    unconsumed (over the limit), and the run can only get past it by waiting for this feed.
    """

    def __init__(self, db: Any, slot: str) -> None:
        super().__init__(daemon=True)
        self.db, self.slot = db, slot
        self.stop_event = threading.Event()
        self.unconfirmed_at_first_check: int | None = None
        self.first_consumed_at: datetime | None = None
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with self.db.connect() as c:
                while not self.stop_event.is_set():
                    seen = c.execute(
                        """SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                           AND application_name = 'pg_partition' AND state = 'idle'
                           AND query LIKE '%confirmed_flush_lsn%'""").fetchone()
                    if seen and seen[0]:
                        break
                    time.sleep(0.005)
                if self.stop_event.is_set():
                    return
                self.unconfirmed_at_first_check = _unconfirmed(c, self.slot)
                self.first_consumed_at = c.execute("SELECT clock_timestamp()").fetchone()[0]
                while not self.stop_event.wait(0.1):
                    _consume(c, self.slot)
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        if self.errors:
            raise self.errors[0]


def _try_number(dag_id: str, run_id: str, task_id: str) -> int:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id,
                                                TaskInstance.task_id == task_id).one()
        return int(ti.try_number)


def test_unconsumed_slot_over_max_lag_bytes_makes_the_fill_wait_for_the_feed(db, conn, run_dag) -> None:
    limit = 2 * MB
    seed_activities(conn, TABLE, rows=8_000, months=3)
    conn.execute("SELECT pg_create_logical_replication_slot('feed', 'test_decoding')")
    conn.execute("CREATE TABLE walgen AS SELECT g AS id, repeat(md5(g::text), 6) AS pad "
                 "FROM generate_series(1, 30000) g")  # several MB of WAL nobody has read from the slot
    assert _unconfirmed(conn, "feed") > limit
    before = row_hash(conn, "activities")
    feed = SlotFeed(db, "feed")
    feed.start()
    try:
        result = run_dag(DAG_ID, _conf(db, max_lag_bytes=limit, watch_slots=["feed"], max_pause_seconds=600))
    finally:
        feed.stop()
    assert result.state == "success", result.task_states
    # the fill's first check saw the slot over the limit (nobody had read it), so it could only start after a
    # later measurement, taken after the feed caught up: it waited (deferred), it did not fail and retry
    assert feed.unconfirmed_at_first_check is not None and feed.unconfirmed_at_first_check > limit
    out = result.xcom("fill", 0)["lag_gate"]  # one fill task (8,000 rows); it deferred at its start
    assert out["ok"] is True and out["worst_bytes"] <= limit
    assert feed.first_consumed_at is not None
    assert datetime.fromisoformat(out["measured_at"]) > feed.first_consumed_at
    assert _try_number(DAG_ID, result.run_id, "fill") == 1
    assert row_hash(conn, "activities") == before == row_hash(conn, "activities_retired")


def test_fill_pausing_too_long_defers_to_the_trigger_and_resumes_from_its_checkpoint(db, conn) -> None:
    seed_activities(conn, TABLE, rows=6_000, months=2, indexes=False)
    spec = ConvertSpec.create(TABLE, "created_at")
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    plan = convert.plan_fill(ex, spec, batch_size=500)
    item = max(plan["items"], key=lambda it: it["rows"])
    conn.execute("SELECT pg_create_logical_replication_slot('feed', 'test_decoding')")
    conn.execute("CREATE TABLE walgen AS SELECT g AS id, repeat(md5(g::text), 6) AS pad "
                 "FROM generate_series(1, 20000) g")
    op = ConvertFillOperator(task_id="fill", item=item, max_lag_bytes="1MB", watch_slots="['feed']",
                             max_pause_seconds="0", lag_poll_seconds=5, **_common(db))
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    assert deferred.value.method_name == "resume_after_lag"
    trigger = deferred.value.trigger.serialize()
    assert trigger[0] == "pg_partition.triggers.lag.ReplicationLagTrigger"
    assert trigger[1]["slots"] == ["feed"] and trigger[1]["max_lag_bytes"] == MB
    assert trigger[1]["poll_interval"] == 5.0
    copied = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(QualifiedName(*item["target"]).ident)
                          ).fetchone()[0]
    assert copied == 0  # held before its first batch
    # the feed catches up and keeps up; the trigger fires; Airflow calls resume_after_lag on a fresh try, which
    # tolerates short pauses again (max_pause_seconds=0 above only forced the deferral at the first check)
    feed = SlotFeed(db, "feed")
    feed.start()
    op.max_pause_seconds = "600"
    try:
        done = op.resume_after_lag({}, event={"status": "ok", "summary": "fine"})
    finally:
        feed.stop()
    assert feed.first_consumed_at is not None  # the resumed fill measured the slot before its first batch
    assert done["rows"] == item["rows"]
    target = QualifiedName(*item["target"])
    src = conn.execute(sql.SQL(
        "SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY id)) FROM {} t WHERE created_at >= %s "
        "AND created_at < %s").format(TABLE.ident), (item["range"][0], item["range"][1])).fetchone()
    dst = conn.execute(sql.SQL("SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY id)) FROM {} t").format(
        target.ident)).fetchone()
    assert src == dst
    with pytest.raises(Exception, match="replication-lag trigger"):
        op.resume_after_lag({}, event={"status": "error", "message": "slot lost"})
