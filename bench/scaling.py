"""Scaling: the fill and the archive at four sizes, each twice the previous; time per row should stay flat.

Fill: seed ``activities`` (all indexes), prep + partitions, then plan + fill, timed. Archive: a plain table of the
same size (what a detached partition is) streamed by pg_dump into S3. The figure compares the time per row at the
largest size with the smallest (goal: <= 1.5x; fixed costs such as process start-up make the smallest size look
relatively slow, never faster).
"""

from __future__ import annotations

import logging
import os
import uuid

from bench.common import BenchEnv, Figure, bench_env, timer
from pg_partition.core import archive, convert
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.catalog import QualifiedName
from pg_partition.core.db.execute import Executor
from tools.seed import seed_activities

GROUP = "scaling"


def sizes(rows: int) -> list[int]:
    return [max(rows // 8, 1000) * 2**i for i in range(4)]


def fill_us_per_row(env: BenchEnv, n: int) -> float:
    db = env.new_database()
    spec = ConvertSpec.create("activities", "created_at")
    with env.connect(db) as conn:
        seed_activities(conn, "public.activities", rows=n, timestamptz=True)
        ex = Executor(conn, logger=logging.getLogger("pg_partition.bench"))
        convert.prep(ex, spec)
        convert.add_partitions(ex, spec, cover_data=True, future=1)
        conn.execute("CHECKPOINT")
        with timer() as t:
            convert.plan_fill(ex, spec, batch_size=10_000)
            convert.fill(ex, spec, progress_every=3600)
    return t[0] / n * 1e6


def archive_us_per_row(env: BenchEnv, n: int, bucket: str) -> float:
    db = env.new_database()
    table = QualifiedName("public", "activities_202401")
    with env.connect(db) as conn:
        seed_activities(conn, table, rows=n, months=1, indexes=False)
        policy = archive.ArchivePolicy.build({"bucket": bucket, "format": "pg_dump",
                                              "prefix": f"scale-{uuid.uuid4().hex[:6]}"})
        ex = Executor(conn, logger=logging.getLogger("pg_partition.bench"))
        with timer() as t:
            archive.archive_table(ex, env.s3.client(), archive.ArchiveTarget(table, label="2024-01"), policy)
    return t[0] / n * 1e6


def run(env: BenchEnv, rows: int) -> tuple[list[Figure], dict[str, list[tuple[float, float]]]]:
    bucket = f"scale-{uuid.uuid4().hex[:8]}"
    env.s3.client().create_bucket(Bucket=bucket)
    series: dict[str, list[tuple[float, float]]] = {"fill": [], "archive (pg_dump -> S3)": []}
    for n in sizes(rows):
        series["fill"].append((n, fill_us_per_row(env, n)))
        series["archive (pg_dump -> S3)"].append((n, archive_us_per_row(env, n, bucket)))
        print(f"scaling: {n:,} rows: fill {series['fill'][-1][1]:.1f} us/row, archive "
              f"{series['archive (pg_dump -> S3)'][-1][1]:.1f} us/row", flush=True)
    figures = []
    for label, points in series.items():
        small, large = points[0][1], points[-1][1]
        figures.append(Figure(
            GROUP, f"{label}: time per row at {points[-1][0]:,.0f} rows", large, "us/row", baseline=small,
            baseline_name=f"time per row at {points[0][0]:,.0f} rows", goal="<= 1.5x (flat)",
            met=large <= 1.5 * small, note=", ".join(f"{n:,.0f}: {us:.1f}" for n, us in points)))
    for f in figures:
        env.add(f)
    return figures, series


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with bench_env("pgp-bench-scaling-") as env:
        run(env, int(os.environ.get("BENCH_ROWS", "1000000")))


if __name__ == "__main__":
    main()
