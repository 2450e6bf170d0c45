"""Replication-lag gating against real replication: the harness's streaming standby (replay paused and resumed
for real), real logical slots that nobody consumes, a checkpointed batch loop held back by the gate, the sensor in
poke and deferrable mode, and the async trigger's run() on pytest-asyncio's event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowSensorTimeout, AirflowSkipException, TaskDeferred

from pg_partition.core.db import state
from pg_partition.core.lag import (
    SOURCE_AURORA,
    LagGate,
    LagMeasurementError,
    LagPauseTooLong,
    LagThresholds,
    StandbyMissingError,
    ameasure,
    measure,
)
from pg_partition.sensors.lag import ReplicationLagSensor
from pg_partition.triggers.lag import ReplicationLagTrigger, conninfo_from_connection
from tests.support.lag import replay_paused, standby_caught_up, wait_until, write_wal
from tools.stack import postgres_conn_json

MB = 1024 * 1024
HASH = "SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY id)) FROM {} t"


def lag_sensor(conn_id: str, **kwargs: Any) -> ReplicationLagSensor:
    kwargs.setdefault("deferrable", False)
    kwargs.setdefault("poke_interval", 0.2)
    return ReplicationLagSensor(task_id=f"lag_{uuid.uuid4().hex[:6]}", conn_id=conn_id, **kwargs)


# ---------------------------------------------------------------------------------------------------- measuring


def test_primary_sees_streaming_standby_and_its_physical_slot(conn) -> None:
    wait_until(lambda: standby_caught_up(conn), "standby caught up")
    report = measure(conn)
    assert not report.in_recovery and report.server_version >= 130000 and not report.aurora
    (sb,) = [s for s in report.standbys if s.name == "standby1"]
    assert sb.state == "streaming" and sb.client_addr == "127.0.0.1" and sb.replay_lag_bytes == 0
    (slot,) = [s for s in report.slots if s.name == "standby1"]
    assert slot.slot_type == "physical" and slot.active and slot.wal_status in {"reserved", "extended"}
    verdict = LagThresholds(max_lag_bytes=MB, max_lag_seconds=30, standbys=("standby1",)).evaluate(report)
    assert verdict.ok, verdict.reasons


def test_standby_idle_primary_is_zero_delay_not_hours(db, cluster) -> None:
    with db.connect() as p:
        p.execute("CREATE TABLE t (x int)")
        p.execute("INSERT INTO t VALUES (1)")
        wait_until(lambda: standby_caught_up(p), "standby replayed the commit")
    time.sleep(1.5)  # the primary is now idle: the last replayed commit gets older and older
    with psycopg.connect(db.standby_dsn(), autocommit=True) as s:
        report = measure(s)
        since_commit = s.execute(
            "SELECT extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())").fetchone()[0]
    assert report.in_recovery and report.local is not None
    assert report.local.receiver == "streaming" and not report.local.paused
    assert float(since_commit) > 1.0
    assert report.local.replay_delay_seconds == 0.0 and report.local.replay_lag_bytes == 0
    assert LagThresholds(max_lag_bytes=MB, max_lag_seconds=1).evaluate(report).ok


async def test_async_measure_runs_the_same_sql(db) -> None:
    async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as aconn:
        areport = await ameasure(aconn)
    with db.connect() as c:
        report = measure(c)
    assert {s.name for s in areport.standbys} == {s.name for s in report.standbys} == {"standby1"}
    assert {s.name for s in areport.slots} == {s.name for s in report.slots}


def test_measure_on_a_non_autocommit_connection_leaves_no_transaction_open(db) -> None:
    with db.connect(autocommit=False) as c:
        measure(c)
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_missing_expected_standby_and_slot_are_errors_not_zero(conn, db) -> None:
    with pytest.raises(StandbyMissingError, match=r"\['standby9'\] are not connected \(connected: standby1\)"):
        LagThresholds(max_lag_bytes=MB, standbys=("standby1", "standby9")).evaluate(measure(conn))
    sensor = lag_sensor(db.conn_id, max_lag_bytes="1MB", standbys=["standby9"])
    with pytest.raises(StandbyMissingError, match="How to fix"):
        sensor.poke({})
    with pytest.raises(LagMeasurementError, match="feed_that_never_was"):
        lag_sensor(db.conn_id, max_lag_bytes="1MB", watch_slots="feed_that_never_was").poke({})
    # checking changed nothing: no slot appeared
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'feed_that_never_was'"
                        ).fetchone() == (0,)


def test_unprivileged_user_gets_a_clear_error_then_works_with_pg_monitor(db, conn) -> None:
    role = f"lag_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        with psycopg.connect(db.dsn.replace("user=postgres", f"user={role}"), autocommit=True) as weak:
            with pytest.raises(LagMeasurementError, match="GRANT pg_monitor"):
                measure(weak)
            conn.execute(f'GRANT pg_monitor TO "{role}"')
            report = measure(weak)
            assert "standby1" in report.standby_names()
    finally:
        conn.execute(f'DROP ROLE "{role}"')


def test_aurora_replica_status_when_the_function_exists(conn) -> None:
    """Aurora cannot run here. A stand-in function with the documented columns of aurora_replica_status()
    proves the SQL and parsing work against a real server; real Aurora is untested."""
    conn.execute("""
        CREATE FUNCTION public.aurora_replica_status(
            OUT server_id text, OUT session_id text, OUT durable_lsn bigint, OUT highest_lsn_rcvd bigint,
            OUT current_read_lsn bigint, OUT cur_replay_latency_in_usec bigint, OUT active_txns bigint,
            OUT is_current boolean, OUT last_transport_error integer, OUT last_error_timestamp timestamptz,
            OUT last_update_timestamp timestamptz, OUT feedback_xmin bigint, OUT feedback_epoch integer,
            OUT replica_lag_in_msec real, OUT log_stream_speed_in_kib_per_second real,
            OUT log_buffer_sequence_number bigint, OUT oldest_read_view_trx_id bigint,
            OUT oldest_read_view_lsn bigint, OUT pending_read_ios bigint, OUT read_ios bigint,
            OUT iops integer, OUT cpu real)
        RETURNS SETOF record LANGUAGE sql AS $$
          VALUES ('writer-1', 'MASTER_SESSION_ID', 900, 900, 900, 0, 3, NULL::boolean, 0, NULL::timestamptz,
                  NULL::timestamptz, 1, 0, -1::real, 100::real, 1, 0, 900, 0, 0, 0, 1::real),
                 ('reader-1', 'a1b2c3d4-uuid', 880, 900, 880, 150, 0, NULL, 0, NULL, now(), 1, 0,
                  12.5::real, 100::real, 1, 0, 880, 0, 7, 0, 1::real),
                 ('reader-2', 'e5f6a7b8-uuid', 500, 900, 500, 150, 0, NULL, 0, NULL, now(), 1, 0,
                  4500::real, 100::real, 1, 0, 500, 0, 7, 0, 1::real)
        $$""")
    report = measure(conn)
    assert report.aurora
    readers = {s.name: s for s in report.standbys if s.source == SOURCE_AURORA}
    assert set(readers) == {"reader-1", "reader-2"}  # the writer's own row is not a replica
    assert readers["reader-1"].replay_lag_seconds == pytest.approx(0.0125)
    assert readers["reader-2"].replay_lag_seconds == pytest.approx(4.5)
    assert readers["reader-2"].replay_lag_bytes is None  # Aurora LSNs are not byte positions
    verdict = LagThresholds(max_lag_seconds=1, standbys=("reader-1", "reader-2")).evaluate(report)
    assert not verdict.ok and verdict.reasons == ("Aurora reader 'reader-2': 4.5s behind > max 1s "
                                                  "(replica_lag_in_msec)",)
    assert LagThresholds(max_lag_seconds=10, standbys=("reader-1",)).evaluate(report).ok
    with pytest.raises(StandbyMissingError, match="reader-3"):
        LagThresholds(max_lag_seconds=10, standbys=("reader-3",)).evaluate(report)


# ------------------------------------------------------------------------------- paused replay and the sensor


def test_sensor_does_not_succeed_while_replay_is_paused_and_succeeds_after_resume(db, cluster, monkeypatch) -> None:
    standby_conn_id = f"pg_standby_{db.name}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{standby_conn_id.upper()}", postgres_conn_json(cluster.standby, db.name))
    on_primary = lag_sensor(db.conn_id, max_lag_bytes="1MB", standbys=["standby1"], watch_slots=[])
    on_standby = lag_sensor(standby_conn_id, max_lag_bytes="1MB")
    by_seconds = lag_sensor(db.conn_id, max_lag_seconds=1, standbys="standby1", watch_slots="[]")
    with db.connect() as p:
        wait_until(lambda: standby_caught_up(p), "standby caught up")
        assert on_primary.poke({}) and on_standby.poke({})
        with replay_paused(cluster):
            write_wal(p)
            for _ in range(3):
                assert not on_primary.poke({})
                assert not on_standby.poke({})
            v = LagThresholds(max_lag_bytes=MB).evaluate(measure(psycopg.connect(db.standby_dsn())))
            assert "this standby (replay paused)" in v.reasons[0]
            # PostgreSQL's lag tracker keeps growing replay_lag while replay is stuck: seconds gate too
            wait_until(lambda: not by_seconds.poke({}), "replay_lag seconds over 1s while paused")
            # the full sensor in poke mode: times out (fails) or, with soft_fail, skips
            with pytest.raises(AirflowSensorTimeout):
                lag_sensor(db.conn_id, max_lag_bytes="1MB", timeout=1).execute({})
            with pytest.raises(AirflowSkipException):
                lag_sensor(db.conn_id, max_lag_bytes="1MB", timeout=1, soft_fail=True).execute({})
            # deferrable: the first check fails, so it hands the wait to the trigger
            deferring = ReplicationLagSensor(task_id="lag_d", conn_id=db.conn_id, max_lag_bytes="1MB",
                                             watch_slots=[], poke_interval=5, timeout=600, deferrable=True)
            with pytest.raises(TaskDeferred) as deferred:
                deferring.execute({})
            assert deferred.value.method_name == "execute_complete"
            assert deferred.value.timeout == timedelta(seconds=600)
            assert deferred.value.trigger.serialize() == ("pg_partition.triggers.lag.ReplicationLagTrigger", {
                "conn_id": db.conn_id, "max_lag_bytes": MB, "max_lag_seconds": None, "standbys": None,
                "slots": [], "poll_interval": 5.0, "max_connect_failures": 10})
        result = wait_until(lambda: on_primary.execute({}) if on_primary.poke({}) else None, "sensor succeeds")
        assert result["ok"] is True and result["worst_bytes"] <= MB
        wait_until(lambda: on_standby.poke({}), "standby-side sensor succeeds")
        wait_until(lambda: by_seconds.poke({}), "seconds sensor succeeds")


def test_sensor_without_limits_does_not_gate_and_execute_complete_reports_errors(db) -> None:
    assert lag_sensor(db.conn_id).execute({}) == {"ok": True, "gated": False}
    sensor = lag_sensor(db.conn_id, max_lag_bytes=MB, deferrable=True)
    assert sensor.execute_complete({}, {"status": "ok", "polls": 3, "summary": "fine",
                                        "result": {"ok": True}}) == {"ok": True}
    with pytest.raises(LagMeasurementError, match="standby9"):
        sensor.execute_complete({}, {"status": "error", "error": "StandbyMissingError",
                                     "message": "expected standby(s) ['standby9'] are not connected"})


# ---------------------------------------------------------------------------------------------------- trigger


def test_trigger_serialize_round_trips_exactly() -> None:
    from airflow.models.trigger import Trigger

    def import_string(path: str) -> Any:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    trigger = ReplicationLagTrigger(conn_id="pg_main", max_lag_bytes=64 * MB, max_lag_seconds=30.0,
                                    standbys=["standby1"], slots=["warehouse_feed"], poll_interval=15.0)
    expected = ("pg_partition.triggers.lag.ReplicationLagTrigger", {
        "conn_id": "pg_main", "max_lag_bytes": 64 * MB, "max_lag_seconds": 30.0, "standbys": ["standby1"],
        "slots": ["warehouse_feed"], "poll_interval": 15.0, "max_connect_failures": 10})
    assert trigger.serialize() == expected
    classpath, kwargs = trigger.serialize()
    stored = Trigger._decrypt_kwargs(Trigger.encrypt_kwargs(kwargs))  # how the triggerer stores and reads it
    assert import_string(classpath)(**stored).serialize() == expected
    everything = ReplicationLagTrigger(conn_id="c")
    assert import_string(classpath)(**everything.serialize()[1]).serialize() == everything.serialize()
    assert everything.serialize()[1]["standbys"] is None and everything.serialize()[1]["slots"] is None


def test_conninfo_keeps_libpq_extras_and_drops_hook_switches() -> None:
    from airflow.sdk import Connection

    c = Connection(conn_id="x", conn_type="postgres", host="db.example", port=6432, login="u", password="p w",
                   schema="app")
    info = psycopg.conninfo.conninfo_to_dict(conninfo_from_connection(
        c, {"sslmode": "require", "cursor": "dictcursor", "connect_timeout": 5}))
    assert info == {"host": "db.example", "port": "6432", "user": "u", "password": "p w", "dbname": "app",
                    "application_name": "pg_partition", "sslmode": "require", "connect_timeout": "5"}


async def test_trigger_waits_while_replay_is_paused_and_fires_after_resume(db, cluster) -> None:
    trigger = ReplicationLagTrigger(conn_id=db.conn_id, max_lag_bytes=MB, standbys=["standby1"], slots=[],
                                    poll_interval=0.1)
    with db.connect() as p:
        wait_until(lambda: standby_caught_up(p), "standby caught up")
        with replay_paused(cluster):
            write_wal(p)
            events = trigger.run()
            fired = asyncio.ensure_future(events.__anext__())
            while trigger.polls < 5:  # five measurements, all over the threshold: it must not fire
                assert not fired.done(), fired.result().payload
                await asyncio.sleep(0.05)
            assert not fired.done()
        event = await asyncio.wait_for(fired, 90)
        await events.aclose()
    assert event.payload["status"] == "ok" and event.payload["polls"] >= 6
    assert event.payload["result"]["ok"] is True
    assert json.loads(json.dumps(event.payload)) == event.payload  # events must be JSON-safe


async def test_trigger_fires_error_for_missing_standby_and_unknown_connection(db) -> None:
    event = await ReplicationLagTrigger(conn_id=db.conn_id, max_lag_bytes=MB, standbys=["standby9"]
                                        ).run().__anext__()
    assert event.payload["status"] == "error" and event.payload["error"] == "StandbyMissingError"
    assert "standby9" in event.payload["message"]
    event = await ReplicationLagTrigger(conn_id="no_such_conn_id", max_lag_bytes=MB).run().__anext__()
    assert event.payload["status"] == "error" and "no_such_conn_id" in event.payload["message"]


# ------------------------------------------------------------------------- logical slot holding a batch loop


def make_source(conn: psycopg.Connection[Any], rows: int) -> None:
    conn.execute("CREATE TABLE src (id bigint PRIMARY KEY, at timestamptz NOT NULL, pad text NOT NULL)")
    conn.execute("""INSERT INTO src SELECT g, timestamptz '2024-01-01' + g * interval '1 minute',
                    repeat(md5(g::text), 4) FROM generate_series(1, %s) g""", (rows,))
    conn.execute("CREATE TABLE dst (LIKE src INCLUDING ALL)")
    state.start_job(conn, "job1", "test-fill", "public.src", {})


def copy_in_batches(conn: psycopg.Connection[Any], batch: int, throttle: Callable[[], None],
                    on_batch: Callable[[int], None] | None = None) -> None:
    """A checkpointed batch copy like the fill: each batch and its checkpoint commit together; a rerun resumes
    from the checkpoint. ``throttle`` is called before every batch, with no transaction open."""
    last = state.get_checkpoint(conn, "job1", "fill") or 0
    (top,) = conn.execute("SELECT coalesce(max(id), 0) FROM src").fetchone()
    while last < top:
        throttle()
        with conn.transaction():
            conn.execute("INSERT INTO dst SELECT * FROM src WHERE id > %s AND id <= %s", (last, last + batch))
            last += batch
            state.put_checkpoint(conn, "job1", "fill", last)
        if on_batch:
            on_batch(last)


def unconfirmed(conn: psycopg.Connection[Any], slot: str) -> int:
    return next(s.unconfirmed_bytes or 0 for s in measure(conn).slots if s.name == slot)


def consume(conn: psycopg.Connection[Any], slot: str) -> int:
    return conn.execute("SELECT count(*) FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,)).fetchone()[0]


class FeedThatLags:
    """The gate's ``sleep``: while the gate is paused nobody reads the slot; after ``hold`` polls over the limit
    the "warehouse feed" catches up (consumes the slot). It runs in the loop's own thread, so ``events`` is in
    exact order: ("after_batch", unconfirmed bytes), ("poll", rows copied so far), ("consume", 0)."""

    def __init__(self, consumer: psycopg.Connection[Any], probe: psycopg.Connection[Any], slot: str,
                 table: str, hold: int = 5) -> None:
        self.consumer, self.probe, self.slot, self.table, self.hold = consumer, probe, slot, table, hold
        self.events: list[tuple[str, int]] = []
        self.consumptions = 0
        self._polls = 0

    def record_batch(self) -> None:
        self.events.append(("after_batch", unconfirmed(self.probe, self.slot)))

    def __call__(self, seconds: float) -> None:
        self.events.append(("poll", self.probe.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0]))
        self._polls += 1
        if self._polls >= self.hold:
            self._polls = 0
            self.events.append(("consume", 0))
            consume(self.consumer, self.slot)
            self.consumptions += 1
        time.sleep(seconds)

    def assert_held_within_one_batch(self, limit: int) -> None:
        """After a batch that left the slot over the limit, no batch runs until the slot was consumed, and
        while held no rows are copied."""
        over, held_rows = False, None
        for kind, value in self.events:
            if kind == "consume":
                over, held_rows = False, None
            elif kind == "poll":
                assert held_rows in (None, value), f"rows were copied while paused: {self.events}"
                held_rows = value
            else:
                assert not over, f"a batch ran after the slot crossed the limit: {self.events}"
                over = value > limit


def test_unconsumed_logical_slot_holds_the_batch_loop_and_consuming_releases_it(db, caplog) -> None:
    limit = 2 * MB
    with db.connect() as c, db.connect() as lag_conn, db.connect() as probe, db.connect() as consumer:
        make_source(c, 40_000)
        consumer.execute("SELECT pg_create_logical_replication_slot('s', 'test_decoding')")
        feed = FeedThatLags(consumer, probe, "s", "dst", hold=5)
        gate = LagGate(LagThresholds(max_lag_bytes=limit, standbys=(), slots=("s",)), check_every=0,
                       poll_interval=0.05, max_pause_seconds=None, sleep=feed)
        with caplog.at_level(logging.INFO, logger="pg_partition"):
            copy_in_batches(c, 2_000, gate.bind(lag_conn), on_batch=lambda _last: feed.record_batch())
        feed.assert_held_within_one_batch(limit)
        # it really paused, several times, each time for 4+ measurements over the limit before the feed read
        # a pause can need more than one catch-up of the feed when other WAL (autovacuum, checkpoints) lands in
        # between; every pause ended only after a consumption
        assert gate.pauses >= 2 and feed.consumptions >= gate.pauses
        assert [k for k, _ in feed.events].count("poll") >= 5 * gate.pauses
        assert c.execute(HASH.format("src")).fetchone() == c.execute(HASH.format("dst")).fetchone()
        assert c.execute("SELECT count(*) FROM dst").fetchone() == (40_000,)
    assert "Pausing: replication lag over threshold" in caplog.text and "logical slot 's'" in caplog.text
    assert "Resuming after a" in caplog.text


async def test_long_pause_raises_then_trigger_fires_when_consumed_and_loop_resumes_from_checkpoint(db) -> None:
    limit = 1 * MB
    with db.connect() as c, db.connect() as lag_conn, db.connect() as consumer:
        make_source(c, 30_000)
        consumer.execute("SELECT pg_create_logical_replication_slot('s', 'test_decoding')")
        thresholds = LagThresholds(max_lag_bytes=limit, standbys=(), slots=("s",))
        gate = LagGate(thresholds, check_every=0, poll_interval=0.1, max_pause_seconds=0.5)
        with pytest.raises(LagPauseTooLong) as info:
            copy_in_batches(c, 2_000, gate.bind(lag_conn))
        exc = info.value
        assert exc.paused_seconds >= 0.5 and "logical slot 's'" in exc.state["reasons"][0]
        assert exc.state["thresholds"]["slots"] == ["s"]
        checkpoint = state.get_checkpoint(c, "job1", "fill")
        assert 0 < checkpoint < 30_000
        assert c.execute("SELECT count(*), max(id) FROM dst").fetchone() == (checkpoint, checkpoint)

        # the operator would now defer: the same trigger, built from the exception, waits in the event loop
        trigger = ReplicationLagTrigger.from_thresholds(db.conn_id, exc.thresholds, poll_interval=0.1)
        events = trigger.run()
        fired = asyncio.ensure_future(events.__anext__())
        while trigger.polls < 3:
            assert not fired.done(), fired.result().payload
            await asyncio.sleep(0.05)
        consume(consumer, "s")  # the warehouse feed catches up
        event = await asyncio.wait_for(fired, 90)
        await events.aclose()
        assert event.payload["status"] == "ok"

        # resumed task: continues from the checkpoint while a consumer keeps reading the slot
        stop = threading.Event()

        def feed() -> None:
            with db.connect() as reader:
                while not stop.wait(0.05):
                    consume(reader, "s")

        reader = threading.Thread(target=feed)
        reader.start()
        try:
            resumed_gate = LagGate(thresholds, check_every=0, poll_interval=0.05, max_pause_seconds=None)
            copy_in_batches(c, 2_000, resumed_gate.bind(lag_conn))
        finally:
            stop.set()
            reader.join()
        assert c.execute(HASH.format("src")).fetchone() == c.execute(HASH.format("dst")).fetchone()
        assert state.get_checkpoint(c, "job1", "fill") == 30_000


def test_unconsumed_slot_holds_the_real_convert_fill_and_consuming_releases_it(db, caplog) -> None:
    """The same with the conversion's own fill (core.fill via core.convert), the gate bound as its throttle."""
    from pg_partition.core import convert
    from pg_partition.core.convert.spec import ConvertSpec
    from pg_partition.core.db.execute import Executor
    from tests.support.convert import row_hash
    from tools.seed import seed_activities

    spec = ConvertSpec.create("activities", "created_at", period="month")
    limit = MB // 2
    with db.connect() as c, db.connect() as lag_conn, db.connect() as probe, db.connect() as consumer:
        seed_activities(c, "public.activities", rows=20_000, months=3, timestamptz=True)
        ex = Executor(c)
        convert.prep(ex, spec)
        convert.add_partitions(ex, spec, cover_data=True, future=1)
        plan = convert.plan_fill(ex, spec, batch_size=500)
        assert len(plan["items"]) >= 3
        consumer.execute("SELECT pg_create_logical_replication_slot('s', 'test_decoding')")
        feed = FeedThatLags(consumer, probe, "s", "activities_intermediate", hold=5)
        gate = LagGate(LagThresholds(max_lag_bytes=limit, standbys=(), slots=("s",)), check_every=0,
                       poll_interval=0.05, max_pause_seconds=None, sleep=feed)
        gated = gate.bind(lag_conn)

        def throttle() -> None:  # the fill calls it before every batch: record what the slot holds, then gate
            feed.record_batch()
            gated()

        with caplog.at_level(logging.INFO, logger="pg_partition"):
            for item in plan["items"]:  # as the mapped fill tasks run: gate before each, then the fill
                throttle()
                convert.fill(ex, spec, item, throttle=throttle)
        # the gate runs before every batch (and once more before each item, as the mapped tasks do), so at most
        # one batch runs between two records and the check below is exact
        feed.assert_held_within_one_batch(limit)
        # a pause can need more than one catch-up of the feed when other WAL (autovacuum, checkpoints) lands in
        # between; every pause ended only after a consumption
        assert gate.pauses >= 2 and feed.consumptions >= gate.pauses
        assert row_hash(c, "activities_intermediate") == row_hash(c, "activities")
        assert convert.fill_status(c, spec)["pending"] == []
    assert "Pausing: replication lag over threshold" in caplog.text and "logical slot 's'" in caplog.text


def test_defer_until_lag_ok_hands_a_long_pause_to_the_trigger() -> None:
    from airflow.sdk import BaseOperator

    from pg_partition.core.lag import LagReport, LagVerdict
    from pg_partition.triggers.lag import defer_until_lag_ok

    thresholds = LagThresholds(max_lag_bytes=MB, standbys=(), slots=("feed",))
    verdict = LagVerdict(False, ("logical slot 'feed' (inactive) unconfirmed: 5.0 MB behind > max 1.0 MB",),
                         LagReport(False, 150000, False, "2024-01-01T00:00:00+00:00"))
    exc = LagPauseTooLong(verdict, paused_seconds=600.0, max_pause_seconds=600.0, thresholds=thresholds)
    with pytest.raises(TaskDeferred) as deferred:
        defer_until_lag_ok(BaseOperator(task_id="fill"), exc, conn_id="pg_main", method_name="execute",
                           poll_interval=20, timeout=timedelta(hours=6))
    assert deferred.value.method_name == "execute" and deferred.value.timeout == timedelta(hours=6)
    assert deferred.value.trigger.serialize() == ("pg_partition.triggers.lag.ReplicationLagTrigger", {
        "conn_id": "pg_main", "max_lag_bytes": MB, "max_lag_seconds": None, "standbys": [], "slots": ["feed"],
        "poll_interval": 20.0, "max_connect_failures": 10})
