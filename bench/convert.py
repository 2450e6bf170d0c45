"""Benchmark of the online conversion: fill throughput against a single INSERT ... SELECT, whole-conversion wall
time, and the swap's exclusive-lock time, all measured in one run on one server.

    .venv/bin/python bench/convert.py --rows 2000000

A throwaway PostgreSQL (tools.stack.PgCluster, durable settings: fsync on, synchronous_commit on) is started in a
temp dir and stopped at the end. The seeded ``activities`` table has the public_activity gem's four indexes.

1. baseline: ``INSERT INTO <intermediate> SELECT ... FROM activities`` in one statement, into the same partitions
   (all indexes present), then TRUNCATE;
2. our fill of the same rows (plan + every partition's batches, one process, checkpoints included) -> ratio;
3. the same two with ``defer_indexes`` (only the per-partition key during the copy);
4. a whole conversion (preflight .. report, defer_indexes) while a writer thread inserts rows like the
   application would: wall time per step and the longest ACCESS EXCLUSIVE hold of the swap.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BenchEnv, Figure
from pg_partition.core import convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.execute import Executor
from tools.seed import seed_activities
from tools.stack import PgCluster

COLS = ("id, trackable_type, trackable_id, owner_type, owner_id, key, parameters, recipient_type, recipient_id, "
        "created_at, updated_at")


def quiet_executor(conn: psycopg.Connection[Any]) -> Executor:
    """The engine logs every statement at INFO; the benchmark keeps only warnings on screen."""
    ex = Executor(conn)
    ex.logger = logging.getLogger("pg_partition.bench")
    return ex


def settle(conn: psycopg.Connection[Any]) -> None:
    """Same starting line for every measurement: dirty pages flushed, source hot in cache."""
    conn.execute("CHECKPOINT")
    conn.execute("SELECT count(*) FROM activities")


def baseline(conn: psycopg.Connection[Any], spec: ConvertSpec) -> float:
    settle(conn)
    started = time.monotonic()
    conn.execute(f"INSERT INTO {spec.intermediate.name} ({COLS}) SELECT {COLS} FROM activities")
    seconds = time.monotonic() - started
    conn.execute(f"TRUNCATE {spec.intermediate.name}")
    return seconds


def our_fill(conn: psycopg.Connection[Any], spec: ConvertSpec, batch_size: int, *, keep: bool = False) -> float:
    ex = quiet_executor(conn)
    settle(conn)
    started = time.monotonic()
    convert.plan_fill(ex, spec, batch_size=batch_size, replan=True)
    convert.fill(ex, spec, progress_every=3600)
    seconds = time.monotonic() - started
    if not keep:
        conn.execute(f"TRUNCATE {spec.intermediate.name}")
    return seconds


def pair(conn: psycopg.Connection[Any], spec: ConvertSpec, rows: int, batch_size: int,
         repeat: int) -> dict[str, Any]:
    """Baseline and fill alternately ``repeat`` times; the best of each is compared (the machine may be shared,
    and the best run is the one least disturbed by others)."""
    ex = quiet_executor(conn)
    convert.prep(ex, spec)
    convert.add_partitions(ex, spec, cover_data=True, future=1)
    bases, fills = [], []
    for _ in range(repeat):
        bases.append(baseline(conn, spec))
        fills.append(our_fill(conn, spec, batch_size))
    convert.unprep(ex, spec)
    base, fill_s = min(bases), min(fills)
    return {"baseline_s": base, "fill_s": fill_s, "baseline_rps": rows / base, "fill_rps": rows / fill_s,
            "ratio": base / fill_s, "all_baseline": bases, "all_fill": fills}


class Writer(threading.Thread):
    """The application: inserts a row every few milliseconds, as its own short transactions."""

    def __init__(self, dsn: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.interval, self.stop, self.rows, self.errors = dsn, interval, threading.Event(), 0, 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                try:
                    conn.execute("INSERT INTO activities (trackable_type, key, created_at, updated_at) "
                                 "VALUES ('Job', 'bench.write', now(), now())")
                    self.rows += 1
                except psycopg.Error:
                    self.errors += 1
                time.sleep(self.interval)


def whole_conversion(conn: psycopg.Connection[Any], dsn: str, spec: ConvertSpec, batch_size: int,
                     write_interval: float) -> dict[str, Any]:
    ex = quiet_executor(conn)
    writer = Writer(dsn, write_interval)
    writer.start()
    steps: dict[str, float] = {}

    def step(name: str, fn: Any) -> Any:
        t0 = time.monotonic()
        out = fn()
        steps[name] = time.monotonic() - t0
        return out

    started = time.monotonic()
    step("preflight", lambda: convert.preflight(conn, spec))
    step("prep", lambda: convert.prep(ex, spec))
    step("add_partitions", lambda: convert.add_partitions(ex, spec, cover_data=True, future=3))
    step("plan_fill", lambda: convert.plan_fill(ex, spec, batch_size=batch_size))
    step("fill", lambda: convert.fill(ex, spec, progress_every=3600))
    step("indexes", lambda: convert.build_indexes(ex, spec))
    step("analyze", lambda: convert.analyze(ex, spec))
    step("catch_up_before", lambda: convert.catch_up(ex, spec))
    swapped = step("swap", lambda: convert.swap(ex, spec, lock_timeout="2s"))
    step("catch_up", lambda: convert.catch_up(ex, spec))
    wall = time.monotonic() - started
    writer.stop.set()
    writer.join()
    src = conn.execute("SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY id)) FROM activities_retired t"
                       ).fetchone()
    dst = conn.execute("SELECT count(*) FROM activities").fetchone()
    return {"wall_s": wall, "steps": steps, "lock_ms": swapped["lock_ms"],
            "synced_under_lock": swapped["synced"]["rows"], "app_rows": writer.rows, "app_errors": writer.errors,
            "retired_rows": src[0] if src else 0, "new_rows": dst[0] if dst else 0}


def parallel_fill(dsn: str, conn: psycopg.Connection[Any], spec: ConvertSpec, batch_size: int,
                  workers: int) -> float:
    """The DAG's mapped fill: the planned items split over ``workers`` sessions filling at the same time."""
    ex = quiet_executor(conn)
    settle(conn)
    started = time.monotonic()
    plan = convert.plan_fill(ex, spec, batch_size=batch_size, replan=True)
    items = list(plan["items"])
    errors: list[BaseException] = []

    def work(mine: list[dict[str, Any]]) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as own:
                for it in mine:
                    convert.fill(quiet_executor(own), spec, it, progress_every=3600)
        except BaseException as exc:  # reported after join
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(items[i::workers],)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    seconds = time.monotonic() - started
    conn.execute(f"TRUNCATE {spec.intermediate.name}")
    return seconds


def run(env: BenchEnv, rows: int) -> list[Figure]:
    """Entry point for ``make bench``: fill vs single statement (with/without deferred indexes, parallel),
    whole-conversion step times and the swap's exclusive-lock time."""
    repeat = int(os.environ.get("BENCH_REPEAT", "2"))
    batch_size = int(os.environ.get("BENCH_BATCH_SIZE", "10000"))
    workers = int(os.environ.get("BENCH_FILL_WORKERS", "2"))
    db = env.new_database()
    dsn = env.dsn(db)
    figures: list[Figure] = []
    base_name = "a single INSERT ... SELECT into the same partitions"
    with env.connect(db) as conn:
        seed_activities(conn, "public.activities", rows=rows, timestamptz=True)
        for label, defer in (("all indexes during the copy", False), ("defer_indexes", True)):
            spec = ConvertSpec.create("activities", "created_at", defer_indexes=defer)
            r = pair(conn, spec, rows, batch_size, repeat)
            figures.append(Figure(
                "fill", f"fill rows/s, {label}", r["fill_rps"], "rows/s", baseline=r["baseline_rps"],
                baseline_name=base_name, goal=">= 0.9x", met=r["ratio"] >= 0.9,
                note=f"best of {repeat} alternating runs; fill includes planning (one read of the source)"))
        spec = ConvertSpec.create("activities", "created_at")
        ex = quiet_executor(conn)
        convert.prep(ex, spec)
        convert.add_partitions(ex, spec, cover_data=True, future=1)
        base_s = min(baseline(conn, spec) for _ in range(repeat))
        par_s = min(parallel_fill(dsn, conn, spec, batch_size, workers) for _ in range(repeat))
        convert.unprep(ex, spec)
        figures.append(Figure(
            "fill", f"parallel fill rows/s ({workers} mapped tasks), all indexes", rows / par_s, "rows/s",
            baseline=rows / base_s, baseline_name=base_name, goal=">= 0.9x", met=base_s / par_s >= 0.9,
            note=f"{os.cpu_count()} cores shared by PostgreSQL, the fill sessions and the S3 server"))
        spec = ConvertSpec.create("activities", "created_at", defer_indexes=True)
        whole = whole_conversion(conn, dsn, spec, batch_size, 0.005)
        figures.append(Figure(
            "conversion", "whole conversion wall time (defer_indexes, app inserting)", whole["wall_s"], "s",
            note="; ".join(f"{k} {v:.1f}s" for k, v in whole["steps"].items())
            + f"; app inserted {whole['app_rows']:,} rows with {whole['app_errors']} errors"))
        for name, seconds in whole["steps"].items():
            figures.append(Figure("conversion", f"step {name}", seconds, "s"))
        figures.append(Figure(
            "conversion", "swap: exclusive lock held", whole["lock_ms"], "ms", goal="<= 100 ms",
            met=whole["lock_ms"] <= 100, note=f"{whole['synced_under_lock']} rows synced under the lock"))
    for f in figures:
        env.add(f)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--write-interval", type=float, default=0.005,
                        help="seconds between the simulated application's inserts during the whole conversion")
    parser.add_argument("--repeat", type=int, default=3, help="alternating baseline/fill runs; best of each")
    parser.add_argument("--fast-unsafe", action="store_true", help="fsync off (not representative)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    with tempfile.TemporaryDirectory(prefix="pgp-bench-convert-") as tmp:
        Path(tmp).chmod(0o755)
        cluster = PgCluster.create(Path(tmp) / "pg", standby=False, fast_unsafe=args.fast_unsafe)
        try:
            dsn = f"host=127.0.0.1 port={cluster.primary.port} user=postgres dbname=postgres"
            with psycopg.connect(dsn, autocommit=True) as conn:
                t0 = time.monotonic()
                seed_activities(conn, "public.activities", rows=args.rows, timestamptz=True)
                size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('activities'))").fetchone()
                print(f"seeded {args.rows:,} rows ({size[0] if size else '?'} with 4 indexes + pkey) in "
                      f"{time.monotonic() - t0:.1f}s; PostgreSQL {conn.info.server_version}, "
                      f"fsync {'off' if args.fast_unsafe else 'on'}, batch_size {args.batch_size:,}")
                results = {}
                for label, defer in (("all indexes during the copy", False), ("defer_indexes", True)):
                    spec = ConvertSpec.create("activities", "created_at", defer_indexes=defer)
                    results[label] = r = pair(conn, spec, args.rows, args.batch_size, args.repeat)
                    print(f"{label:>28}: single INSERT..SELECT {r['baseline_s']:7.1f}s "
                          f"({r['baseline_rps']:10,.0f} rows/s) | fill {r['fill_s']:7.1f}s "
                          f"({r['fill_rps']:10,.0f} rows/s) | ratio fill/baseline {r['ratio']:.2f}x   "
                          f"[runs: baseline {', '.join(f'{x:.1f}' for x in r['all_baseline'])}; "
                          f"fill {', '.join(f'{x:.1f}' for x in r['all_fill'])}; load {os.getloadavg()[0]:.1f}]")
                spec = ConvertSpec.create("activities", "created_at", defer_indexes=True)
                whole = whole_conversion(conn, dsn, spec, args.batch_size, args.write_interval)
                print(f"whole conversion (defer_indexes, app writing meanwhile): {whole['wall_s']:.1f}s wall; "
                      + ", ".join(f"{k} {v:.1f}s" for k, v in whole["steps"].items()))
                print(f"swap: ACCESS EXCLUSIVE held {whole['lock_ms']:.1f} ms "
                      f"({whole['synced_under_lock']} rows synced under the lock); application inserted "
                      f"{whole['app_rows']:,} rows meanwhile with {whole['app_errors']} errors; "
                      f"rows retired {whole['retired_rows']:,} / live {whole['new_rows']:,}")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
