"""End to end through core/convert: prep, add_partitions, install capture, plan + fill (per partition) with a
concurrent replay and an application writer running the whole time, indexes, analyze, replay, verify, convert's
swap (which calls replay.finish_in_swap under its lock), then verify the retired table against the new one.
Also the operators, run directly against the real database."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowSkipException

from pg_partition.core import convert
from pg_partition.core.convert import capture, replay, verify
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db import catalog
from pg_partition.core.db.errors import VerificationError
from pg_partition.core.db.execute import Executor
from pg_partition.operators.capture import (
    RemoveCaptureOperator,
    ReplayChangesOperator,
    VerifyConversionOperator,
)
from pg_partition.operators.convert import ConvertInstallCaptureOperator
from tests.support.capture import Writer, same_columns_hash
from tools.seed import seed_activities

ROWS = 30_000


def _wait_for(predicate, poll: float = 0.05) -> None:
    while not predicate():
        time.sleep(poll)


def test_convert_with_capture_end_to_end(db, conn) -> None:
    spec = ConvertSpec.create("public.activities", "created_at", period="month")
    seed_activities(conn, spec.table, rows=ROWS, months=8)
    conn.execute("DELETE FROM activities WHERE id = 7")
    conn.execute("UPDATE activities SET key = key WHERE id = 1")  # the table has seen an UPDATE
    conn.execute("SELECT pg_stat_force_next_flush()")
    ex = Executor(conn)
    convert.preflight(conn, spec)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=3)

    writer = Writer(db.dsn, spec.table, low=20, high=ROWS, avoid={3, 7, 11})
    writer.start()
    _wait_for(lambda: sum(writer.ops.values()) >= 20)

    wanted, reason = capture.should_capture(conn, spec.table, "auto")
    assert wanted, reason
    assert capture.install(ex, spec.table, spec.intermediate, lock_timeout="2s", retries=10)
    plan = convert.plan_fill(ex, spec, batch_size=1500)

    long_txn = psycopg.connect(db.dsn)  # opens after the plan, holds low ids through the fill
    long_txn.execute("INSERT INTO activities (id, key, parameters, created_at, updated_at) "
                     "VALUES (7, 'late', 'committed late', now()::timestamp - interval '100 days', now())")
    long_txn.execute("UPDATE activities SET parameters = 'updated late' WHERE id = 3")
    long_txn.execute("DELETE FROM activities WHERE id = 11")

    fill_done = threading.Event()
    errors: list[BaseException] = []

    def replayer() -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as rconn:
                while not fill_done.is_set():
                    replay.replay(rconn, spec.table, spec.intermediate, batch_size=300, until_backlog_below=50)
                    time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    rt = threading.Thread(target=replayer, daemon=True)
    rt.start()
    for item in plan["items"]:
        convert.fill(ex, spec, item, sleep_seconds=0.02)
    fill_done.set()
    rt.join()
    assert not errors, errors
    convert.build_indexes(ex, spec)
    convert.analyze(ex, spec)
    long_txn.commit()
    long_txn.close()

    replay.replay(conn, spec.table, spec.intermediate, until_backlog_below=100)
    pre = verify.verify(conn, spec.table, spec.intermediate)
    assert pre.ok, pre.summary()

    replay.replay(conn, spec.table, spec.intermediate, until_backlog_below=100)  # keep the swap's apply short
    result = convert.swap(ex, spec)
    assert sorted(result["capture_triggers"]) == sorted(capture.TRIGGERS.values())
    _wait_for(lambda: sum(writer.post_swap_ops.values()) >= 40)
    writer.stop()

    assert catalog.describe(conn, spec.table).is_partitioned
    assert not catalog.exists(conn, capture.changelog_name(spec.table))
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pg_partition_capture%'").fetchone() == (0,)
    post = writer.post_swap_keys
    assert post
    a, b = same_columns_hash(conn, spec.retired, spec.table, exclude=post)
    assert a == b and a[0] > ROWS * 0.5
    after = verify.verify(conn, spec.retired, spec.table, exclude_keys=sorted(post))
    assert after.ok, after.summary()
    assert conn.execute("SELECT parameters FROM activities WHERE id = 7").fetchone() == ("committed late",)
    assert conn.execute("SELECT parameters FROM activities WHERE id = 3").fetchone() == ("updated late",)
    assert conn.execute("SELECT count(*) FROM activities WHERE id = 11").fetchone() == (0,)
    with pytest.raises(VerificationError):  # the application's writes since the swap legitimately differ
        verify.verify(conn, spec.retired, spec.table, raise_on_mismatch=True)


def test_operators(db, conn) -> None:
    spec = ConvertSpec.create("public.activities", "created_at")
    seed_activities(conn, spec.table, rows=5000, months=4, indexes=False)
    ex = Executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=2)
    common = {"conn_id": db.conn_id, "table": "public.activities"}
    conv = {**common, "column": "created_at"}

    # auto on a table that never saw UPDATE/DELETE: no capture
    with pytest.raises(AirflowSkipException, match="change capture off"):
        ConvertInstallCaptureOperator(task_id="install", **conv).execute({})
    assert not capture.is_installed(conn, spec.table)
    assert ReplayChangesOperator(task_id="replay", **common).execute({})["skipped"] is True
    dry = ConvertInstallCaptureOperator(task_id="install", capture_changes="true", dry_run="True", **conv).execute({})
    assert dry["dry_run"] is True and dry["installed"] is False and dry["statements"]
    out = ConvertInstallCaptureOperator(task_id="install", capture_changes="true", **conv).execute({})
    assert out["capture"] is True and out["installed"] is True and out["created"] is True

    plan = convert.plan_fill(ex, spec)
    for item in plan["items"]:
        convert.fill(ex, spec, item)
    conn.execute("UPDATE activities SET key = 'op' WHERE id % 100 = 0")
    stats = ReplayChangesOperator(task_id="replay", until_backlog_below="1", sleep_seconds="0", **common).execute({})
    assert stats["entries"] == 50 and stats["backlog"] == 0
    report = VerifyConversionOperator(task_id="verify", **common).execute({})
    assert report["ok"] is True and report["partitions"]

    conn.execute("UPDATE activities_intermediate SET key = 'planted' WHERE id = 4242")
    with pytest.raises(VerificationError, match="id 4242"):
        VerifyConversionOperator(task_id="verify", **common).execute({})

    removed = RemoveCaptureOperator(task_id="remove", **common).execute({})
    assert removed["removed"] is True and removed["installed"] is False
    assert RemoveCaptureOperator(task_id="remove", **common).execute({})["removed"] is False
