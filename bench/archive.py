"""Archive throughput and memory, measured against baselines in the same run.

1. pg_dump -> S3: ``archive_table`` (pg_dump --format=custom piped into an S3 multipart upload, sha256 while
   streaming) against ``pg_dump --format=custom > /dev/null`` of the same table, rounds alternating (A B A B) so
   cache and checkpoint drift hit both alike; the best round of each side is compared. Goal: >= 0.9x.
2. Peak RSS of the archiving process: the archive runs in a fresh Python process (``--child``) and its
   ``ru_maxrss`` is read by ``/usr/bin/time``. Goal: < 200 MB whatever the table size.
3. Parquet export rows/s (CSV COPY -> Arrow C++ parser -> Parquet -> S3), against reading the same binary COPY stream
   and discarding it (the floor: what PostgreSQL and the socket cost), plus its peak RSS.
4. Verification (stream back: sha256 + pg_restore --list + pg_restore --data-only row count), for information.

The table is a plain table (what a detached partition is) of BENCH_ARCHIVE_ROWS rows of the users' ``activities``
shape (core/seed.py); the default (3.2M rows) is a little over 1 GB on disk. The S3 endpoint is the moto server
on loopback: it shares the 2 cores with PostgreSQL and pg_dump, which the baseline does not have to.

Run: ``.venv/bin/python -m bench.archive`` (BENCH_ARCHIVE_ROWS, BENCH_ARCHIVE_ROUNDS override).
``run(env, rows)`` is the entry point for a combined bench runner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from bench.common import BenchEnv, Figure, bench_env, run_measured, timer
from pg_partition.core import archive
from pg_partition.core.catalog import QualifiedName
from pg_partition.core.seed import seed_activities

GROUP = "archive"
TABLE = QualifiedName("public", "activities_202401")
RSS_GOAL_MB = 200.0


def _child(dsn: str, endpoint: str, bucket: str, fmt: str, verify: bool) -> None:
    """Runs in a fresh process: archive one table to S3 (and optionally verify it); prints JSON timings."""
    import boto3
    import psycopg

    from pg_partition.core.execute import Executor

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    with psycopg.connect(dsn, autocommit=True) as conn:
        policy = archive.ArchivePolicy.build({"bucket": bucket, "format": fmt,
                                              "prefix": f"bench-{uuid.uuid4().hex[:6]}"})
        start = time.perf_counter()
        manifest = archive.archive_table(Executor(conn), s3, archive.ArchiveTarget(TABLE, label="2024-01"), policy)
        upload_s = time.perf_counter() - start
        verify_s = None
        if verify:
            start = time.perf_counter()
            archive.verify_archive(conn, s3, manifest)
            verify_s = time.perf_counter() - start
    print(json.dumps({"upload_s": upload_s, "verify_s": verify_s, "bytes": manifest["bytes"],
                      "rows": manifest["rows"], "parts": manifest["parts"]}))


def _archive_in_child(env: BenchEnv, db: str, bucket: str, fmt: str, verify: bool = False
                      ) -> tuple[dict[str, Any], float, float]:
    cmd = [sys.executable, "-m", "bench.archive", "--child", env.dsn(db), env.s3.endpoint, bucket, fmt,
           "verify" if verify else "-"]
    wall, rss, out = run_measured(cmd, env=dict(os.environ))
    return json.loads(out.strip().splitlines()[-1]), wall, rss


def _pg_dump_devnull(env: BenchEnv, db: str) -> float:
    tool = archive.find_pg_tool("pg_dump", 0)
    with open(os.devnull, "wb") as devnull, timer() as t:
        subprocess.run([tool.path, "--format=custom", f"--table={archive.dump_pattern(TABLE)}",
                        f"--dbname={env.dsn(db)}"], stdout=devnull, check=True)
    return t[0]


def _copy_binary_discard(env: BenchEnv, db: str) -> float:
    with env.connect(db) as conn, timer() as t, conn.cursor() as cur, cur.copy(
            "COPY (SELECT * FROM public.activities_202401) TO STDOUT (FORMAT BINARY)") as copy:
        for _ in copy:
            pass
    return t[0]


def run(env: BenchEnv, rows: int) -> list[Figure]:
    rounds = int(os.environ.get("BENCH_ARCHIVE_ROUNDS", "3"))
    db = env.new_database()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    env.s3.client().create_bucket(Bucket=bucket)
    figures: list[Figure] = []
    with env.connect(db) as conn:
        print(f"seeding {rows:,} rows into {TABLE} ...", flush=True)
        seed_activities(conn, TABLE, rows=rows, months=1, indexes=False)
        conn.execute("VACUUM ANALYZE public.activities_202401")
        size = int(conn.execute("SELECT pg_total_relation_size('public.activities_202401')").fetchone()[0])
    print(f"table: {size / 1024**3:.2f} GiB on disk", flush=True)
    _pg_dump_devnull(env, db)  # warm the cache for both sides

    base_s: list[float] = []
    ours_s: list[float] = []
    walls: list[float] = []
    rss_dump: list[float] = []
    dump_info: dict[str, Any] = {}
    for i in range(rounds):
        base_s.append(_pg_dump_devnull(env, db))
        info, wall, rss = _archive_in_child(env, db, bucket, "pg_dump", verify=i == rounds - 1)
        ours_s.append(info["upload_s"])
        walls.append(wall)
        rss_dump.append(rss)
        dump_info = info
        print(f"round {i + 1}: pg_dump > /dev/null {base_s[-1]:.1f}s, pg_dump -> S3 {ours_s[-1]:.1f}s "
              f"(process {wall:.1f}s, peak RSS {rss:.0f} MB)", flush=True)
    best_base, best_ours = min(base_s), min(ours_s)
    mb = size / 1024**2
    figures.append(Figure(
        GROUP, "pg_dump -> S3 throughput", mb / best_ours, "MB/s (table size / time)",
        baseline=mb / best_base, baseline_name="pg_dump --format=custom > /dev/null", goal=">= 0.9x",
        met=best_base / best_ours >= 0.9,
        note=f"{size / 1024**3:.2f} GiB table, {rows:,} rows -> {dump_info['bytes'] / 1024**2:,.0f} MB dump in "
        f"{dump_info['parts']} parts; best of {rounds} alternating rounds (all: ours "
        f"{[round(x, 1) for x in ours_s]} s, baseline {[round(x, 1) for x in base_s]} s); the child process's wall "
        f"time including Python start-up was {min(walls):.1f} s"))
    figures.append(Figure(
        GROUP, "peak RSS of the pg_dump -> S3 process", max(rss_dump), "MB", goal=f"< {RSS_GOAL_MB:.0f} MB",
        met=max(rss_dump) < RSS_GOAL_MB, note="ru_maxrss of a fresh Python process running archive_table "
        "(8 MiB parts, 2 in flight); includes the interpreter, boto3 and psycopg"))
    if dump_info.get("verify_s"):
        figures.append(Figure(
            GROUP, "verify (stream back: sha256 + pg_restore --list + row count)", mb / dump_info["verify_s"],
            "MB/s (table size / time)", baseline=mb / best_base, baseline_name="pg_dump > /dev/null",
            note="for information: verification reads the whole object back before anything is dropped"))

    copy_s = _copy_binary_discard(env, db)
    pq_info, _, pq_rss = _archive_in_child(env, db, bucket, "parquet")
    figures.append(Figure(
        GROUP, "Parquet export", pq_info["rows"] / pq_info["upload_s"], "rows/s",
        baseline=rows / copy_s, baseline_name="binary COPY read and discarded (no conversion)",
        note=f"{pq_info['bytes'] / 1024**2:,.0f} MB Parquet (snappy) in {pq_info['parts']} parts; peak RSS "
        f"{pq_rss:.0f} MB"))
    figures.append(Figure(
        GROUP, "peak RSS of the Parquet export process", pq_rss, "MB", goal=f"< {RSS_GOAL_MB:.0f} MB",
        met=pq_rss < RSS_GOAL_MB, note="row groups of about 32 MB of CSV, parsed by Arrow in C++"))
    for f in figures:
        env.add(f)
    return figures


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "verify")
        return
    rows = int(os.environ.get("BENCH_ARCHIVE_ROWS", "3200000"))
    with bench_env("pgp-bench-archive-") as env:
        run(env, rows)
        print("\n".join(f.line() for f in env.figures))


if __name__ == "__main__":
    main()
