"""Change capture's cost to the application and replay's speed, measured against baselines in the same run.

1. Application write throughput: pgbench with an insert + update script (one transaction: update a random
   existing row, insert a new one) against the source table, without capture and with capture installed,
   alternating rounds (A B A B ...) so drift (autovacuum, checkpoints, cache) hits both alike; the median of each
   side is compared. Goal: capture costs <= 15% of the transactions per second (ratio >= 0.85).
2. The same with a replay loop running concurrently (what the application sees during a real conversion).
3. Replay rate in keys/s on the backlog pgbench left, against a single ``INSERT ... SELECT`` of as many rows into
   the same partitioned table (the fastest possible copy of that many rows) measured right after.

Run: ``.venv/bin/python -m bench.capture`` (BENCH_ROWS, BENCH_CAPTURE_SECONDS, BENCH_CAPTURE_ROUNDS,
BENCH_CAPTURE_CLIENTS override the sizes). ``run(env, rows)`` is the entry point for a combined bench runner.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql

from bench.common import BenchEnv, Figure, bench_env, timer
from pg_partition.core import convert
from pg_partition.core.convert import capture, replay
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.execute import Executor
from tools.seed import seed_activities

GROUP = "capture"
SCRIPT = """\\set id random(1, :maxid)
BEGIN;
UPDATE activities SET owner_id = owner_id + 1, updated_at = now() WHERE id = :id;
INSERT INTO activities (trackable_type, trackable_id, owner_type, owner_id, key, parameters, recipient_type,
  recipient_id, created_at, updated_at)
  VALUES ('Job', :id, 'User', 1, 'bench.insert', 'stage: 1', 'Company', 2, now(), now());
END;
"""


def _pgbench(env: BenchEnv, db: str, script: Path, seconds: int, clients: int, maxid: int) -> float:
    port = str(env.cluster.primary.port)
    res = subprocess.run(
        [env.pgbench(), "-n", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-c", str(clients),
         "-j", str(min(clients, os.cpu_count() or 1)), "-T", str(seconds), "-D", f"maxid={maxid}",
         "-f", str(script), db],
        capture_output=True, text=True, check=True)
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", res.stdout)
    if not m:
        raise RuntimeError(f"pgbench output without tps:\n{res.stdout}\n{res.stderr}")
    return float(m.group(1))


def run(env: BenchEnv, rows: int) -> list[Figure]:
    seconds = int(os.environ.get("BENCH_CAPTURE_SECONDS", "15"))
    rounds = int(os.environ.get("BENCH_CAPTURE_ROUNDS", "3"))
    clients = int(os.environ.get("BENCH_CAPTURE_CLIENTS", "4"))
    db = env.new_database()
    figures: list[Figure] = []
    with env.connect(db) as conn, tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "insert_update.sql"
        script.write_text(SCRIPT)
        spec = ConvertSpec.create("public.activities", "created_at")
        src, dest = spec.table, spec.intermediate
        print(f"seeding {rows:,} rows ...", flush=True)
        seed_activities(conn, src, rows=rows)
        ex = Executor(conn)
        convert.prep(ex, spec)
        convert.add_partitions(ex, spec, cover_data=True, future=3)
        conn.execute("INSERT INTO activities_intermediate SELECT * FROM activities")
        conn.execute("VACUUM ANALYZE activities")
        conn.execute("VACUUM ANALYZE activities_intermediate")
        maxid = rows

        without: list[float] = []
        with_capture: list[float] = []
        for r in range(rounds):
            capture.uninstall(ex, src)
            without.append(_pgbench(env, db, script, seconds, clients, maxid))
            capture.install(ex, src, dest)
            with_capture.append(_pgbench(env, db, script, seconds, clients, maxid))
            print(f"round {r + 1}/{rounds}: without {without[-1]:,.0f} tps, with capture {with_capture[-1]:,.0f} "
                  "tps", flush=True)
        base, cap = statistics.median(without), statistics.median(with_capture)
        figures.append(Figure(
            GROUP, "pgbench insert+update tps with capture installed", cap, "tps", baseline=base,
            baseline_name="without capture", goal=">= 0.85x", met=cap / base >= 0.85,
            note=f"median of {rounds} alternating {seconds}s rounds, {clients} clients; each transaction updates "
            "one random existing row and inserts one; per-round ratios "
            + ", ".join(f"{c / w:.2f}" for w, c in zip(without, with_capture, strict=True))
            + f" (median {statistics.median(c / w for w, c in zip(without, with_capture, strict=True)):.2f})",
        ))

        # the application's view during a conversion: capture plus a replay loop draining the changelog
        backlog_before = capture.backlog(conn, src)
        stop = threading.Event()
        replayed: list[int] = []

        def replayer() -> None:
            with psycopg.connect(env.dsn(db), autocommit=True) as rconn:
                replay.replay(rconn, src, dest, until_backlog_below=1)  # drain what the rounds left first
                while not stop.is_set():
                    st = replay.replay(rconn, src, dest, batch_size=5000, until_backlog_below=500)
                    replayed.append(st.keys)
                    time.sleep(0.2)

        t = threading.Thread(target=replayer, daemon=True)
        t.start()
        time.sleep(0.5)
        with_replay = _pgbench(env, db, script, seconds, clients, maxid)
        stop.set()
        t.join()
        figures.append(Figure(
            GROUP, "pgbench tps with capture + concurrent replay", with_replay, "tps", baseline=base,
            baseline_name="without capture",
            note=f"replay ran alongside on the same {os.cpu_count()} cores ({sum(replayed):,} keys replayed during "
            f"the run after draining the {backlog_before:,} entries the rounds left)",
        ))

        # replay rate on a fresh backlog: what pgbench writes in one round
        replay.replay(conn, src, dest, until_backlog_below=1)
        _pgbench(env, db, script, seconds, clients, maxid)
        waiting = capture.backlog(conn, src)
        with timer() as t_replay:
            stats = replay.replay(conn, src, dest, batch_size=5000, until_backlog_below=1)
        keys_per_s = stats.keys / t_replay[0]
        n = stats.keys
        # same partitions, same indexes (LIKE ... INCLUDING INDEXES copies the partitioned indexes)
        conn.execute("CREATE TABLE copy_probe (LIKE activities_intermediate INCLUDING DEFAULTS INCLUDING INDEXES) "
                     "PARTITION BY RANGE (created_at)")
        for (part, bound) in conn.execute(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c "
                "ON c.oid = i.inhrelid WHERE i.inhparent = 'activities_intermediate'::regclass").fetchall():
            probe = sql.Identifier(f"probe_{part}")
            conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF copy_probe {}").format(probe, sql.SQL(bound)))
            conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(probe))
        with timer() as t_copy:
            conn.execute("INSERT INTO copy_probe SELECT * FROM activities WHERE id <= %s", (n,))
        copy_rate = n / t_copy[0]
        figures.append(Figure(
            GROUP, "replay rate", keys_per_s, "keys/s", baseline=copy_rate,
            baseline_name="single INSERT ... SELECT of as many rows into the same partitions and indexes",
            note=f"{waiting:,} changelog entries ({stats.keys:,} distinct keys per batch, {stats.batches} batches "
            "of 5000): each batch deletes and re-inserts its keys in the partitioned table",
        ))
    for f in figures:
        env.add(f)
    return figures


def main() -> None:
    rows = int(os.environ.get("BENCH_ROWS", "500000"))
    with bench_env("pgp-bench-capture-") as env:
        run(env, rows)
        print("\n".join(f.line() for f in env.figures))


if __name__ == "__main__":
    sys.exit(main())
