"""Application impact of an online conversion: a pgbench workload before and during it, same run, same server.

The workload is the users' application on ``activities``: look up by ``id``, list a user's latest activities by
``owner_id``, insert an activity, update one. It runs for BENCH_IMPACT_SECONDS before the conversion (baseline),
then continuously while the whole conversion runs (with change capture, because the workload updates rows):
prep, add partitions, install capture, fill, index builds, analyze, replay, swap.

Figures: tps during / before, p50 and p99 latency during / before (goal p99 <= 2x), the slowest application
transaction during the conversion (an upper bound of the longest lock wait any application statement saw; goal
<= lock_timeout + the p99 before), and the swap's exclusive-lock time. Per-transaction latencies come from
pgbench's own log (``-l``).

Run alone: ``.venv/bin/python -m bench.impact`` (BENCH_ROWS).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import BenchEnv, Figure, bench_env
from pg_partition.core import convert
from pg_partition.core.convert import capture, replay
from pg_partition.core.convert.spec import ConvertSpec
from pg_partition.core.db.execute import Executor
from tools.seed import seed_activities

GROUP = "application impact"
LOCK_TIMEOUT_MS = 2000
SCRIPT = """\\set id random(1, :maxid)
\\set owner random(0, 19999)
SELECT * FROM activities WHERE id = :id;
SELECT id, key, created_at FROM activities WHERE owner_type = 'User' AND owner_id = :owner ORDER BY id DESC LIMIT 20;
INSERT INTO activities (trackable_type, trackable_id, owner_type, owner_id, key, parameters, created_at, updated_at)
  VALUES ('Job', :id, 'User', :owner, 'bench.insert', '--- {}', now(), now());
UPDATE activities SET updated_at = now(), key = 'bench.update' WHERE id = :id;
"""


class Workload:
    """pgbench in consecutive short runs until stopped; collects per-transaction latencies (microseconds)."""

    def __init__(self, env: BenchEnv, db: str, maxid: int, clients: int, workdir: Path) -> None:
        self.env, self.db, self.maxid, self.clients, self.workdir = env, db, maxid, clients, workdir
        self.script = workdir / "app.sql"
        self.script.write_text(SCRIPT)
        self.latencies_us: list[int] = []
        self.transactions = 0
        self.seconds = 0.0
        self.failures = 0
        self._n = 0

    def run_for(self, seconds: int) -> None:
        self._n += 1
        prefix = self.workdir / f"log{self._n}"
        cmd = [self.env.pgbench(), "-n", "-f", str(self.script), "-c", str(self.clients), "-j", "2",
               "-T", str(seconds), "-D", f"maxid={self.maxid}", "-l", f"--log-prefix={prefix}",
               "-h", "127.0.0.1", "-p", str(self.env.cluster.primary.port), "-U", "postgres", self.db]
        start = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True)
        self.seconds += time.monotonic() - start
        if res.returncode != 0:
            self.failures += 1
        for path in self.workdir.glob(f"log{self._n}.*"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3:
                    self.latencies_us.append(int(parts[2]))
                    self.transactions += 1
            path.unlink()

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_us:
            return 0.0
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def _convert(env: BenchEnv, db: str, batch_size: int) -> dict[str, Any]:
    """The whole conversion with change capture, as the DAG runs it."""
    spec = ConvertSpec.create("activities", "created_at", defer_indexes=True)
    with env.connect(db) as conn:
        ex = Executor(conn, logger=logging.getLogger("pg_partition.bench"))
        convert.prep(ex, spec)
        convert.add_partitions(ex, spec, cover_data=True, future=3)
        capture.install(ex, spec.table, spec.intermediate)
        convert.plan_fill(ex, spec, batch_size=batch_size)
        convert.fill(ex, spec, progress_every=3600)
        convert.build_indexes(ex, spec)
        convert.analyze(ex, spec)
        replay.replay(conn, spec.table, spec.intermediate, until_backlog_below=500)
        return convert.swap(ex, spec, lock_timeout=f"{LOCK_TIMEOUT_MS}ms")


def run(env: BenchEnv, rows: int) -> list[Figure]:
    seconds = int(os.environ.get("BENCH_IMPACT_SECONDS", str(max(3, min(20, rows // 50_000)))))
    clients = int(os.environ.get("BENCH_IMPACT_CLIENTS", "4"))
    db = env.new_database()
    with env.connect(db) as conn:
        seed_activities(conn, "public.activities", rows=rows, timestamptz=True)
        conn.execute("VACUUM ANALYZE activities")
    with tempfile.TemporaryDirectory(prefix="pgp-bench-impact-") as tmp:
        before = Workload(env, db, rows, clients, Path(tmp))
        before.run_for(seconds)
        during = Workload(env, db, rows, clients, Path(tmp))
        done = threading.Event()
        result: dict[str, Any] = {}
        errors: list[BaseException] = []

        def conversion() -> None:
            try:
                result.update(_convert(env, db, 10_000))
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        worker = threading.Thread(target=conversion)
        started = time.monotonic()
        worker.start()
        while not done.is_set():
            during.run_for(max(2, seconds // 4))
        worker.join()
        if errors:
            raise errors[0]
        conversion_s = time.monotonic() - started
    p99_before = before.percentile(0.99)
    figures = [
        Figure(GROUP, "application tps during conversion", during.tps, "tps", baseline=before.tps,
               baseline_name="tps before", note=f"{clients} pgbench clients; conversion took {conversion_s:.1f}s; "
               f"pgbench runs with errors: before {before.failures}, during {during.failures}"),
        Figure(GROUP, "application p50 latency during conversion", during.percentile(0.5), "ms",
               baseline=before.percentile(0.5), baseline_name="p50 before"),
        Figure(GROUP, "application p99 latency during conversion", during.percentile(0.99), "ms",
               baseline=p99_before, baseline_name="p99 before", goal="<= 2x",
               met=during.percentile(0.99) <= 2 * max(p99_before, 1e-9)),
        Figure(GROUP, "slowest application transaction during conversion (bounds its longest lock wait)",
               max(during.latencies_us or [0]) / 1000.0, "ms", baseline=max(before.latencies_us or [0]) / 1000.0,
               baseline_name="slowest before", goal=f"<= lock_timeout {LOCK_TIMEOUT_MS} ms + p99 before",
               met=max(during.latencies_us or [0]) / 1000.0 <= LOCK_TIMEOUT_MS + p99_before),
        Figure(GROUP, "swap: exclusive lock held (with capture backlog applied)", float(result["lock_ms"]), "ms",
               goal="<= 100 ms", met=float(result["lock_ms"]) <= 100),
    ]
    for f in figures:
        env.add(f)
    return figures


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with bench_env("pgp-bench-impact-") as env:
        run(env, int(os.environ.get("BENCH_ROWS", "1000000")))


if __name__ == "__main__":
    main()
