"""Archive throughput and memory, measured against baselines in the same run.

1. pg_dump -> S3: ``archive_table`` (pg_dump --format=custom piped into an S3 multipart upload, sha256 while
   streaming) against ``pg_dump --format=custom > /dev/null`` of the same table, rounds alternating (A B A B) so
   cache, checkpoint and neighbour-load drift hit both alike; the median of each side is compared (every round
   is printed). Goal: >= 0.9x. CPU seconds of pg_dump, of the archiving process and of the S3 server are
   printed too: on a busy shared machine wall-clock ratios drift, CPU cost does not.
2. Peak RSS of the archiving process: the archive runs in a fresh Python process (``--child``) and its
   ``ru_maxrss`` is read by ``/usr/bin/time``. Goal: < 200 MB whatever the table size.
3. Parquet export rows/s (binary COPY -> ADBC Arrow record batches -> Parquet -> S3), against reading the same
   table's binary COPY stream in Python and discarding it (the floor: what PostgreSQL and the socket cost),
   rounds alternating; plus its peak RSS. Goal: >= 0.8x.
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
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from psycopg import sql

from bench.common import BenchEnv, Figure, bench_env, timer
from pg_partition.core import archive
from pg_partition.core.archive.policy import MiB
from pg_partition.core.db.catalog import QualifiedName
from tools.seed import seed_activities

GROUP = "archive"
TABLE = QualifiedName("public", "activities_202401")
RSS_GOAL_MB = 200.0


def _child(dsn: str, endpoint: str, bucket: str, fmt: str, verify: bool, table: QualifiedName = TABLE,
           codec: str = "") -> None:
    """Runs in a fresh process: archive one table to S3 (and optionally verify it); prints JSON timings."""
    import boto3
    import psycopg

    from pg_partition.core.db.execute import Executor

    if fmt.startswith("parquet"):  # loaded once per worker process in real use: module loading is not throughput
        from pg_partition.core.archive import arrow_copy

        arrow_copy.load_pyarrow()  # as the export's first pyarrow import would (it picks Arrow's allocator)
        import adbc_driver_manager  # noqa: F401
        import adbc_driver_postgresql  # noqa: F401
        import pyarrow.parquet  # noqa: F401

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    completing = [0.0]

    class TimesComplete:
        """The real client; records how long CompleteMultipartUpload takes (moto assembles the object then)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def complete_multipart_upload(self, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return client.complete_multipart_upload(**kwargs)
            finally:
                completing[0] += time.perf_counter() - start

    class DiscardingS3(TimesComplete):
        """Stand-in for S3 (named so) for the "without S3" rounds: the multipart upload's parts are read (their
        length checked) and dropped; the small manifest still goes to the real endpoint."""

        def create_multipart_upload(self, **kwargs: Any) -> Any:
            return {"UploadId": "discarded"}

        def upload_part(self, **kwargs: Any) -> Any:
            assert len(kwargs["Body"]) == kwargs["ContentLength"]
            return {"ETag": f'"{kwargs["PartNumber"]}"'}

        def complete_multipart_upload(self, **kwargs: Any) -> Any:
            return {"ETag": '"discarded"'}

        def abort_multipart_upload(self, **kwargs: Any) -> Any:
            return {}

    s3 = TimesComplete()
    if fmt == "parquet-nos3":
        fmt, s3 = "parquet", DiscardingS3()
    with psycopg.connect(dsn, autocommit=True) as conn:
        policy = archive.ArchivePolicy.build({"bucket": bucket, "format": fmt,
                                              "prefix": f"bench-{uuid.uuid4().hex[:6]}",
                                              **({"parquet_compression": codec} if codec else {})})
        start = time.perf_counter()
        manifest = archive.archive_table(Executor(conn), s3, archive.ArchiveTarget(table, label="2024-01"), policy)
        upload_s = time.perf_counter() - start
        verify_s = None
        if verify:
            start = time.perf_counter()
            archive.verify_archive(conn, s3, manifest)
            verify_s = time.perf_counter() - start
    print(json.dumps({"upload_s": upload_s, "verify_s": verify_s, "complete_s": completing[0],
                      "bytes": manifest["bytes"], "rows": manifest["rows"], "parts": manifest["parts"]}))


def _footer_child(groups: int) -> None:
    """Runs in a fresh process: RSS growth of a ParquetWriter per row group written (the footer metadata it keeps
    until close), with the bench table's 11 columns, tiny row groups and a discarding sink; prints JSON."""
    from pg_partition.core.archive import arrow_copy

    pa = arrow_copy.load_pyarrow()
    import pyarrow.parquet as pq

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB

    n = 100
    ints = pa.array(range(n), pa.int64())
    texts = pa.array([f"text {i}" for i in range(n)])
    stamps = pa.array(range(n), pa.timestamp("us"))
    table = pa.table({"id": ints, "trackable_type": texts, "trackable_id": ints, "owner_type": texts,
                      "owner_id": ints, "key": texts, "parameters": texts, "recipient_type": texts,
                      "recipient_id": ints, "created_at": stamps, "updated_at": stamps})

    class Discard:
        closed = False
        size = 0

        def write(self, data: Any) -> int:
            self.size += len(data)
            return len(data)

        def tell(self) -> int:
            return self.size

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

        def writable(self) -> bool:
            return True

    writer = pq.ParquetWriter(pa.PythonFile(Discard(), mode="w"), table.schema, compression="zstd",
                              write_statistics=True, version="2.6")
    before = rss_mb()
    for _ in range(groups):
        writer.write_table(table, row_group_size=n)
    grown = rss_mb() - before
    writer.close()
    print(json.dumps({"groups": groups, "grown_mb": grown, "bytes_per_group": grown * MiB / groups}))


def _footer_per_group(groups: int = 10_000) -> Figure:
    """The Parquet writer's memory per row group (kept until close), measured in a fresh process."""
    res = subprocess.run([sys.executable, "-m", "bench.archive", "--footer", str(groups)], capture_output=True,
                         text=True, env=dict(os.environ), check=True)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return Figure(
        GROUP, "Parquet writer memory per row group (footer metadata kept until close)", info["bytes_per_group"],
        "bytes", note=f"for information: {info['grown_mb']:.0f} MB after {groups:,} row groups of the bench "
        "table's 11 columns (about 900 bytes per column chunk, statistics on or off). Row groups hold about 4 MiB "
        "of Arrow data, so this part of the export's memory grows with the table (the size series shows it: "
        "about +10-13 MB from 0.08 to 3.26 GiB on 2026-11-29); one Parquet object per terabyte table cannot stay "
        "under 200 MB, that needs several objects per table")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its waited-for children) from /proc, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _archive_in_child(env: BenchEnv, db: str, bucket: str, fmt: str, verify: bool = False,
                      table: QualifiedName = TABLE, codec: str = "") -> tuple[dict[str, Any], float, float]:
    """Run the archive in a fresh process: (its JSON report + CPU seconds of it and of the S3 server, wall, RSS)."""
    cmd = ["/usr/bin/time", "-f", "%M %U %S", sys.executable, "-m", "bench.archive", "--child", env.dsn(db),
           env.s3.endpoint, bucket, fmt, "verify" if verify else "-", str(table), codec]
    assert env.s3.proc is not None
    moto_before = _cpu_seconds(env.s3.proc.pid)
    with timer() as t:
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True)
    rss_kb, user, system = res.stderr.strip().splitlines()[-1].split()
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["cpu_s"] = float(user) + float(system)
    info["s3_server_cpu_s"] = _cpu_seconds(env.s3.proc.pid) - moto_before
    return info, t[0], float(rss_kb) / 1024


def _pg_dump_devnull(env: BenchEnv, db: str) -> tuple[float, float]:
    """(wall seconds, pg_dump's CPU seconds) of ``pg_dump --format=custom > /dev/null``."""
    tool = archive.find_pg_tool("pg_dump", 0)
    with open(os.devnull, "wb") as devnull, timer() as t:
        res = subprocess.run(["/usr/bin/time", "-f", "%U %S", tool.path, "--format=custom",
                              f"--table={archive.dump_pattern(TABLE)}", f"--dbname={env.dsn(db)}"],
                             stdout=devnull, stderr=subprocess.PIPE, text=True, check=True)
    user, system = res.stderr.strip().splitlines()[-1].split()
    return t[0], float(user) + float(system)


def _upload_only(env: BenchEnv, bucket: str, size: int) -> tuple[float, float]:
    """(seconds, S3 server CPU seconds) to upload ``size`` bytes already in memory through the same multipart
    path (8 MiB parts, 1 in flight): what the S3 endpoint alone costs the Parquet export on this machine."""
    data = os.urandom(MiB) * max(1, size // MiB)
    client = env.s3.client()
    assert env.s3.proc is not None
    moto_before = _cpu_seconds(env.s3.proc.pid)
    with timer() as t, archive.MultipartUpload(client, bucket, f"upload-only-{uuid.uuid4().hex[:6]}",
                                                expected_size=len(data), max_inflight=1) as up:
        view = memoryview(data)
        for i in range(0, len(data), MiB):
            up.write(view[i:i + MiB])
        up.complete()
    return t[0], _cpu_seconds(env.s3.proc.pid) - moto_before


def _copy_binary_discard(env: BenchEnv, db: str) -> float:
    """Seconds to read the table's binary COPY stream in Python and discard it: the Parquet export's floor."""
    with env.connect(db) as conn, timer() as t, conn.cursor() as cur, cur.copy(
            "COPY (SELECT * FROM public.activities_202401) TO STDOUT (FORMAT binary)") as copy:
        for _ in copy:
            pass
    return t[0]


def run(env: BenchEnv, rows: int) -> list[Figure]:
    rounds = int(os.environ.get("BENCH_ARCHIVE_ROUNDS", "5"))
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
    base_cpu = 0.0
    completes: list[float] = []
    for i in range(rounds):
        seconds, base_cpu = _pg_dump_devnull(env, db)
        base_s.append(seconds)
        info, wall, rss = _archive_in_child(env, db, bucket, "pg_dump", verify=i == rounds - 1)
        ours_s.append(info["upload_s"])
        completes.append(info["complete_s"])
        walls.append(wall)
        rss_dump.append(rss)
        dump_info = info
        print(f"round {i + 1}: pg_dump > /dev/null {base_s[-1]:.1f}s (pg_dump CPU {base_cpu:.1f}s), pg_dump -> S3 "
              f"{ours_s[-1]:.1f}s (archiving process {wall:.1f}s, its CPU {info['cpu_s']:.1f}s incl. pg_dump, "
              f"S3 server CPU {info['s3_server_cpu_s']:.1f}s, CompleteMultipartUpload {info['complete_s']:.1f}s, "
              f"peak RSS {rss:.0f} MB)", flush=True)
    med_base, med_ours = statistics.median(base_s), statistics.median(ours_s)
    mb = size / 1024**2
    figures.append(Figure(
        GROUP, "pg_dump -> S3 throughput", mb / med_ours, "MB/s (table size / time)",
        baseline=mb / med_base, baseline_name="pg_dump --format=custom > /dev/null", goal=">= 0.9x",
        met=med_base / med_ours >= 0.9,
        note=f"{size / 1024**3:.2f} GiB table, {rows:,} rows -> {dump_info['bytes'] / 1024**2:,.0f} MB dump in "
        f"{dump_info['parts']} parts; median of {rounds} alternating rounds (all: ours "
        f"{[round(x, 1) for x in ours_s]} s, baseline {[round(x, 1) for x in base_s]} s); the child process's wall "
        f"time including Python start-up was {min(walls):.1f} s. CPU in the last round: archiving process "
        f"{dump_info['cpu_s']:.1f} s including its pg_dump child (pg_dump alone: {base_cpu:.1f} s), the moto "
        f"S3 server {dump_info['s3_server_cpu_s']:.1f} s on the same {os.cpu_count()} cores"))
    streaming = statistics.median(o - c for o, c in zip(ours_s, completes, strict=True))
    figures.append(Figure(
        GROUP, "pg_dump -> S3 streaming throughput (without CompleteMultipartUpload)", mb / streaming,
        "MB/s (table size / time)", baseline=mb / med_base, baseline_name="pg_dump --format=custom > /dev/null",
        note=f"for information: the same rounds minus the CompleteMultipartUpload call (median "
        f"{statistics.median(completes):.1f} s), which moto answers by assembling the whole object in Python on "
        "this machine; real S3 does that on its side"))
    figures.append(Figure(
        GROUP, "peak RSS of the pg_dump -> S3 process", max(rss_dump), "MB", goal=f"< {RSS_GOAL_MB:.0f} MB",
        met=max(rss_dump) < RSS_GOAL_MB, note="ru_maxrss of a fresh Python process running archive_table "
        "(8 MiB parts, 2 in flight); includes the interpreter, boto3 and psycopg (about 60 MB before any work)"))
    if dump_info.get("verify_s"):
        figures.append(Figure(
            GROUP, "verify (stream back: sha256 + pg_restore --list + row count)", mb / dump_info["verify_s"],
            "MB/s (table size / time)", baseline=mb / med_base, baseline_name="pg_dump > /dev/null",
            note="for information: verification reads the whole object back before anything is dropped"))

    codecs = [c.strip() for c in os.environ.get("BENCH_PARQUET_CODECS", "zstd,snappy").split(",") if c.strip()]
    copy_s: list[float] = []
    upload_s: list[float] = []
    pq_s: dict[str, list[float]] = {c: [] for c in codecs}
    pq_rss: list[float] = []
    pq_completes: dict[str, list[float]] = {c: [] for c in codecs}
    pq_info: dict[str, dict[str, Any]] = {}
    moto_upload = 0.0
    nos3_s: list[float] = []
    for i in range(rounds):
        copy_s.append(_copy_binary_discard(env, db))
        order = codecs if i % 2 == 0 else codecs[::-1]  # alternate which codec runs right after the baseline
        for codec in order:
            info, _, rss = _archive_in_child(env, db, bucket, "parquet", codec=codec)
            pq_info[codec] = info
            pq_s[codec].append(info["upload_s"])
            pq_completes[codec].append(info["complete_s"])
            pq_rss.append(rss)
            print(f"round {i + 1}: Parquet ({codec}) export {info['upload_s']:.2f}s, {info['bytes'] / MiB:,.0f} MiB "
                  f"(its CPU {info['cpu_s']:.1f}s, S3 server CPU {info['s3_server_cpu_s']:.1f}s, peak RSS "
                  f"{rss:.0f} MB)", flush=True)
        info, _, rss = _archive_in_child(env, db, bucket, "parquet-nos3", codec=codecs[0])
        nos3_s.append(info["upload_s"])
        print(f"round {i + 1}: Parquet ({codecs[0]}) export without S3 (parts discarded) {info['upload_s']:.2f}s "
              f"(its CPU {info['cpu_s']:.1f}s, peak RSS {rss:.0f} MB)", flush=True)
        seconds, moto_upload = _upload_only(env, bucket, int(pq_info[codecs[0]]["bytes"]))
        upload_s.append(seconds)
        print(f"round {i + 1}: binary COPY read and discarded {copy_s[-1]:.2f}s; the same {codecs[0]} object's "
              f"bytes uploaded from memory {seconds:.2f}s (S3 server CPU {moto_upload:.1f}s)", flush=True)
    med_copy = statistics.median(copy_s)
    for codec in codecs:
        med_pq = statistics.median(pq_s[codec])
        info = pq_info[codec]
        figures.append(Figure(
            GROUP, f"Parquet export ({codec})", info["rows"] / med_pq, "rows/s", goal=">= 0.8x",
            met=med_copy / med_pq >= 0.8, baseline=rows / med_copy,
            baseline_name="the same table's binary COPY stream read in Python and discarded",
            note=f"binary COPY -> ADBC Arrow record batches -> ParquetWriter -> S3 (moto) multipart; "
            f"{info['bytes'] / MiB:,.0f} MiB Parquet ({codec}) in {info['parts']} parts; median of {rounds} "
            f"alternating rounds (all: ours {[round(x, 2) for x in pq_s[codec]]} s, baseline "
            f"{[round(x, 2) for x in copy_s]} s); CPU in the last round: process {info['cpu_s']:.1f} s, S3 server "
            f"{info['s3_server_cpu_s']:.1f} s"))
        stream_pq = statistics.median(o - c for o, c in zip(pq_s[codec], pq_completes[codec], strict=True))
        figures.append(Figure(
            GROUP, f"Parquet export ({codec}) without CompleteMultipartUpload", info["rows"] / stream_pq, "rows/s",
            baseline=rows / med_copy, baseline_name="the same table's binary COPY stream read in Python and discarded",
            note=f"for information: the same rounds minus CompleteMultipartUpload (median "
            f"{statistics.median(pq_completes[codec]):.1f} s), which moto answers by assembling the object in "
            "Python here"))
    figures.append(Figure(
        GROUP, f"Parquet export ({codecs[0]}) without S3", rows / statistics.median(nos3_s), "rows/s",
        goal=">= 0.8x", met=med_copy / statistics.median(nos3_s) >= 0.8, baseline=rows / med_copy,
        baseline_name="the same table's binary COPY stream read in Python and discarded",
        note=f"the whole export (snapshot, count, ADBC, Parquet, sha256, part buffers) into a stand-in S3 that "
        f"discards the parts; rounds {[round(x, 2) for x in nos3_s]} s"))
    figures.append(Figure(
        GROUP, f"upload only: the {codecs[0]} object's bytes from memory to S3 (moto)",
        rows / statistics.median(upload_s), "rows/s (table rows / time)", baseline=rows / med_copy,
        baseline_name="the same table's binary COPY stream read in Python and discarded",
        note=f"for information, the second baseline: what the S3 endpoint alone costs on this machine "
        f"(all rounds {[round(x, 2) for x in upload_s]} s; moto's CPU in the last {moto_upload:.1f} s)"))
    figures.append(Figure(
        GROUP, "peak RSS of the Parquet export process", max(pq_rss), "MB", goal=f"< {RSS_GOAL_MB:.0f} MB",
        met=max(pq_rss) < RSS_GOAL_MB,
        note="row groups of about 4 MB of Arrow data, ADBC batches of about 1 MB (1 queued), 2 reused 8 MiB part "
        "buffers, Arrow on jemalloc; includes pyarrow, the ADBC driver and boto3 (about 113 MB before any work)"))
    figures.append(_footer_per_group())
    sizes = [int(x) for x in os.environ.get("BENCH_ARCHIVE_SIZES", "").split(",") if x.strip()]
    if sizes:
        figures += _rss_by_size(env, db, bucket, sizes)
    for f in figures:
        env.add(f)
    return figures


def _rss_by_size(env: BenchEnv, db: str, bucket: str, sizes: list[int]) -> list[Figure]:
    """Peak RSS of the archiving process (pg_dump and Parquet, real multipart path) as one table grows.

    The table grows in place (rows appended) to each size in ``BENCH_ARCHIVE_SIZES`` (rows), so the seeding costs
    only the largest size. Memory should not grow with the table: the part size is 8 MiB up to ~27 GB of
    relation, and larger parts (larger tables) are spooled to disk (the unit test
    ``test_s3_parts.py`` streams a 3 GiB body told it is 1.5 TiB, which the real path cannot hold here).
    """
    from tools.seed import create_activities, insert_rows

    table = QualifiedName("public", "activities_sizes")
    out: list[Figure] = []
    done = 0
    with env.connect(db) as conn:
        create_activities(conn, table)
    for target in sorted(sizes):
        with env.connect(db) as conn:
            insert_rows(conn, table, target - done, months=1)
            done = target
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table.ident))
            size = int(conn.execute("SELECT pg_total_relation_size(%s::regclass)", (str(table),)).fetchone()[0])
        for fmt in ("pg_dump", "parquet"):
            info, _, rss = _archive_in_child(env, db, bucket, fmt, table=table)
            print(f"{target:,} rows, {size / 1024**3:.2f} GiB: {fmt} -> S3 {info['upload_s']:.1f}s, "
                  f"{info['parts']} parts, peak RSS {rss:.0f} MB", flush=True)
            out.append(Figure(
                GROUP, f"peak RSS, {fmt} -> S3 of a {size / 1024**3:.2f} GiB table", rss, "MB",
                goal=f"< {RSS_GOAL_MB:.0f} MB", met=rss < RSS_GOAL_MB,
                note=f"{target:,} rows, {info['bytes'] / 1024**2:,.0f} MB object in {info['parts']} parts, "
                f"{info['upload_s']:.1f} s"))
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--footer":
        _footer_child(int(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "verify",
               QualifiedName.parse(sys.argv[7]), sys.argv[8] if len(sys.argv) > 8 else "")
        return
    rows = int(os.environ.get("BENCH_ARCHIVE_ROWS", "3200000"))
    with bench_env("pgp-bench-archive-") as env:
        run(env, rows)
        print("\n".join(f.line() for f in env.figures))


if __name__ == "__main__":
    main()
