"""Real concurrency: an application writer on its own connection runs through the whole conversion (install,
fill, concurrent replay, verify, swap) mixing INSERTs, UPDATEs of rows already copied, partition moves, DELETEs,
key changes, bulk and multi-statement transactions, upserts, and a long transaction that commits low ids late.
Also: SIGKILL during replay and resume; a swap under another session's lock times out, retries, and loses
nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psycopg
import pytest

from pg_partition.core.convert import capture, replay, verify
from pg_partition.core.db import catalog
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.errors import LockTimeoutExhausted
from pg_partition.core.db.execute import Executor
from tests.support.capture import (
    Writer,
    changelog_keys,
    fill,
    make_intermediate,
    retired,
    row_hash,
    same_columns_hash,
    swap,
)
from tools.seed import seed_activities

SRC = QualifiedName("public", "activities")
ROWS = 30_000
LONG_TXN_KEYS = {3, 7, 11}


def _wait_for(predicate, what: str, poll: float = 0.05) -> None:
    """Wait for a condition driven by another thread/process (no wall-clock limit: pytest-timeout guards)."""
    while not predicate():
        time.sleep(poll)


def test_conversion_with_concurrent_writer_is_exact(db, conn) -> None:
    seed_activities(conn, SRC, rows=ROWS, months=8, indexes=False)
    conn.execute("DELETE FROM activities WHERE id = 7")  # a gap the long transaction fills late
    dest = make_intermediate(conn, SRC)

    writer = Writer(db.dsn, SRC, low=20, high=ROWS, avoid=LONG_TXN_KEYS)
    writer.start()
    _wait_for(lambda: sum(writer.ops.values()) >= 20, "writer warmed up")

    assert capture.install(Executor(conn), SRC, dest, lock_timeout="2s", retries=10)

    # the long transaction: starts after capture, holds low ids across the whole fill, commits late
    long_txn = psycopg.connect(db.dsn)
    long_txn.execute("INSERT INTO activities (id, key, parameters, created_at, updated_at) "
                     "VALUES (7, 'late', 'committed late', now()::timestamp - interval '100 days', now())")
    long_txn.execute("UPDATE activities SET parameters = 'updated late' WHERE id = 3")
    long_txn.execute("DELETE FROM activities WHERE id = 11")

    # replay runs concurrently with the fill, on its own connection, until the fill is done
    fill_done = threading.Event()
    replays: list[replay.ReplayStats] = []
    replay_errors: list[BaseException] = []

    def replayer() -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as rconn:
                while not fill_done.is_set():
                    replays.append(replay.replay(rconn, SRC, dest, batch_size=200, until_backlog_below=50,
                                                  throttle=lambda: time.sleep(0.01)))
                    time.sleep(0.05)
        except BaseException as exc:
            replay_errors.append(exc)

    rt = threading.Thread(target=replayer, daemon=True)
    rt.start()
    ops_at_fill_start = sum(writer.ops.values())
    batches = fill(conn, SRC, dest, batch=1500, between=lambda n: time.sleep(0.05))
    fill_done.set()
    rt.join()
    assert not replay_errors, replay_errors
    assert batches >= 20 and sum(r.keys for r in replays) > 0
    assert sum(writer.ops.values()) > ops_at_fill_start  # the application wrote during the fill

    # the long transaction's changes are invisible to the fill; the changelog gets them at commit
    assert conn.execute("SELECT count(*) FROM activities_intermediate WHERE id = 7").fetchone()[0] == 0
    long_txn.commit()
    long_txn.close()
    assert {3, 7, 11} <= set(changelog_keys(conn, SRC))

    # catch up while the writer keeps writing, then verify against the live source (pending keys excluded)
    stats = replay.replay(conn, SRC, dest, batch_size=500, until_backlog_below=100)
    assert stats.backlog < 100 and stats.entries >= 3  # at least the long transaction's keys 3, 7 and 11
    report = verify.verify(conn, SRC, dest)
    assert report.ok, report.summary()
    assert len(report.partitions) >= 9 and report.rows > ROWS * 0.5

    # the swap: last backlog under the exclusive lock, renames, capture removed, one transaction
    swap(conn, SRC, dest)
    # the swap applied the backlog and removed capture in the same transaction: no changelog, no trigger left
    assert conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE '%changelog%'").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pg_partition_capture%'").fetchone() == (0,)
    _wait_for(lambda: sum(writer.post_swap_ops.values()) >= 40, "writes after the swap")
    writer.stop()

    old = retired(SRC)
    assert catalog.describe(conn, SRC).is_partitioned
    assert not capture.is_installed(conn, old) and not catalog.exists(conn, capture.changelog_name(SRC))
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pg_partition_capture%'").fetchone() == (0,)
    assert set(writer.ops) == set(Writer.KINDS), writer.ops  # every kind of write happened
    assert writer.post_swap_keys, "writes after the swap must land in the new table"

    # row for row: the new table equals the retired one, except keys the application wrote after the swap
    post = writer.post_swap_keys
    a, b = same_columns_hash(conn, old, SRC, exclude=post)
    assert a == b and a[0] > ROWS * 0.5
    assert verify.verify(conn, old, SRC, exclude_keys=sorted(post)).ok
    # and those post-swap writes are in the new table only
    inserted_after = [k for k in post if conn.execute("SELECT count(*) FROM activities WHERE id = %s",
                                                      (k,)).fetchone()[0]]
    assert inserted_after
    assert conn.execute("SELECT parameters FROM activities WHERE id = 7").fetchone() == ("committed late",)
    assert conn.execute("SELECT parameters FROM activities WHERE id = 3").fetchone() == ("updated late",)
    assert conn.execute("SELECT count(*) FROM activities WHERE id = 11").fetchone() == (0,)
    new_ins = writer.post_swap_ops.get("insert", 0)
    if new_ins:
        assert conn.execute("SELECT count(*) FROM activities WHERE key = 'w.insert' AND id = ANY(%s)",
                            (sorted(post),)).fetchone()[0] >= 1


REPLAY_SCRIPT = textwrap.dedent("""
    import sys, time, psycopg
    from pg_partition.core.convert import capture, replay
    from pg_partition.core.db.catalog import QualifiedName
    src, dest = QualifiedName("public", "activities"), QualifiedName("public", "activities_intermediate")
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        print("started", flush=True)
        replay.replay(conn, src, dest, batch_size=500, until_backlog_below=1, throttle=lambda: time.sleep(0.05))
        print("finished", flush=True)
""")


def test_sigkill_during_replay_then_resume(db, conn) -> None:
    seed_activities(conn, SRC, rows=20_000, months=6, indexes=False)
    dest = make_intermediate(conn, SRC)
    capture.install(Executor(conn), SRC, dest)
    fill(conn, SRC, dest, batch=5000)
    conn.execute("UPDATE activities SET parameters = md5(parameters), updated_at = updated_at + interval '1s'")
    conn.execute("UPDATE activities SET created_at = created_at - interval '31 days' WHERE id % 10 = 0 "
                 "AND created_at > (SELECT min(created_at) + interval '40 days' FROM activities)")
    conn.execute("DELETE FROM activities WHERE id % 13 = 0")
    total = capture.backlog(conn, SRC)
    assert total > 20_000

    proc = subprocess.Popen([sys.executable, "-c", REPLAY_SCRIPT, db.dsn], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    _wait_for(lambda: capture.backlog(conn, SRC) < total - 3000, "replay progressed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = capture.backlog(conn, SRC)
    assert 0 < left < total, "killed mid-way"
    assert row_hash(conn, SRC) != row_hash(conn, dest)

    stats = replay.replay(conn, SRC, dest, batch_size=2000, until_backlog_below=1)  # resume
    assert stats.entries == left and capture.backlog(conn, SRC) == 0
    assert row_hash(conn, SRC) == row_hash(conn, dest)
    assert verify.verify(conn, SRC, dest).ok


def test_swap_waits_under_lock_timeout_and_keeps_the_backlog(db, conn) -> None:
    """Another session holds a lock on the source: each swap attempt gives up after lock_timeout, retries,
    and every failed attempt rolls back the final apply, so the backlog and the triggers stay intact."""
    seed_activities(conn, SRC, rows=5000, months=4, indexes=False)
    dest = make_intermediate(conn, SRC)
    capture.install(Executor(conn), SRC, dest)
    fill(conn, SRC, dest)
    conn.execute("UPDATE activities SET key = 'changed' WHERE id % 50 = 0")
    waiting = capture.backlog(conn, SRC)
    assert waiting == 100

    with db.connect(autocommit=False) as reader:
        reader.execute("SELECT count(*) FROM activities")  # ACCESS SHARE until commit
        # the application keeps writing while the swap waits: its writes are never blocked beyond lock_timeout
        with db.connect() as app:
            with pytest.raises(LockTimeoutExhausted, match="swap"):
                swap(conn, SRC, dest, lock_timeout="200ms", retries=3)
            app.execute("UPDATE activities SET key = 'during' WHERE id = 1")
        assert capture.is_installed(conn, SRC)
        assert capture.backlog(conn, SRC) == waiting + 1
        assert not catalog.exists(conn, retired(SRC))
        reader.commit()
    assert swap(conn, SRC, dest) == waiting + 1
    a, b = same_columns_hash(conn, retired(SRC), SRC)
    assert a == b and a[0] == 5000
